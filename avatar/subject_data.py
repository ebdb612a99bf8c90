"""A subject as tensors: frames, cameras and condition tracks at one resolution, for training and driving.

Frames and label maps come from the subject's uint8 cache on disk (:class:`avatar.subject.FrameFile`)
and are turned into float tensors one frame at a time, so memory stays bounded whatever the
subject's length. Per frame tracks (cameras, motion conditions, audio features) are small and held as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from avatar import topology
from avatar.errors import AvatarError, InputError
from avatar.models.talking_head import BLINK_NAMES, GAZE_FEATURES, LAG_FEATURES, POSE_FEATURES
from avatar.preprocess.face_model import so3_exp
from avatar.progress import Progress
from avatar.subject import LABEL, Subject

HEAD_LABELS = (LABEL["face"], LABEL["mouth_interior"], LABEL["hair"])


@dataclass
class Frame:
    """One training frame on the training device."""

    index: int
    image: Tensor
    """[H, W, 3] float in [0, 1]."""
    background: Tensor
    """[H, W, 3] what the rendered head is composited over: the frame's own pixels, with the plate
    composite (neck plate) where the original head was, feathered over a few pixels around it, so
    that only the head is new (:func:`frame_background`)."""
    plate_background: Tensor
    """[H, W, 3] the same with the background plate outside the torso and head: what a frame
    looks like when only the head and torso come from the subject (``--background plate``)."""
    head_mask: Tensor
    """[H, W, 1] float: face, mouth interior and hair labels."""
    skin_mask: Tensor
    """[H, W, 1] float: the face label alone (skin and lips, not the mouth interior): where the
    face layer must be opaque."""
    mouth_mask: Tensor
    """[H, W, 1] float: the mouth-interior label (inside the lips): what the mouth layer draws."""
    mouth_box: tuple[int, int, int, int]
    """x0, y0, x1, y1 around the lips, in training pixels."""
    viewmat: Tensor
    """[4, 4] world-to-camera of the tracked pose (the face's)."""
    head_viewmat: Tensor
    """[4, 4] world-to-camera that the whole head is rendered at when it goes into this frame:
    the tracked pose refined by the run (:attr:`SubjectData.head_viewmats`)."""
    K: Tensor
    """[3, 3] intrinsics at the training resolution."""
    motion: Tensor
    """[E] the face branch's non-audio condition (eye and brow tracks, head rotation)."""

    def over(self, background: str) -> Tensor:
        """The background named ``background`` (one of :data:`BACKGROUNDS`). [H, W, 3]

        Raises:
            ValueError: an unknown background.
        """
        if background == "frame":
            return self.background
        if background == "plate":
            return self.plate_background
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")

    def face_weight(self) -> Tensor:
        """[H, W, 1] where the ``face`` composite shows the render (:func:`face_paste_weight` of the
        skin and mouth interior). Computed when asked: training never needs it."""
        return face_paste_weight((self.skin_mask + self.mouth_mask) > 0.5, self.image.shape[0])

    def paste_face(self, rendered: Tensor) -> Tensor:
        """``rendered`` (the head over :attr:`background`) shown on the face, the frame itself around
        it (the ``face`` composite). [H, W, 3]"""
        weight = self.face_weight()
        return weight * rendered + (1.0 - weight) * self.image


BACKGROUNDS = ("frame", "plate")
"""What the rendered head goes over: the subject frame's own pixels with the original head
replaced (``frame``) or its torso over the background plate (``plate``, what every frame looked
like before). Training composites over one of them."""

COMPOSITES = ("face", "frame", "plate")
"""What an output frame is made of, when its head pose is a subject frame's. ``face`` (the
default): the rendered face pasted into the subject frame, whose hair, ears, neck and
background stay (the paste-back of dubbing tools); ``frame``: the whole rendered head over the
frame's own pixels; ``plate``: the whole rendered head over the frame's torso and the plate."""

DEFAULT_COMPOSITE = "face"
"""``avatar render``'s composite, and the one ``avatar eval`` reports as ``psnr``."""

JAW_ROOM = 0.08
"""How far below the original face the ``face`` composite still shows the render, as a share of
the image side: room for a chin that new speech lowers further than the original did."""


def feather_pixels(resolution: int) -> int:
    """``d`` of the composites' feathers: 2 px at 256, scaled with the resolution."""
    return max(1, round(2 * resolution / 256))


def head_feather(head: Tensor, resolution: int) -> Tensor:
    """[H, W, 1] weight of the plate composite: 1 on the head mask, falling to 0 over the ``2 d``
    pixels around it (``d`` = 2 px at 256, scaled with the resolution).

    The segmentation's head edge is a pixel or two off where hair meets the background; a hard
    edge would leave a rim of the original head (or a seam) around the new one.
    """
    return _feather(head[..., 0], resolution, outwards=True)


def _feather(mask: Tensor, resolution: int, outwards: bool) -> Tensor:
    """[H, W, 1] soft version of ``mask`` [H, W]: grown (``outwards``) or shrunk by ``d`` =
    :func:`feather_pixels`, then box-blurred over ``2 d + 1``, so the weight runs from 1 to 0
    over the ``2 d`` pixels outside or inside the mask's edge."""
    d = feather_pixels(resolution)
    m = mask.float()[None, None]  # [1, 1, H, W]
    pool = torch.nn.functional.max_pool2d
    moved = pool(m, 2 * d + 1, stride=1, padding=d) if outwards else -pool(-m, 2 * d + 1, stride=1, padding=d)
    soft = torch.nn.functional.avg_pool2d(moved, 2 * d + 1, stride=1, padding=d, count_include_pad=False)
    return soft[0].permute(1, 2, 0)


def face_paste_weight(face: Tensor, resolution: int, jaw_room: float = JAW_ROOM) -> Tensor:
    """[H, W, 1] weight of the render in the ``face`` composite: 1 on the original face (skin and
    mouth interior) and ``jaw_room`` of the image below it, fading to 0 at its edge over the ``2 d``
    pixels inside it (``d`` as in :func:`head_feather`).

    Below the original chin the render is the head over the frame's own pixels (the neck), so
    the room costs nothing where the new chin does not reach and keeps a chin that drops lower.
    The fade lies inside the face, so the seam runs over skin in both images rather than over the
    rendered face's rim, which sits a pixel or two off the real one where hair meets the cheek.
    """
    room = max(1, round(jaw_room * resolution))
    # A pixel is inside when the face covers it or any of the ``room`` pixels above it.
    covered = torch.nn.functional.pad(face[..., 0].float().cumsum(0), (0, 0, room + 1, 0))
    return _feather(covered[room + 1:] > covered[: -room - 1], resolution, outwards=False)


def frame_background(image: Tensor, head_weight: Tensor, plate_background: Tensor) -> Tensor:
    """The frame's own pixels where the original head was not: ``w * plate_background + (1 - w) *
    image`` for ``w`` = :func:`head_feather`, so the head's place shows the neck plate (as over the
    plate) and its rim fades from the plate composite into the frame. [H, W, 3]"""
    return head_weight * plate_background + (1.0 - head_weight) * image


def pose_correction_matrices(deltas: Tensor) -> Tensor:
    """[T, 4, 4] rigid transforms of the head from corrections [T, 6]: an axis-angle rotation
    (radians) about the head's origin, then a translation in world units. A frame's refined
    world-to-camera matrix is ``viewmat @ pose_correction_matrices(delta)``; differentiable."""
    top = torch.cat([so3_exp(deltas[:, :3]), deltas[:, 3:, None]], 2)
    bottom = torch.zeros_like(top[:, :1])
    bottom[..., 3] = 1.0
    return torch.cat([top, bottom], 1)


def scaled_intrinsics(K: np.ndarray, from_size: int, to_size: int) -> np.ndarray:
    """Intrinsics for an image resized from ``from_size`` to ``to_size`` pixels (square)."""
    s = to_size / from_size
    out = K.astype(np.float64).copy()
    out[:2] *= s
    return out


POSE_UNIT_DEGREES = 10.0
"""Head-rotation condition units: 10 degrees read as 1, the scale of the blendshape tracks."""


def mean_head_rotation(cam_to_world: np.ndarray) -> np.ndarray:
    """The mean world-to-camera rotation [3, 3] of a pose track [T, 4, 4]: the pose-condition zero."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(_world_to_camera_rotations(cam_to_world)).mean().as_matrix()


def head_rotation_features(cam_to_world: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The head's rotation [T, 3] away from ``reference``, in camera axes, in ``POSE_UNIT_DEGREES``.

    The camera holds still in the source video and the head turns, so this is the head's
    rotation relative to gravity: what makes hair hang and swing differently as she turns.
    It is a rotation vector (x: nod, y: turn, z: tilt), zero at the reference pose.
    """
    from scipy.spatial.transform import Rotation

    relative = Rotation.from_matrix(_world_to_camera_rotations(cam_to_world) @ reference.T)
    return (np.degrees(relative.as_rotvec()) / POSE_UNIT_DEGREES).astype(np.float32)


def _world_to_camera_rotations(cam_to_world: np.ndarray) -> np.ndarray:
    # The inverse of a rigid transform's rotation is its transpose.
    return np.swapaxes(np.asarray(cam_to_world, np.float64)[:, :3, :3], -1, -2)


def condition_tracks(tracks: dict[str, np.ndarray], names: Sequence[str], pose_reference: np.ndarray,
                     fps: float = 25.0) -> np.ndarray:
    """The face branch's non-audio condition [T, E]: the named blendshape, gaze, head-rotation and
    head-lag tracks (the lag along the video's own frames, at ``fps``)."""
    available = [str(n) for n in tracks["blendshape_names"]]
    derived = POSE_FEATURES + LAG_FEATURES + GAZE_FEATURES
    missing = [n for n in names if n not in available and n not in derived]
    if missing:
        raise InputError(f"the subject has no {', '.join(missing)} track; preprocess it again.")
    out = np.zeros((len(tracks["blendshapes"]), len(names)), np.float32)
    for column, name in enumerate(names):
        if name not in derived:
            out[:, column] = tracks["blendshapes"][:, available.index(name)]
    for column, values in pose_condition_columns(names, tracks["cam_to_world"], pose_reference, fps):
        out[:, column] = values
    if any(name in GAZE_FEATURES for name in names):
        valid = np.asarray(tracks["valid"], bool)
        blink = [available.index(n) for n in BLINK_NAMES if n in available]
        if blink:  # the iris is hidden under closing lids: its landmark then says nothing of the gaze
            valid = valid & ~(tracks["blendshapes"][:, blink].mean(axis=1) > BLINK_HIDES_GAZE)
        gaze = gaze_features(tracks["landmarks"], valid)
        for column, name in enumerate(names):
            if name in GAZE_FEATURES:
                out[:, column] = gaze[:, GAZE_FEATURES.index(name)]
    return out


GAZE_UNIT = 0.05
"""Gaze condition units: an iris 5 % of the eye's width off its usual place reads 1 (a glance
aside moves it 5-10 %), the scale of the other condition tracks."""


BLINK_HIDES_GAZE = 0.5
"""Blink track above which a frame's gaze is taken from its neighbours (the lids cover the iris)."""


def gaze_features(landmarks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Where the eyes look [T, 2] (x, y of :func:`avatar.topology.iris_offset`) in ``GAZE_UNIT``,
    zero at the subject's median gaze. Frames without a face take their neighbours' values, as
    the blendshape tracks do; a subject without any face frame gets zeros."""
    gaze = topology.iris_offset(landmarks)
    ok = np.asarray(valid, bool) & np.isfinite(gaze).all(axis=1)
    if not ok.any():
        return np.zeros((len(gaze), 2), np.float32)
    t = np.arange(len(gaze))
    gaze = np.stack([np.interp(t, t[ok], gaze[ok, k]) for k in range(2)], axis=1)
    return ((gaze - np.median(gaze[ok], axis=0)) / GAZE_UNIT).astype(np.float32)


LIP_GAP = "lip_gap"
"""Name of the mouth-target track measured on the landmarks rather than read from the blendshapes:
the inner-lip gap over the eye-corner distance (:func:`avatar.topology.inner_lip_opening`), the
same number ``avatar eval --drive`` compares across people."""


def mouth_target_tracks(tracks: dict[str, np.ndarray], names: Sequence[str], train: np.ndarray) -> np.ndarray:
    """The tracked mouth shape [T, K] the audio code is taught to predict, standardised per track.

    Each track is shifted and scaled to zero mean and unit variance over the ``train`` frames, so
    that every track weighs the same in the read-out loss whatever its units, and so that nothing
    of the validation split leaks in. Frames without a face (or a track without variance) read NaN.

    Args:
        names: :data:`LIP_GAP` or blendshape names of the subject (``jaw_open``, ``lips_apart``, ...).
        train: frame indices whose statistics standardise the tracks.

    Raises:
        InputError: a named blendshape is not in the subject.
    """
    available = [str(n) for n in tracks["blendshape_names"]]
    missing = [n for n in names if n != LIP_GAP and n not in available]
    if missing:
        raise InputError(f"the subject has no {', '.join(missing)} track; preprocess it again.")
    valid = tracks["valid"].astype(bool)
    out = np.full((len(valid), len(names)), np.nan, np.float64)
    for column, name in enumerate(names):
        if name == LIP_GAP:
            out[:, column] = topology.inner_lip_opening(tracks["landmarks"])
        else:
            out[:, column] = tracks["blendshapes"][:, available.index(name)]
    out[~valid] = np.nan
    fit = out[train] if len(train) else out
    with np.errstate(invalid="ignore", divide="ignore"):
        mean, std = np.nanmean(fit, axis=0), np.nanstd(fit, axis=0)
        out = (out - mean) / np.where(std > 1e-8, std, np.nan)
    return out.astype(np.float32)


def pose_columns(names: Sequence[str]) -> list[tuple[int, int]]:
    """(condition column, axis of :func:`head_rotation_features`) of each head-rotation track in ``names``."""
    return [(column, POSE_FEATURES.index(name)) for column, name in enumerate(names) if name in POSE_FEATURES]


def lag_columns(names: Sequence[str]) -> list[tuple[int, int]]:
    """(condition column, axis of :func:`head_lag_features`) of each head-lag track in ``names``."""
    return [(column, LAG_FEATURES.index(name)) for column, name in enumerate(names) if name in LAG_FEATURES]


LAG_SECONDS = 0.3
"""Time constant of the head-lag tracks: about how long hair takes to catch up with a turn."""


def head_lag_features(rotation: np.ndarray, fps: float, seconds: float = LAG_SECONDS) -> np.ndarray:
    """How far the head has turned ahead of where it has recently been [T, 3]: the rotation
    features minus their causal exponential moving average (time constant ``seconds``).

    Hair and ears trail the head: their displacement at a frame depends on the motion before it,
    which the rotation at that frame alone cannot tell. Zero while the head holds still; in the
    units of :func:`head_rotation_features`. Causal, so a new pose sequence gets it as it plays.
    """
    rotation = np.asarray(rotation, np.float64)
    keep = float(np.exp(-1.0 / max(fps * seconds, 1e-6)))
    out = np.zeros_like(rotation)
    if len(rotation):
        average = rotation[0].copy()
        for t in range(len(rotation)):
            average = keep * average + (1.0 - keep) * rotation[t]
            out[t] = rotation[t] - average
    return out.astype(np.float32)


def pose_condition_columns(names: Sequence[str], cam_to_world: np.ndarray, reference: np.ndarray,
                           fps: float) -> list[tuple[int, np.ndarray]]:
    """(column, values [T]) of every condition track in ``names`` that follows the head pose, for
    the pose sequence ``cam_to_world`` [T, 4, 4] played in this order at ``fps``."""
    rotation_cols, lag_cols = pose_columns(names), lag_columns(names)
    if not rotation_cols and not lag_cols:
        return []
    rotation = head_rotation_features(cam_to_world, reference)
    out = [(column, rotation[:, axis]) for column, axis in rotation_cols]
    if lag_cols:
        lag = head_lag_features(rotation, fps)
        out += [(column, lag[:, axis]) for column, axis in lag_cols]
    return out


class SubjectData:
    """Training view of a subject at one resolution."""

    def __init__(self, subject_dir: Path | str, resolution: int, motion_features: Sequence[str],
                 device: torch.device | str = "cpu", progress: Optional[Progress] = None,
                 mouth_targets: Sequence[str] = (), pose_corrections: Optional[Tensor] = None):
        """``pose_corrections`` [T, 6]: a run's refinement of the tracked head poses
        (:func:`pose_correction_matrices`), giving :attr:`head_viewmats`; :attr:`viewmats` and the
        motion condition keep the tracked pose that the avatar was trained on."""
        self.subject = Subject(subject_dir)
        self.resolution = resolution
        self.device = torch.device(device)
        m = self.subject.manifest
        tracks = self.subject.tracks
        self.frames, self.masks = self.subject.image_cache(resolution, progress)
        self.plate = self._plate(self.subject.background())
        self.neck_plate = self._plate(self.subject.neck_plate())
        self.K = torch.from_numpy(scaled_intrinsics(tracks["intrinsics"], m.size, resolution)).float().to(self.device)
        self.viewmats = torch.linalg.inv(torch.from_numpy(tracks["cam_to_world"]).double()).float().to(self.device)
        self.head_viewmats = self.viewmats
        """[T, 4, 4] where the whole head goes into each frame (``frame`` and ``plate`` composites):
        the tracker fits the face's landmarks, and a run may align the rest of the head (hair,
        ears) better (:mod:`avatar.train.pose_align`); the ``face`` composite keeps :attr:`viewmats`."""
        if pose_corrections is not None:
            if tuple(pose_corrections.shape) != (len(self.viewmats), 6):
                raise AvatarError(f"the run's pose corrections are for {len(pose_corrections)} frames, the subject has "
                                  f"{len(self.viewmats)}; was it preprocessed again? Train the run again.")
            self.head_viewmats = self.viewmats @ pose_correction_matrices(pose_corrections.float().to(self.device))
        self.valid = tracks["valid"].astype(bool)
        train = self.split("train")
        self.pose_reference = mean_head_rotation(tracks["cam_to_world"][train if len(train) else slice(None)])
        self.motion_features = tuple(str(n) for n in motion_features)
        self.fps = float(m.fps)
        self.cam_to_world = tracks["cam_to_world"]
        self.motion = torch.from_numpy(
            condition_tracks(tracks, motion_features, self.pose_reference, self.fps)).to(self.device)
        self.audio_features = torch.from_numpy(tracks["audio_features"]).float().to(self.device)
        self.mouth_target_names = tuple(str(n) for n in mouth_targets)
        self.mouth_targets = torch.from_numpy(
            mouth_target_tracks(tracks, self.mouth_target_names, train)).to(self.device)
        """[T, K] standardised mouth tracks the audio code is taught to predict; NaN without a face."""
        lips = tracks["landmarks"][:, list(topology.LIPS_OUTER), :2] * (resolution / m.size)
        self.lips = np.nan_to_num(lips)
        self.face_mean = tracks["face_mean"]

    def _plate(self, image: np.ndarray) -> Tensor:
        if image.shape[0] != self.resolution:
            import cv2

            image = cv2.resize(image, (self.resolution, self.resolution), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(image).to(self.device).float() / 255.0

    @property
    def n_frames(self) -> int:
        return self.subject.n_frames

    def split(self, name: str, valid_only: bool = True) -> np.ndarray:
        idx = self.subject.frame_indices(name)
        return idx[self.valid[idx]] if valid_only else idx

    def with_pose(self, motion: Tensor, cam_to_world: np.ndarray) -> Tensor:
        """``motion`` [B, E] with its head-pose columns recomputed for the pose sequence
        ``cam_to_world`` [B, 4, 4] played in this order: poses that are not the subject's own (a
        pose file given to ``avatar render``), or its own frames in a new order (the head lag
        depends on the order)."""
        columns = pose_condition_columns(self.motion_features, cam_to_world, self.pose_reference, self.fps)
        if not columns:
            return motion
        motion = motion.clone()
        for column, values in columns:
            motion[:, column] = torch.from_numpy(np.ascontiguousarray(values)).to(motion)
        return motion

    def mouth_box(self, index: int, pad: float = 0.35) -> tuple[int, int, int, int]:
        pts = self.lips[index]
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        margin = (hi - lo).max() * pad
        x0, y0 = np.floor(lo - margin).astype(int)
        x1, y1 = np.ceil(hi + margin).astype(int)
        r = self.resolution
        return max(0, x0), max(0, y0), min(r, x1), min(r, y1)

    def frame(self, index: int) -> Frame:
        image = torch.from_numpy(self.frames[index]).to(self.device).float() / 255.0
        labels = torch.from_numpy(self.masks[index]).to(self.device)
        torso = (labels == LABEL["torso_neck"])[..., None]
        head = torch.zeros_like(torso)
        for value in HEAD_LABELS:
            head |= (labels == value)[..., None]
        # Behind the head: the neck plate (gaps under a jaw read as neck, not as the wall).
        plate = torch.where(torso, image, torch.where(head, self.neck_plate, self.plate))
        background = frame_background(image, head_feather(head, self.resolution), plate)
        return Frame(
            index=int(index), image=image, background=background, plate_background=plate, head_mask=head.float(),
            skin_mask=(labels == LABEL["face"])[..., None].float(),
            mouth_mask=(labels == LABEL["mouth_interior"])[..., None].float(),
            mouth_box=self.mouth_box(int(index)), viewmat=self.viewmats[index],
            head_viewmat=self.head_viewmats[index], K=self.K, motion=self.motion[index],
        )
