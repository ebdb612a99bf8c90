"""Render speed and lip motion of a trained run. Prints JSON.

Usage: python benchmarks/render.py RUN --audio SPEECH [--sizes 256 512] [--workdir DIR]

For each size: `avatar render` of SPEECH (pose loop, auto blinks) timed end to end, with the
render-only frames/s the command reports. Lip motion: mediapipe tracks the mouth in the rendered
video at the training size; the inner-lip opening is correlated with the speech envelope at the
best lag within +-4 frames (a frozen or random mouth scores about 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _common import work_dir


def main() -> None:
    from avatar import media
    from avatar.eval.landmarks import MouthTracker, audio_envelope, inner_lip_opening, lip_sync_correlation
    from avatar.speak import RenderOptions, render_speech

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = work_dir(args.workdir, prefix="avatar-render-bench-")
    results = []
    lip = None
    for i, size in enumerate(args.sizes):
        out = work / f"render_{size}.mp4"
        t0 = time.perf_counter()
        summary = render_speech(args.run, args.audio, out, RenderOptions(size=size, device=args.device))
        wall = time.perf_counter() - t0
        results.append({"size": size, "frames": summary.n_frames, "render_fps": round(summary.render_fps, 2),
                        "end_to_end_fps": round(summary.n_frames / wall, 2), "seconds": round(wall, 2),
                        "device": summary.device})
        if i == 0:
            frames = list(media.iter_frames(out))
            opening = inner_lip_opening(MouthTracker().track(frames))
            samples = media.load_audio(args.audio)
            env = audio_envelope(samples, 25.0, len(frames))
            corr, lag = lip_sync_correlation(opening, env, max_lag=4)
            lip = {"size": size, "mouth_vs_envelope_corr": round(float(corr), 3), "best_lag_frames": int(lag),
                   "tracked_share": round(float(np.isfinite(opening).mean()), 3)}
    print(json.dumps({
        "benchmark": "render",
        "run": str(args.run),
        "speech": str(args.audio),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}",
        "render": results,
        "lip_motion": lip,
    }, indent=2))


if __name__ == "__main__":
    main()
