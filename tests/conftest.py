"""Shared fixtures: small synthetic videos made on the fly (no downloaded data)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import numpy as np
import pytest

from avatar import media

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/NAME.py`` (a script, not a package) for the tests of its helpers, with
    ``benchmarks/`` on the path for its ``_common`` import; undone afterwards (a generator, for a
    fixture to ``yield from``)."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"avatar_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(BENCHMARKS))


def tone(seconds: float, rate: int = media.AUDIO_RATE, freq: float = 180.0) -> np.ndarray:
    """A syllable-like amplitude-modulated tone (speech stand-in for tests)."""
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t)
    return (0.3 * env * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_test_video(path: Path, frame_fn: Callable[[int], np.ndarray], n_frames: int, fps: float = 25.0,
                     audio_seconds: Optional[float] = None) -> Path:
    """Encode ``frame_fn(i)`` for i < n_frames to an mp4, with a tone track unless audio_seconds == 0."""
    wav = None
    if audio_seconds is None:
        audio_seconds = n_frames / fps
    if audio_seconds > 0:
        wav = path.with_suffix(".wav")
        media.write_wav(wav, tone(audio_seconds))
    media.write_video(path, (frame_fn(i) for i in range(n_frames)), fps=fps, audio=wav)
    return path


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """The public-domain astronaut portrait, RGB uint8 [512, 512, 3]."""
    from skimage import data

    return data.astronaut()


def moving_portrait(image: np.ndarray, size: int = 256) -> Callable[[int], np.ndarray]:
    """Frames of ``image`` resized to ``size`` and shifted by a few pixels over time."""
    import cv2

    base = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)

    def frame(i: int) -> np.ndarray:
        dx = 3.0 * np.sin(i / 9.0)
        dy = 2.0 * np.sin(i / 13.0)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        return cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REFLECT)

    return frame


@pytest.fixture(scope="session")
def small_subject(tmp_path_factory):
    """A short synthetic sample preprocessed at 128 px: (sample paths, subject dir).

    Shared by the training, rendering and evaluation tests (about 10 s to build).
    """
    from avatar.preprocess.pipeline import PreprocessConfig, preprocess
    from avatar.sample import SampleConfig, make_sample

    root = tmp_path_factory.mktemp("small_subject")
    paths = make_sample(root / "sample", SampleConfig(seed=0, duration_s=6.0, size=256))
    # mel, not the default whisper: the few-step runs trained on it keep the behaviour their tests
    # were measured on (mediapipe found no face in a 256 px --drive render of the 6-step run on a
    # whisper subject); whisper subjects are trained in tests/train and by the end-to-end demo test.
    preprocess(paths.video, root / "subject", PreprocessConfig(size=128, audio_features="mel"))
    return paths, root / "subject"


TINY_TRAIN = {
    "resolution": 64,
    "static_iterations": 2,
    "smooth_audio_after": 4,
    "checkpoint_every": 3,
    "preview_every": 3,
    "log_every": 1,
    "model": {"init": {"n_face": 300, "n_head": 300, "n_mouth": 60}},
    "strategy": {"refine_start_iter": 2, "refine_every": 2, "refine_stop_iter": 100, "max_gaussians": 2000},
}
"""Training options for runs that only need to exist: a few iterations at 64 px."""


def tiny_train(iterations: int) -> dict:
    return {**TINY_TRAIN, "iterations": iterations}


@pytest.fixture(scope="session")
def tiny_run(small_subject, tmp_path_factory):
    """A run trained for 6 iterations on the small subject (render, eval, export, viewer tests)."""
    from avatar.train import train

    _, subject = small_subject
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train(subject, run, overrides=tiny_train(6), device="cpu")
    return run


@pytest.fixture(scope="session")
def dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer's leftovers are named with)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
