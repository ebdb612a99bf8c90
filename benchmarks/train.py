"""Training time and peak memory, end to end through the command line. Prints JSON.

Cases:
  long180     a 3-minute synthetic sample (4500 frames), preprocessed at 512 (made once in the
              work dir): the issue's memory case
  SUBJECT     any preprocessed subject directory

Each case runs ``avatar train CASE -o RUN --model M --preset P [--iters N]`` in a child process, after
deleting the subject's frame cache at the training size so that building it is measured too,
and reports the child's wall time and peak resident memory with the run's metrics.json.

Usage: python benchmarks/train.py [CASE ...] [--model gaussian|ngp] [--preset fast] [--iters N] [--device cpu]
                                  [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import avatar_cmd, make_sample, print_report, run_measured, work_dir


def _long_subject(work: Path) -> Path:
    subject = work / "subject_sample180"
    if not (subject / "subject.json").is_file():
        video = make_sample(work, "sample180", 180.0)
        run_measured(avatar_cmd("preprocess", str(video), "-o", str(subject), "--force"), "preprocess",
                     work / "preprocess_sample180.log")
    return subject


def _run_case(name: str, subject: Path, work: Path, args: argparse.Namespace) -> dict:
    from avatar.configs.presets import preset_overrides

    resolution = preset_overrides(args.preset, args.model).get("resolution", 256)
    for cached in (subject / ".cache").glob(f"*_{resolution}.u8"):
        cached.unlink()
    run = work / f"run_{name}_{args.model}_{args.preset}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = avatar_cmd("-v", "train", str(subject), "-o", str(run), "--model", args.model, "--preset", args.preset,
                     "--device", args.device)
    if args.iters:
        cmd += ["--iters", str(args.iters)]
    wall, peak_mb = run_measured(cmd, f"train {name}", work / f"train_{name}_{args.preset}.log")
    manifest = json.loads((subject / "subject.json").read_text())
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    keep = ("psnr", "psnr_head", "psnr_head_tracked", "ssim", "lmd", "mouth_corr", "n_frames", "steps", "train_seconds",
            "n_gaussians")
    return {
        "case": name,
        "subject": str(subject),
        "subject_frames": manifest["n_frames"],
        "model": args.model,
        "preset": args.preset,
        "resolution": resolution,
        "seconds": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        **{f"val_{k}" if k in ("psnr", "psnr_head", "psnr_head_tracked", "ssim", "lmd", "mouth_corr", "n_frames")
           else k: metrics.get(k)
           for k in keep},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=["long180"])
    parser.add_argument("--model", default="gaussian", choices=("gaussian", "ngp"))
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--iters", type=int, default=0, help="Training iterations (0: the preset's).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = work_dir(args.workdir)
    results = []
    for case in args.cases:
        if case == "long180":
            results.append(_run_case(case, _long_subject(work), work, args))
        else:
            results.append(_run_case(Path(case).name, Path(case), work, args))
    print_report("train", results)


if __name__ == "__main__":
    main()
