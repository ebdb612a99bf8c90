"""The one speech driver: any speech plus a trained avatar in, per-frame conditions and cameras out.

``avatar render``, the viewer and evaluation all drive the avatar through this module, so a
change to how speech moves the face (new features, another smoothing, blink timing) is made once
and previewed in the viewer exactly as it renders.

Speech is read in blocks of frames, each with a margin of real audio context on both sides, so
block edges see the same audio as an unbroken pass would and memory stays flat however long the
speech is. What speech cannot say (head pose, torso, blinks) comes from the subject
(:mod:`avatar.speak.tracks`).
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from avatar import media
from avatar.audio import compute_audio_features, feature_config_from_manifest
from avatar.models import AvatarModel, FrameCondition
from avatar.models.talking_head import BLINK_NAMES
from avatar.speak.tracks import blink_track, pose_track
from avatar.subject_data import SubjectData


class SpeechSource(Protocol):
    """16 kHz mono speech that can be read in segments (a file on disk, or samples in memory)."""

    @property
    def n_samples(self) -> int: ...

    def segment(self, start: int, count: int) -> np.ndarray:
        """Samples ``[start, start + count)`` as float32; zeros outside the speech."""
        ...


class WavSpeech:
    """A 16-bit 16 kHz mono wav on disk (as :func:`avatar.media.decode_audio_to_wav` writes), read lazily."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        with wave.open(str(self.path), "rb") as wf:
            self._n = wf.getnframes()

    @property
    def n_samples(self) -> int:
        return self._n

    def segment(self, start: int, count: int) -> np.ndarray:
        return media.read_wav_segment(self.path, start, count)


class SampleSpeech:
    """Speech already in memory (an upload in the viewer)."""

    def __init__(self, samples: np.ndarray):
        self.samples = np.asarray(samples, dtype=np.float32)

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    def segment(self, start: int, count: int) -> np.ndarray:
        out = np.zeros(count, np.float32)
        lo, hi = max(start, 0), min(start + count, self.n_samples)
        if hi > lo:
            out[lo - start:hi - start] = self.samples[lo:hi]
        return out


@dataclass
class DriveOptions:
    """How the driver fills in what the speech does not say."""

    pose: str = "loop"
    """``loop``, ``static``, ``static:N`` (hold subject frame N) or a ``.npz`` pose track."""
    blink: str = "auto"
    """``auto``, ``none`` or a ``.npy``/``.npz``/``.txt`` file of per-frame blink values in 0..1."""
    seed: int = 0
    """Seed of the automatic blink timing."""
    block: int = 256
    """Frames per audio-feature block (bounds memory for long speech)."""


@dataclass
class DrivePlan:
    """Everything but the audio codes, for every output frame."""

    subject_frames: np.ndarray
    """[T] subject frame whose torso and background (and camera, without a pose file) go with each frame."""
    motion: Tensor
    """[T, E] the motion condition: the subject frame's tracks, blinks as asked, head rotation of the pose."""
    viewmats: Optional[Tensor]
    """[T, 4, 4] world-to-camera from a pose file, or None: each subject frame's own camera."""

    def viewmat(self, data: SubjectData, t: int) -> Tensor:
        return data.viewmats[int(self.subject_frames[t])] if self.viewmats is None else self.viewmats[t]


@dataclass
class DrivenFrames:
    """Conditions and cameras of consecutive output frames ``start .. start + B - 1``."""

    start: int
    subject_frames: np.ndarray
    """[B] subject frames (torso, background)."""
    condition: FrameCondition
    """audio [B, C_a], motion [B, E]."""
    viewmats: Tensor
    """[B, 4, 4]."""


