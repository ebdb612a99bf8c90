"""Make a trained avatar say new speech: any audio file in, an mp4 of the person saying it out.

The speech is decoded to a temporary 16 kHz wav; :class:`avatar.speak.driver.SpeechDriver` turns
it into per-frame conditions block by block, the avatar renders them in batches, and the frames go
straight into the video encoder, so memory stays flat however long the speech is.
"""

from __future__ import annotations

import logging
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from avatar import media
from avatar.errors import InputError
from avatar.progress import Progress, null_progress, report_status
from avatar.run import load_avatar, resolve_device
from avatar.speak.driver import DriveOptions, SpeechDriver, WavSpeech
from avatar.subject_data import SubjectData

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
    device: str = "auto"
    crf: int = 18
    subject: Optional[Path] = None
    """The run's subject directory, when it has moved since training (``--subject``)."""


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


# -- the whole render -----------------------------------------------------------------------


@torch.no_grad()
def render_speech(run_dir: Path | str, speech: Path | str, output: Path | str,
                  options: RenderOptions = RenderOptions(), progress: Optional[Progress] = None) -> RenderSummary:
    """Render the run's avatar saying ``speech`` into ``output`` (H.264 + AAC mp4).

    Raises:
        AvatarError: bad run, unreadable/silent/empty speech, bad pose or blink spec, output
            directory missing, subject not found. Nothing is left at ``output`` on failure.
    """
    speech, output = Path(speech), Path(output)
    if not output.parent.is_dir():
        raise InputError(f"The directory {output.parent} does not exist; create it first.")
    if output.suffix.lower() != ".mp4":
        raise InputError(f"{output} should end in .mp4.")
    avatar = load_avatar(run_dir, options.device, subject=options.subject)
    model, device = avatar.model, resolve_device(options.device)
    report = progress or null_progress
    start_time = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avatar-render-") as tmp:
        wav = Path(tmp) / "speech.wav"
        duration = media.decode_audio_to_wav(speech, wav)
        check_speech(wav, speech)
        size = options.size or avatar.resolution
        data = SubjectData(avatar.subject_dir, size, model.motion_features, device, progress)
        driver = SpeechDriver(model, data)
        n = max(1, int(round(duration * driver.fps)))
        plan = driver.plan(n, DriveOptions(pose=options.pose, blink=options.blink, seed=options.seed,
                                           block=options.block))
        report("render", 0, n)
        rendered = 0
        render_seconds = 0.0
        with media.VideoWriter(output, fps=driver.fps, audio=speech, crf=options.crf) as writer:
            for batch in driver.frames(WavSpeech(wav), DriveOptions(block=options.block), options.batch, plan):
                t0 = time.perf_counter()
                backgrounds = torch.stack([data.frame(int(i)).background for i in batch.subject_frames])
                outs = model.render_many(batch.condition, batch.viewmats, data.K, size, size, backgrounds)
                images = (outs.clamp(0, 1) * 255).round().byte().cpu().numpy()
                render_seconds += time.perf_counter() - t0
                for image in images:
                    writer.write(image)
                rendered += len(images)
                report_status(progress, "render", f"{rendered / max(render_seconds, 1e-9):.1f} frames/s")
                report("render", rendered, n)
    seconds = time.perf_counter() - start_time
    return RenderSummary(output=output, n_frames=rendered, duration_s=duration, seconds=seconds,
                         render_fps=rendered / max(render_seconds, 1e-9), resolution=size, device=str(device))
