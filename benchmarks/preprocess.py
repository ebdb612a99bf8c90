"""Preprocessing speed and memory, end to end through the command line. Prints JSON.

Cases (inputs are generated, nothing is downloaded):
  sample512   the synthetic sample, 512x512 H.264 at 25 fps (24 s)
  hevc1080    the same sample upscaled into a 1080x1920 portrait frame, HEVC (libx265)
  long180     a 3-minute sample (peak memory)
  FILE.mp4    any video path

Usage: python benchmarks/preprocess.py [CASE ...] [--workdir DIR] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from _common import avatar_cmd, make_sample, print_report, run_measured, work_dir


def _make_hevc(work: Path) -> Path:
    from avatar.media import ffmpeg_exe

    src = make_sample(work, "sample24", 24.0)
    dst = work / "hevc1080.mp4"
    if not dst.exists():
        subprocess.run(
            [ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(src), "-vf",
             "scale=1080:1080,pad=1080:1920:0:420:gray", "-c:v", "libx265", "-preset", "fast",
             "-x265-params", "log-level=error", "-tag:v", "hvc1", "-c:a", "copy", str(dst)],
            check=True,
        )
    return dst


def _run_case(name: str, video: Path, work: Path, size: int) -> dict:
    out = work / f"subject_{name}"
    cmd = avatar_cmd("preprocess", str(video), "-o", str(out), "--size", str(size), "--force")
    if out.exists():
        shutil.rmtree(out)
    wall, peak_mb = run_measured(cmd, name, work / f"preprocess_{name}.log")
    manifest = json.loads((out / "subject.json").read_text())
    n = manifest["n_frames"]
    return {
        "case": name,
        "input": str(video),
        "n_frames": n,
        "seconds": round(wall, 2),
        "frames_per_second": round(n / wall, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "valid_share": round(manifest["stats"]["valid_share"], 4),
        "reprojection_error_px": round(manifest["stats"]["reprojection_error_px"], 3),
        "step_seconds": manifest["stats"]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=["sample512", "hevc1080"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    work = work_dir(args.workdir)
    results = []
    for case in args.cases:
        if case == "sample512":
            video = make_sample(work, "sample24", 24.0)
        elif case == "hevc1080":
            video = _make_hevc(work)
        elif case == "long180":
            video = make_sample(work, "sample180", 180.0)
        else:
            video = Path(case)
            case = video.stem
        results.append(_run_case(case, video, work, args.size))
    print_report("preprocess", results)


if __name__ == "__main__":
    main()
