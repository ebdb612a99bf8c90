"""Lip sync across speakers: trained runs driven by real videos of other people. Prints JSON.

Usage: python benchmarks/lipsync.py RUN [RUN ...] [--drive VIDEO ...] [--size N] [--device auto]

For every run and driving video: the avatar says the video's speech (pose loop, auto blinks, seed
0) and its inner-lip opening is correlated with the real person's at the best offset within +-80 ms
(``cross_mouth_corr``, the measure of ``avatar eval --drive``; 1 = the lips follow the real ones
exactly, 0 = unrelated). Default videos: the clips in ../shared/data/real next to the repository,
when present. Each run also reports its self-driven val ``mouth_corr`` and ``psnr`` from
RUN/metrics.json (null when the run has none) and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from _common import print_report

SHARED_CLIPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
"""Where the project keeps real talking-head clips (outside the repository; may be absent)."""


def default_videos() -> list[Path]:
    """The video clips (not the audio-only files) in :data:`SHARED_CLIPS`, when present."""
    return sorted(SHARED_CLIPS.glob("*.mp4")) if SHARED_CLIPS.is_dir() else []


def self_driven(run: Path) -> dict[str, Any]:
    """``mouth_corr`` and ``psnr`` of the run's val split, from the metrics written after training."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {"val_mouth_corr": None, "val_psnr": None}
    return {"val_mouth_corr": metrics.get("mouth_corr"), "val_psnr": metrics.get("psnr")}


def bench_run(run: Path, videos: list[Path], size: Optional[int], device: str, scratch: Path,
              checked: dict) -> dict[str, Any]:
    """Drive one run with every video; one row with the per-video results and their mean.

    ``checked`` keeps each video's decoded speech and real mouth across runs of the same fps
    (``seconds`` per video is the avatar's rendering and tracking; the row's, everything).
    """
    from avatar.eval.drive import drive_metrics, load_driving_video
    from avatar.eval.evaluate import drive_keys
    from avatar.run import load_avatar, resolve_device
    from avatar.subject_data import SubjectData

    t0 = time.perf_counter()
    avatar = load_avatar(run, device)
    data = SubjectData(avatar.subject_dir, size or avatar.resolution, avatar.model.motion_features,
                       resolve_device(device))
    per_video = {}
    fps = data.subject.manifest.fps
    for key, video in zip(drive_keys(videos), videos):
        if (video, fps) not in checked:
            checked[video, fps] = load_driving_video(video, fps, scratch / f"speech{len(checked)}.wav")
        per_video[key] = drive_metrics(avatar.model, data, checked[video, fps])
    values = [m["cross_mouth_corr"] for m in per_video.values() if m["cross_mouth_corr"] is not None]
    return {"run": str(run), "step": avatar.step, "size": data.resolution, "drive": per_video,
            "cross_mouth_corr": round(float(np.mean(values)), 4) if values else None,
            **self_driven(run), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    from avatar.atomic import scratch_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--drive", type=Path, nargs="+", default=None,
                        help=f"driving videos [default: the clips in {SHARED_CLIPS}]")
    parser.add_argument("--size", type=int, default=None, help="render side [default: each run's training one]")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    videos = args.drive or default_videos()
    if not videos:
        raise SystemExit(f"no driving video: give --drive VIDEO (there is no {SHARED_CLIPS}).")
    with scratch_dir("bench") as scratch:
        checked: dict = {}
        rows = [bench_run(run, videos, args.size, args.device, scratch, checked) for run in args.runs]
    print_report("lipsync", rows)


if __name__ == "__main__":
    main()