class SpeechDriver:
    """Turns speech into per-frame conditions for one trained avatar and its subject.

    Args:
        model: the trained avatar (any kind: :class:`avatar.models.AvatarModel`).
        data: its subject at the resolution being rendered, on the model's device.
    """

    def __init__(self, model: AvatarModel, data: SubjectData):
        self.model = model
        self.data = data
        manifest = data.subject.manifest
        self.fps = float(manifest.fps)
        self.feature_config = feature_config_from_manifest(manifest.audio_features)
        names = list(model.motion_features)
        self.blink_columns = [names.index(b) for b in BLINK_NAMES if b in names]

    def n_frames(self, speech: SpeechSource) -> int:
        """Output frames for ``speech``: its duration at the subject's frame rate (at least one)."""
        return max(1, int(round(speech.n_samples / media.AUDIO_RATE * self.fps)))

    # -- what the speech cannot say ----------------------------------------------------------------

    def plan(self, n_frames: int, options: DriveOptions = DriveOptions()) -> DrivePlan:
        """Subject frames, motion condition and cameras of ``n_frames`` output frames.

        Raises:
            InputError: a bad pose or blink spec or file.
        """
        data = self.data
        frames, c2w = pose_track(options.pose, n_frames, data.split("train"), data.n_frames)
        motion = data.motion[torch.from_numpy(np.asarray(frames, np.int64)).to(data.device)].clone()
        if len(self.blink_columns) == len(BLINK_NAMES):
            subject_blinks = data.motion[:, self.blink_columns].cpu().numpy()
            blinks = blink_track(options.blink, n_frames, self.fps, subject_blinks, options.seed)
            motion[:, self.blink_columns] = torch.from_numpy(blinks).to(motion)
        viewmats = None
        if c2w is not None:  # the head turns as the pose file says, and the hair with it
            viewmats = torch.linalg.inv(torch.from_numpy(c2w)).float().to(data.device)
        # The head-lag tracks follow the poses in the order they play (a loop turns back).
        motion = data.with_pose(motion, c2w if c2w is not None else data.cam_to_world[np.asarray(frames)])
        return DrivePlan(np.asarray(frames, np.int64), motion, viewmats)

    # -- what the speech says --------------------------------------------------------------------

    @torch.no_grad()
    def audio_code_blocks(self, speech: SpeechSource, n_frames: int, block: int = 256,
                          margin: int = 8) -> Iterator[tuple[int, Tensor]]:
        """Yield (first frame, codes [B, C_a]) for consecutive blocks of frames of ``speech``.

        Each block's features are computed with ``margin`` frames of real audio context on both
        sides, so block edges see the same audio as an unbroken pass would.
        """
        per_frame = media.AUDIO_RATE / self.fps
        device = self.data.device
        for a in range(0, n_frames, max(1, block)):
            b = min(n_frames, a + max(1, block))
            lo = a - margin
            count = (b - a) + 2 * margin
            samples = speech.segment(int(round(lo * per_frame)), int(math.ceil(count * per_frame)) + 1)
            feats = torch.from_numpy(compute_audio_features(samples, count, self.fps, self.feature_config)).to(device)
            idx = torch.arange(margin, margin + (b - a), device=device)
            yield a, self.model.audio_codes(feats, idx, smooth=True)

    @torch.no_grad()
    def audio_codes(self, speech: SpeechSource, n_frames: int, block: int = 256) -> Tensor:
        """Codes [T, C_a] of every frame of ``speech`` (the viewer holds a whole speech's codes)."""
        return torch.cat([codes for _, codes in self.audio_code_blocks(speech, n_frames, block)])

    def frames(self, speech: SpeechSource, options: DriveOptions = DriveOptions(), batch: int = 8,
               plan: Optional[DrivePlan] = None) -> Iterator[DrivenFrames]:
        """Conditions and cameras of every output frame of ``speech``, ``batch`` frames at a time
        (``plan``: one made beforehand with :meth:`plan`, so that bad options fail early)."""
        plan = plan or self.plan(self.n_frames(speech), options)
        n = len(plan.subject_frames)
        batch = max(1, batch)
        for a, codes in self.audio_code_blocks(speech, n, options.block):
            for b0 in range(0, codes.shape[0], batch):
                ts = list(range(a + b0, a + min(codes.shape[0], b0 + batch)))
                views = torch.stack([plan.viewmat(self.data, t) for t in ts])
                cond = FrameCondition(codes[b0:b0 + len(ts)], plan.motion[ts])
                yield DrivenFrames(ts[0], plan.subject_frames[ts], cond, views)

    # -- the subject's own speech ----------------------------------------------------------------

    @torch.no_grad()
    def subject_condition(self, indices: np.ndarray | list[int]) -> FrameCondition:
        """The true condition of subject frames ``indices`` (their own audio and tracks): what
        evaluation re-renders, and the viewer's "own audio"."""
        idx = torch.as_tensor(np.asarray(indices, np.int64), device=self.data.device)
        codes = self.model.audio_codes(self.data.audio_features, idx, smooth=True)
        return FrameCondition(codes, self.data.motion[idx])
