"""Make a trained avatar say new speech: any audio file in, an mp4 of the person saying it out.

The speech is decoded to a temporary 16 kHz wav; :class:`avatar.speak.driver.SpeechDriver` turns
it into per-frame conditions block by block, the avatar renders them in batches, and the frames go
straight into the video encoder, so memory stays flat however long the speech is.

The output is checked before any work: its directory exists and is writable, and it is none of the
inputs (``-o`` naming the speech would encode over the file being read). The temporary wav lives
in a scratch directory named with the pid, so what a killed render leaves is removed by the next.
"""

from __future__ import annotations

import logging
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from avatar import media
from avatar.atomic import check_output_dir, clean_stale, clean_stale_scratch, refuse_overwrite, scratch_dir
from avatar.errors import InputError
from avatar.progress import Progress, null_progress, report_status
from avatar.run import RunPaths, load_avatar, resolve_device
from avatar.speak.driver import DriveOptions, DrivePlan, SpeechDriver, SpeechSource, WavSpeech
from avatar.subject import SubjectPaths
from avatar.subject_data import COMPOSITES, DEFAULT_COMPOSITE, SubjectData

log = logging.getLogger(__name__)


@dataclass
class RenderOptions:
    """How ``avatar render`` fills in what the speech does not say."""

    pose: str = "loop"
    """``loop``, ``static``, ``static:N`` (hold subject frame N) or a ``.npz`` pose track."""
    blink: str = "auto"
    """``auto``, ``none`` or a ``.npy``/``.npz``/``.txt`` file of per-frame blink values in 0..1."""
    size: Optional[int] = None
    """Output resolution in pixels (default: the training resolution)."""
    batch: int = 8
    """Frames whose conditions and deformations are computed together."""
    block: int = 256
    """Frames per audio-feature block (bounds memory for long speech)."""
    seed: int = 0
    """Seed of the automatic blink timing."""
    background: str = DEFAULT_COMPOSITE
    """What each output frame is made of: ``face`` (the rendered face pasted into the subject
    frame, its hair and background kept), ``frame`` (the whole rendered head over the subject
    frame's own pixels) or ``plate`` (the whole head over its torso and the background plate);
    see :data:`avatar.subject_data.COMPOSITES`. With a pose file, ``face`` renders as ``frame``:
    the frame's hair belongs to the frame's pose, not the file's."""
    device: str = "auto"
    crf: int = 18
    subject: Optional[Path] = None
    """The run's subject directory, when it has moved since training (``--subject``)."""
    step: Optional[int] = None
    """The checkpoint to render (``--step``; default: the newest complete one)."""


@dataclass
class RenderSummary:
    output: Path
    n_frames: int
    duration_s: float
    seconds: float
    render_fps: float
    resolution: int
    device: str


def check_speech(wav: Path, source: Path) -> None:
    """Refuse silent speech: the avatar would stand with its mouth shut."""
    with wave.open(str(wav), "rb") as wf:
        n = wf.getnframes()
    peak = 0.0
    step = media.AUDIO_RATE * 30
    for start in range(0, n, step):
        seg = media.read_wav_segment(wav, start, min(step, n - start))
        peak = max(peak, float(np.abs(seg).max(initial=0.0)))
    if peak < 1e-3:
        raise InputError(f"{source} is silent; give a recording of speech.")


MIN_SIZE, MAX_SIZE = 16, 4096


def check_size(size: Optional[int]) -> None:
    """Refuse a size that renders no face (``--size 0``, ``--size -8``) or outgrows memory, before
    anything is loaded.

    Raises:
        InputError: a size outside :data:`MIN_SIZE`..:data:`MAX_SIZE`.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE):
        raise InputError(f"--size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {size!r}.")


def output_size(requested: Optional[int], trained: int) -> int:
    """The rendered side: H.264 yuv420p needs an even one, so an odd size is rounded up, with a note."""
    size = trained if requested is None else requested
    check_size(size)
    if size % 2:
        log.warning("Rendering at %d px: H.264 (yuv420p) needs an even size, %d was asked for.", size + 1, size)
        size += 1
    return size


def _check_inputs(run_dir: Path, speech: Path, output: Path, options: RenderOptions, subject_dir: Path) -> None:
    """Refuse an output that is one of the render's inputs (the speech, a pose or blink file, the run, the subject)."""
    pose = Path(options.pose) if options.pose.lower().endswith(".npz") else None
    blink = None if options.blink in ("auto", "none") else Path(options.blink)
    refuse_overwrite(output, speech, pose, blink, *RunPaths(run_dir).inputs(), *SubjectPaths(subject_dir).inputs())


