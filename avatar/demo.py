"""The main job on the built-in sample, for a newcomer: every step of the toolkit in one call.

``sample`` -> ``preprocess`` -> ``train --preset fast`` -> ``render`` a second, unseen utterance
-> ``eval`` on the held-out frames. Each step is the same library function the command line uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from avatar.progress import Progress


@dataclass
class DemoConfig:
    size: int = 256
    """Preprocessing (and so training) resolution: 256 keeps the CPU demo within minutes."""
    duration_s: float = 24.0
    """Length of the training sample."""
    speech_seed: int = 1
    """Seed of the second utterance the avatar is made to say."""
    speech_duration_s: float = 8.0
    preset: str = "fast"
    iterations: Optional[int] = None
    """Training iterations (default: the preset's)."""
    device: str = "auto"
    audio_features: str = "whisper"
    """Speech features of the subject (see ``avatar preprocess --audio-features``)."""
    align_poses: bool = False
    """Align the held-out frames' head poses at the end of training (``pose_align``). The demo's
    video pastes the face at the tracked pose, which the alignment does not touch; it would only
    change the whole-head figures of the eval, for about 70 s of the 10 minutes (measured:
    10 min 11 s with it, psnr_head 34.66 against 34.33 dB)."""


@dataclass
class DemoResult:
    out_dir: Path
    video: Path
    metrics_json: Path
    metrics: dict[str, Any]
    step_seconds: dict[str, float] = field(default_factory=dict)


def run_demo(out_dir: Path | str, config: DemoConfig = DemoConfig(), progress: Optional[Progress] = None) -> DemoResult:
    """Run the whole pipeline on the synthetic sample into ``out_dir`` (resumes finished steps)."""
    from avatar.eval import evaluate_run
    from avatar.preprocess.pipeline import PreprocessConfig, preprocess
    from avatar.run import RunPaths
    from avatar.sample import SampleConfig, make_sample
    from avatar.speak import RenderOptions, render_speech
    from avatar.train import load_config, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        value = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    sample = timed("sample", lambda: make_sample(out / "sample", SampleConfig(seed=0, duration_s=config.duration_s), progress))
    speech = timed("speech", lambda: make_sample(
        out / "speech", SampleConfig(seed=config.speech_seed, duration_s=config.speech_duration_s, size=128), progress))
    subject = out / "subject"
    features = PreprocessConfig(size=config.size, audio_features=config.audio_features)
    timed("preprocess", lambda: preprocess(sample.video, subject, features, force=True, progress=progress))
    run = out / "run"
    overrides = {"iterations": config.iterations} if config.iterations else None
    paths = RunPaths(run)
    if paths.config.exists():
        done = paths.latest_checkpoint() or 0
        if done < load_config(run).iterations:
            timed("train", lambda: train(subject, run, resume=True, overrides=overrides, device=config.device,
                                         progress=progress))
    else:
        fresh = {**(overrides or {}), **({} if config.align_poses else {"pose_align": {"steps": 0}})}
        timed("train", lambda: train(subject, run, preset=config.preset, overrides=fresh or None, device=config.device,
                                     progress=progress))
    video = out / "avatar_says_new_speech.mp4"
    timed("render", lambda: render_speech(run, speech.audio, video, RenderOptions(device=config.device), progress))
    metrics_json = out / "metrics.json"
    metrics = timed("eval", lambda: evaluate_run(run, "val", metrics_json, out / "val_gt_vs_render.mp4",
                                                 device=config.device, progress=progress))
    return DemoResult(out_dir=out, video=video, metrics_json=metrics_json, metrics=metrics, step_seconds=seconds)
