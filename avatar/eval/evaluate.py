"""Evaluation of a trained head on a split of its subject (by default the never-trained val split).

Each frame is re-rendered with its true audio, eye tracks, camera and torso, and compared with
the ground truth. The whole frame is scored three ways (:data:`avatar.subject_data.COMPOSITES`):
``psnr`` on ``avatar render``'s default, the rendered face pasted into the frame (the frame's
own hair, ears and background around it); ``psnr_frame`` with the whole rendered head over the
frame's own pixels; ``psnr_plate`` with the whole head over the torso and background plate.
SSIM, LPIPS (where its weights load), the mouth-landmark distance (mediapipe on both images)
and the correlation of the rendered and true inner-lip opening are measured on the default
composite, the video a user gets. What the model itself renders is judged on the whole head:
``psnr_head`` (the head region), ``region_psnr`` and ``region_error_share`` (the squared error
by the subject's label regions: background, torso, face, mouth, hair), ``temporal_psnr_head``
and ``head_jitter_px`` (:class:`avatar.image_metrics.TemporalStability`: flicker and wobble
between consecutive frames).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from avatar import media
from avatar.atomic import check_output_dir, clean_stale, clean_stale_scratch, refuse_overwrite, scratch_dir, write_json_atomic
from avatar.errors import InputError, OutputExistsError
from avatar.eval.drive import DrivingVideo, drive_metrics, load_driving_video
from avatar.eval.landmarks import MouthTracker, inner_lip_opening, lmd, mouth_correlation
from avatar.image_metrics import RegionErrors, TemporalStability, lpips_or_none, psnr, ssim
from avatar.models import AvatarModel, FrameCondition
from avatar.progress import Progress, track
from avatar.run import LoadedAvatar, RunPaths, load_avatar, read_config, resolve_device
from avatar.speak import SpeechDriver
from avatar.speak.render import MAX_SIZE, MIN_SIZE
from avatar.subject import MASK_LEGEND, SubjectPaths, read_manifest
from avatar.subject_data import COMPOSITES, DEFAULT_COMPOSITE, SubjectData

log = logging.getLogger(__name__)


def _u8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().byte().cpu().numpy()


TRACKED = "frame_tracked"
"""The whole head into the frame at the tracked pose, whether or not the run aligned it: what
``psnr_head_tracked`` is measured on."""


@torch.no_grad()
def render_split(model: AvatarModel, data: SubjectData, indices: np.ndarray, progress: Optional[Progress] = None,
                 step_name: str = "evaluate"):
    """Yield (index, {composite: rendered uint8 [H, W, 3]}, the head's alpha [H, W], frame) for
    each index, rendering with its true condition; the dict also holds :data:`TRACKED`.

    The head is rendered over nothing and composited every way of
    :data:`avatar.subject_data.COMPOSITES` (``rgb`` over black is the head premultiplied by its
    alpha): once at the tracked pose, and once more for the whole-head composites where the run
    aligned the frame's head pose (:attr:`avatar.subject_data.Frame.head_viewmat`).
    """
    r = data.resolution
    driver = SpeechDriver(model, data)
    for i in track(indices, step_name, len(indices), progress):
        frame = data.frame(int(i))
        cond = driver.subject_condition([int(i)])
        condition = FrameCondition(cond.audio[0], cond.motion[0])
        out = model.render(condition, frame.viewmat, frame.K, r, r, None)
        tracked = _u8(out["rgb"] + (1 - out["head_alpha"]) * frame.background)
        face = _u8(frame.paste_face(out["rgb"] + (1 - out["head_alpha"]) * frame.background))
        if not torch.equal(frame.head_viewmat, frame.viewmat):
            out = model.render(condition, frame.head_viewmat, frame.K, r, r, None)
        head, alpha = out["rgb"], out["head_alpha"]
        images = {"face": face, "frame": _u8(head + (1 - alpha) * frame.background),
                  "plate": _u8(head + (1 - alpha) * frame.plate_background), TRACKED: tracked}
        yield int(i), images, alpha[..., 0], frame


def evaluate_model(model: AvatarModel, data: SubjectData, split: str = "val", progress: Optional[Progress] = None,
                   landmarks: bool = True, video: Optional[Path] = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` of ``data`` (an :class:`avatar.subject_data.SubjectData`).

    With ``video``, also writes GT | render side by side as an mp4 with the split's audio.
    """
    indices = data.split(split)
    if len(indices) == 0:
        raise ValueError(f"the {split} split has no tracked frames")
    model.eval()
    psnrs: dict[str, list[float]] = {name: [] for name in COMPOSITES}
    head_psnrs, tracked_psnrs, ssims, lpipses = [], [], [], []
    regions = RegionErrors(MASK_LEGEND)
    temporal = TemporalStability(data.resolution)
    start = time.perf_counter()
    render_seconds = 0.0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(_side_by_side_writer(video, data, indices)) if video is not None else None
        # Landmarks are tracked as frames come (two independent trackers), so no split is held in memory.
        pred_track = stack.enter_context(MouthTracker().session()) if landmarks else None
        gt_track = stack.enter_context(MouthTracker().session()) if landmarks else None
        t0 = time.perf_counter()
        for index, images, head_alpha, frame in render_split(model, data, indices, progress):
            render_seconds += time.perf_counter() - t0
            gt = frame.image.cpu()
            gt_u8 = (gt * 255).round().byte().numpy()
            as_float = {name: torch.from_numpy(image).float() / 255.0 for name, image in images.items()}
            for name in COMPOSITES:
                psnrs[name].append(psnr(as_float[name], gt))
            # The video people get is the default composite; what the model renders is judged on
            # the whole head (the face composite shows the frame's own hair).
            pred_u8, pred, whole = images[DEFAULT_COMPOSITE], as_float[DEFAULT_COMPOSITE], as_float["frame"]
            head = frame.head_mask[..., 0].cpu() > 0.5
            if head.any():
                head_psnrs.append(psnr(whole, gt, mask=head))
                tracked_psnrs.append(psnr(as_float[TRACKED], gt, mask=head))
            temporal.add(index, whole, gt, head_alpha, head)
            ssims.append(ssim(pred, gt))
            regions.add(whole, gt, np.asarray(data.masks[frame.index]))
            lp = lpips_or_none(pred, gt)
            if lp is not None:
                lpipses.append(lp)
            if landmarks:
                pred_track.add(pred_u8)
                gt_track.add(gt_u8)
            if writer is not None:
                writer.write(np.concatenate([gt_u8, pred_u8], axis=1))
            t0 = time.perf_counter()
        if landmarks:
            pred_lm, gt_lm = pred_track.landmarks(), gt_track.landmarks()
    metrics: dict[str, Any] = {
        "split": split,
        "composite": DEFAULT_COMPOSITE,
        "psnr": float(np.mean(psnrs[DEFAULT_COMPOSITE])),
        "psnr_frame": float(np.mean(psnrs["frame"])),
        "psnr_plate": float(np.mean(psnrs["plate"])),
        "psnr_head": float(np.mean(head_psnrs)) if head_psnrs else None,
        "psnr_head_tracked": float(np.mean(tracked_psnrs)) if tracked_psnrs else None,
        "ssim": float(np.mean(ssims)),
        "lpips": float(np.mean(lpipses)) if lpipses else None,
        "lmd": None,
        "mouth_corr": None,
        "n_frames": int(len(indices)),
        "render_fps": round(len(indices) / max(render_seconds, 1e-9), 2),
        "resolution": int(data.resolution),
        "device": str(data.device),
        **temporal.result(),
        "region_psnr": regions.psnr(),
        "region_error_share": {k: round(v, 4) for k, v in regions.share().items()},
    }
    if landmarks:
        metrics["lmd"] = lmd(pred_lm, gt_lm, data.resolution)
        metrics["mouth_corr"] = mouth_correlation(inner_lip_opening(pred_lm), inner_lip_opening(gt_lm))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return _finite_or_none(metrics)


def _finite_or_none(value: Any) -> Any:
    """JSON-safe metrics: non-finite floats (an exact region's inf PSNR, a NaN) become None."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and not np.isfinite(value) else value


class _SideBySide:
    """A VideoWriter whose audio (the split's slice of the subject audio) lives in a scratch dir
    named with the pid (see :func:`avatar.atomic.scratch_dir`)."""

    def __init__(self, path: Path, fps: float, audio: np.ndarray):
        self._scratch = scratch_dir("eval")
        self._audio = audio
        self._path, self._fps = path, fps

    def __enter__(self):
        tmp = self._scratch.__enter__()
        try:
            wav = media.write_wav(tmp / "split.wav", self._audio)
            self._writer = media.VideoWriter(self._path, fps=self._fps, audio=wav)
            self._writer.__enter__()
        except BaseException as err:
            self._scratch.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def __exit__(self, *exc) -> None:
        try:
            self._writer.__exit__(*exc)
        finally:
            self._scratch.__exit__(None, None, None)


def _side_by_side_writer(path: Path, data, indices: np.ndarray) -> _SideBySide:
    samples, rate = media.read_wav(data.subject.paths.audio)
    fps = data.subject.manifest.fps
    a, b = int(round(indices[0] / fps * rate)), int(round((indices[-1] + 1) / fps * rate))
    return _SideBySide(Path(path), fps, samples[a:b])


def evaluate_run(run_dir: Path | str, split: str = "val", json_path: Optional[Path | str] = None,
                 video_path: Optional[Path | str] = None, device: str = "auto",
                 progress: Optional[Progress] = None, subject: Optional[Path | str] = None,
                 extra: Optional[dict[str, Any]] = None, step: Optional[int] = None,
                 drive: Sequence[Path | str] = (), drive_size: Optional[int] = None,
                 drive_video_dir: Optional[Path | str] = None) -> dict[str, Any]:
    """Evaluate a run on a split of its subject; optionally write the JSON and a GT | render video.

    Args:
        subject: the run's subject directory, when it has moved since training.
        extra: facts recorded with the metrics (e.g. the training time, from the caller that trained).
        step: the checkpoint to evaluate (default: the newest complete one).
        drive: videos of other people speaking: the avatar says their speech and its lips are
            compared with theirs (:mod:`avatar.eval.drive`); adds ``drive`` (per video) and
            ``cross_mouth_corr`` (their mean) to the metrics.
        drive_size: the side those renders get (default: the training resolution).
        drive_video_dir: write each as real video | avatar there (``drive_STEM.mp4``).

    Raises:
        AvatarError: bad run directory, unknown split, output directory missing or not writable, an
            output that is an input, subject not found, a driving video without face, speech or length.
    """
    read_config(run_dir)  # "not a run" before "RUN/eval_val.mp4 has no directory"
    drives = _unique_paths(drive)
    _check_drive_size(drive_size)
    beside = _side_by_side_paths(drives, drive_video_dir)
    outputs = [Path(out) for out in (json_path, video_path) if out is not None] + beside
    for out in outputs:
        check_output_dir(out)
    if len(outputs) == 2 and (outputs[0].resolve() == outputs[1].resolve()):
        raise OutputExistsError(f"--json and --video both name {outputs[0]}; give them different files.")
    if split not in ("train", "val", "all"):
        raise InputError(f"--split must be train, val or all, got {split!r}.")
    avatar = load_avatar(run_dir, device, step=step, subject=subject)
    for out in outputs:
        refuse_overwrite(out, *drives, *RunPaths(run_dir).inputs(), *SubjectPaths(avatar.subject_dir).inputs())
        clean_stale(out.parent)
    clean_stale_scratch()
    with scratch_dir("drive") as tmp:
        # Every driving video is checked (speech, face, length) before the long renders start.
        fps = read_manifest(avatar.subject_dir).fps
        driving = [load_driving_video(p, fps, tmp / f"speech{i}.wav", progress) for i, p in enumerate(drives)]
        data = SubjectData(avatar.subject_dir, avatar.resolution, avatar.model.motion_features,
                           resolve_device(device), progress, pose_corrections=avatar.pose_corrections)
        metrics = evaluate_model(avatar.model, data, split, progress, video=Path(video_path) if video_path else None)
        if driving:
            size = drive_size or avatar.resolution
            size += size % 2  # the same size with or without --drive-video, whose H.264 needs an even one
            metrics.update(_drive_all(avatar, driving, size, beside, device, progress))
    metrics.update(extra or {})
    metrics["step"] = avatar.step
    if json_path is not None:
        write_json_atomic(Path(json_path), json.dumps(metrics, indent=2))
    return metrics


def _check_drive_size(size: Optional[int]) -> None:
    """Refuse a --drive-size that renders no face or outgrows memory, before anything is loaded."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE):
        raise InputError(f"--drive-size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {size!r}.")


def _unique_paths(paths: Sequence[Path | str]) -> list[Path]:
    """The driving videos in the order given, each once (the same file named twice is measured once)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not any(p.resolve() == q.resolve() for q in out):
            out.append(p)
    return out


def drive_keys(paths: Sequence[Path]) -> list[str]:
    """How the metrics name each driving video: its file name, or the path as given where names clash."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _side_by_side_paths(paths: Sequence[Path], directory: Optional[Path | str]) -> list[Path]:
    """``DIR/drive_STEM.mp4`` per driving video (numbered where stems clash); none without a directory."""
    if directory is None:
        return []
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"The directory {directory} does not exist; create it first.")
    stems = [p.stem for p in paths]
    return [directory / (f"drive_{stem}.mp4" if stems.count(stem) == 1 else f"drive_{stem}_{i + 1}.mp4")
            for i, stem in enumerate(stems)]


def _drive_all(avatar: LoadedAvatar, driving: Sequence[DrivingVideo], size: int, beside: Sequence[Path],
               device: str, progress: Optional[Progress]) -> dict[str, Any]:
    """``drive``: the metrics of each driving video, and ``cross_mouth_corr``: their mean (None if none has one)."""
    data = SubjectData(avatar.subject_dir, size, avatar.model.motion_features, resolve_device(device), progress)
    per_video = {}
    for i, (key, video) in enumerate(zip(drive_keys([d.path for d in driving]), driving)):
        per_video[key] = drive_metrics(avatar.model, data, video, beside[i] if beside else None, progress)
    values = [m["cross_mouth_corr"] for m in per_video.values() if m["cross_mouth_corr"] is not None]
    return {"drive": per_video, "cross_mouth_corr": round(float(np.mean(values)), 4) if values else None}