# -- the whole render -----------------------------------------------------------------------


@torch.no_grad()
def rendered_batches(driver: SpeechDriver, speech: SpeechSource, plan: DrivePlan, batch: int = 8,
                     block: int = 256, background: str = DEFAULT_COMPOSITE) -> Iterator[tuple[np.ndarray, float]]:
    """The avatar saying ``speech`` as planned: uint8 frames [B, S, S, 3] at the driver's subject
    resolution, batch after batch, each with the seconds its deformation and rasterization took
    (the audio codes' time is not counted: that is the render speed people compare).

    ``background``: one of :data:`avatar.subject_data.COMPOSITES`; ``face`` with a pose file
    (``plan.viewmats``) composites as ``frame``."""
    data, model, size = driver.data, driver.model, driver.data.resolution
    if background not in COMPOSITES:
        raise ValueError(f"background must be one of {', '.join(COMPOSITES)}, got {background!r}")
    paste = background == "face" and plan.viewmats is None
    under = "plate" if background == "plate" else "frame"
    for driven in driver.frames(speech, DriveOptions(block=block), batch, plan):
        t0 = time.perf_counter()
        subject_frames = [data.frame(int(i)) for i in driven.subject_frames]
        backgrounds = torch.stack([f.over(under) for f in subject_frames])
        views = driven.viewmats
        if not paste and plan.viewmats is None:  # the whole head goes where the frame's head is
            views = data.head_viewmats[torch.as_tensor(driven.subject_frames, device=views.device)]
        frames = model.render_many(driven.condition, views, data.K, size, size, backgrounds)
        if paste:
            frames = torch.stack([f.paste_face(rendered) for f, rendered in zip(subject_frames, frames)])
        images = (frames.clamp(0, 1) * 255).round().byte().cpu().numpy()
        yield images, time.perf_counter() - t0


@torch.no_grad()
def render_speech(run_dir: Path | str, speech: Path | str, output: Path | str,
                  options: RenderOptions = RenderOptions(), progress: Optional[Progress] = None) -> RenderSummary:
    """Render the run's avatar saying ``speech`` into ``output`` (H.264 + AAC mp4).

    Raises:
        AvatarError: bad run, unreadable/silent/empty speech, bad pose or blink spec, output
            directory missing, subject not found. Nothing is left at ``output`` on failure.
    """
    speech, output = Path(speech), Path(output)
    check_output_dir(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"{output} should end in .mp4.")
    if options.batch < 1:
        raise InputError(f"--batch must be at least 1, got {options.batch}.")
    if options.background not in COMPOSITES:
        raise InputError(f"--background must be one of {', '.join(COMPOSITES)}, got {options.background!r}.")
    check_size(options.size)
    avatar = load_avatar(run_dir, options.device, step=options.step, subject=options.subject)
    _check_inputs(Path(run_dir), speech, output, options, avatar.subject_dir)
    size = output_size(options.size, avatar.resolution)
    clean_stale(output.parent)
    clean_stale_scratch()
    model, device = avatar.model, resolve_device(options.device)
    report = progress or null_progress
    start_time = time.perf_counter()
    with scratch_dir("render") as tmp:
        wav = tmp / "speech.wav"
        duration = media.decode_audio_to_wav(speech, wav)
        check_speech(wav, speech)
        data = SubjectData(avatar.subject_dir, size, model.motion_features, device, progress,
                           pose_corrections=avatar.pose_corrections)
        driver = SpeechDriver(model, data)
        n = max(1, int(round(duration * driver.fps)))
        plan = driver.plan(n, DriveOptions(pose=options.pose, blink=options.blink, seed=options.seed,
                                           block=options.block))
        if options.background == "face" and plan.viewmats is not None:
            log.info("A pose file moves the head away from the subject frames' poses: the whole head is rendered "
                     "(--background frame), not only the face.")
        report("render", 0, n)
        rendered = 0
        render_seconds = 0.0
        with media.VideoWriter(output, fps=driver.fps, audio=speech, crf=options.crf) as writer:
            for images, seconds in rendered_batches(driver, WavSpeech(wav), plan, options.batch, options.block,
                                                    options.background):
                render_seconds += seconds
                for image in images:
                    writer.write(image)
                rendered += len(images)
                report_status(progress, "render", f"{rendered / max(render_seconds, 1e-9):.1f} frames/s")
                report("render", rendered, n)
    seconds = time.perf_counter() - start_time
    return RenderSummary(output=output, n_frames=rendered, duration_s=duration, seconds=seconds,
                         render_fps=rendered / max(render_seconds, 1e-9), resolution=size, device=str(device))
