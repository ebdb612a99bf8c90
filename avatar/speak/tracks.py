"""What speech cannot say, borrowed from the subject: which subject frame (head pose, torso,
background) goes with each output frame, and when the eyes blink.

* head pose, torso and background: ``loop`` walks the training frames forwards then backwards
  (no jump at the turn), ``static`` holds one frame, or a pose file;
* blinks: ``auto`` places blinks at intervals drawn from the subject's own blink timing, using
  the shapes of its own blinks; ``none`` keeps the eyes open; or a per-frame file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from avatar.errors import InputError


def loop_indices(train: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """``n`` subject frames walking ``train`` forwards then backwards (ping-pong), from ``start``."""
    if len(train) == 1:
        return np.repeat(train, n)
    cycle = np.concatenate([train, train[-2:0:-1]])
    return cycle[(start + np.arange(n)) % len(cycle)]


def pose_track(spec: str, n: int, train: np.ndarray, n_subject: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Subject frame per output frame (torso, background, brows), and optional camera overrides.

    Returns:
        frame indices [n], and cam_to_world [n, 4, 4] when the pose comes from a file (else None).

    Raises:
        InputError: unknown spec, unreadable or malformed pose file.
    """
    if spec == "loop":
        return loop_indices(train, n), None
    if spec == "static" or spec.startswith("static:"):
        frame = int(train[0]) if spec == "static" else int(spec.split(":", 1)[1])
        if not 0 <= frame < n_subject:
            raise InputError(f"--pose {spec}: the subject has frames 0..{n_subject - 1}.")
        return np.full(n, frame), None
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        raise InputError(f"--pose must be loop, static, static:N or an existing .npz file, got {spec!r}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            c2w = np.asarray(data["cam_to_world"], np.float64)
            frames = np.asarray(data["frame_index"]) if "frame_index" in data.files else None
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"{path} is not a pose track with a 'cam_to_world' [F,4,4] array ({err}).") from None
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or len(c2w) == 0:
        raise InputError(f"{path}: cam_to_world must have shape [F, 4, 4], got {c2w.shape}.")
    take = np.minimum(np.arange(n), len(c2w) - 1)  # hold the last pose past the file's end
    if frames is None:
        frames = loop_indices(train, n)
    else:
        frames = np.clip(frames[np.minimum(np.arange(n), len(frames) - 1)], 0, n_subject - 1)
    return frames.astype(int), c2w[take]


def blink_events(track: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """(start, stop) frame ranges where a 0..1 blink track is above ``threshold``."""
    above = np.concatenate([[False], track > threshold, [False]])
    edges = np.flatnonzero(np.diff(above.astype(int)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def auto_blinks(subject_blink: np.ndarray, n: int, fps: float, seed: int = 0) -> np.ndarray:
    """A natural blink track [n, 2] for new speech, learned from the subject's own [T, 2].

    Intervals between blinks are drawn from the subject's (or, with fewer than two blinks, from
    a typical 2-6 s range); each blink reuses the profile of one of the subject's blinks.
    """
    rng = np.random.default_rng(seed)
    mean_track = subject_blink.mean(axis=1)
    events = blink_events(mean_track)
    base = np.percentile(subject_blink, 10, axis=0)
    out = np.tile(base, (n, 1)).astype(np.float32)
    starts = [a for a, _ in events]
    gaps = np.diff(starts) / fps if len(starts) >= 2 else np.array([])
    gaps = gaps[gaps > 0.5]
    profiles = []
    for a, b in events:
        lo, hi = max(0, a - 2), min(len(subject_blink), b + 2)
        profiles.append(subject_blink[lo:hi])
    if not profiles:  # a subject that never blinked: a 5-frame closure
        profiles = [np.array([[0.3, 0.3], [0.8, 0.8], [1.0, 1.0], [0.8, 0.8], [0.3, 0.3]], np.float32)]
    t = rng.uniform(0.5, 3.0)
    while True:
        frame = int(t * fps)
        if frame >= n:
            break
        prof = profiles[rng.integers(len(profiles))]
        stop = min(n, frame + len(prof))
        out[frame:stop] = np.maximum(out[frame:stop], prof[: stop - frame])
        t += float(rng.choice(gaps)) if len(gaps) else rng.uniform(2.0, 6.0)
    return out


def blink_track(spec: str, n: int, fps: float, subject_blink: np.ndarray, seed: int) -> np.ndarray:
    """Per-frame blink values [n, 2] (left, right) for ``--blink``.

    Raises:
        InputError: unknown spec or unreadable file.
    """
    if spec == "auto":
        return auto_blinks(subject_blink, n, fps, seed)
    if spec == "none":
        return np.tile(np.percentile(subject_blink, 10, axis=0), (n, 1)).astype(np.float32)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--blink must be auto, none or an existing file, got {spec!r}.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                values = np.asarray(data[data.files[0]], np.float32)
        elif path.suffix == ".npy":
            values = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            values = np.loadtxt(path, dtype=np.float32)
    except (OSError, ValueError, IndexError) as err:
        raise InputError(f"{path} is not a readable blink track ({err}).") from None
    values = values.reshape(len(values), -1)
    if values.shape[1] == 1:
        values = np.repeat(values, 2, axis=1)
    if values.shape[1] != 2 or len(values) == 0:
        raise InputError(f"{path}: expected [T] or [T, 2] blink values, got {values.shape}.")
    return np.clip(values[np.minimum(np.arange(n), len(values) - 1)], 0, 1)
