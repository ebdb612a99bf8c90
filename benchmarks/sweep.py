"""Train variants of one preset side by side on one subject, several seeds each, and print their
validation metrics as JSON: how a training option is judged against the spread of seeds.

One seed cannot tell a change from luck: on the 50 s clip the seed alone moves ``psnr_head`` by
0.65 dB (benchmarks/RESULTS.md). On a CPU, ``--parallel 1`` runs the seeds one after the other; a lent
GPU can hold several runs at once (on the H200, ten fast-preset runs together each reached about
1 500 of their 3 000 steps within one 9-minute call; benchmarks/RESULTS.md).

Each variant is a name and ``--set`` options; every variant trains once per seed with
``avatar train SUBJECT --preset P --device D --no-eval --set seed=S ...``, ``--parallel`` at a time.
At ``--deadline`` seconds the runs still training are interrupted (SIGINT: they save a checkpoint
of the step they reached, which the JSON records) and evaluated as they are. Evaluation runs here
on the val split; ``--no-landmarks`` skips LMD where mediapipe's face mesh is missing (the GPU
machine).

Usage:
  python benchmarks/sweep.py SUBJECT --variant "base" --variant "l2 loss.l1=0.5 loss.l2=10" \\
      --seeds 0,1 [--preset fast] [--device cuda] [--parallel 8] [--threads 2] [--deadline 480] \\
      [--until UNIX_TIME] [--work DIR] [--json OUT.json] [--no-landmarks]

On a lent GPU, take the call's start time first (``T0=$(date +%s)``) and pass ``--until $((T0 + LIMIT - 120))``:
``--deadline`` counts from the sweep's own start, after whatever the call did before it (unpacking
the subject), and the runs still need time to be evaluated before the call's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from _common import avatar_cmd, machine_info, work_dir

KEEP = ("psnr", "psnr_frame", "psnr_plate", "psnr_head", "psnr_head_tracked", "ssim", "lmd", "temporal_psnr_head",
        "head_jitter_px", "region_psnr")


@dataclass
class Job:
    """One training of the sweep: a variant at one seed."""

    variant: str
    seed: int
    sets: list[str]
    run: Path
    log: Path
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    seconds: Optional[float] = None
    returncode: Optional[int] = None
    interrupted: bool = False
    result: dict[str, Any] = field(default_factory=dict)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME key=value ..."`` -> (NAME, [key=value, ...]); the options are ``avatar train --set``'s."""
    name, *sets = text.split()
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"variant {name!r}: {item!r} is not key=value")
        if item.split("=", 1)[0] == "seed":
            raise SystemExit(f"variant {name!r}: seeds come from --seeds")
    return name, sets


def train_command(job: Job, subject: Path, args: argparse.Namespace) -> list[str]:
    cmd = avatar_cmd("train", str(subject), "-o", str(job.run), "--preset", args.preset, "--device", args.device,
                     "--no-eval", "--force", "--set", f"seed={job.seed}", "--set", f"threads={args.threads}")
    if args.iters:
        cmd += ["--iters", str(args.iters)]
    for item in job.sets:
        cmd += ["--set", item]
    return cmd


def _start(cmd: list[str], log: Path, mode: str = "w") -> subprocess.Popen:
    with open(log, mode) as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def eval_command(job: Job, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-one", str(job.run), "--device", args.device,
           "--json", str(job.run.with_suffix(".eval.json"))]
    return cmd + (["--no-landmarks"] if args.no_landmarks else [])


INTERRUPT_GRACE_S = 30.0
"""How long an interrupted training may take to save its checkpoint before it is killed."""


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def run_jobs(jobs: list[Job], subject: Path, args: argparse.Namespace) -> None:
    """Train ``jobs``, ``args.parallel`` processes at a time; each run is evaluated in a process of
    its own as soon as its training ends, so evaluations overlap the trainings still running. At
    the deadline the trainings still running are interrupted and evaluated as they are; jobs never
    started are left out."""
    deadline = time.monotonic() + args.deadline
    if args.until:  # a wall-clock end: what a device call with a fixed limit knows
        deadline = min(deadline, time.monotonic() + args.until - time.time())
    pending = list(jobs)
    training: list[Job] = []
    evaluating: list[tuple[Job, subprocess.Popen]] = []
    while pending or training or evaluating:
        late = time.monotonic() >= deadline
        while pending and not late and len(training) + len(evaluating) < args.parallel:
            job = pending.pop(0)
            job.proc = _start(train_command(job, subject, args), job.log)
            job.started = time.monotonic()
            training.append(job)
        if late:
            for job in pending:
                job.result = {"skipped": "the deadline came before it started"}
            pending.clear()
        for job in list(training):
            if late and job.proc.poll() is None:
                # SIGINT to every run at once (``avatar train`` saves a checkpoint of the step it
                # reached), SIGKILL to one still running after the grace.
                if not job.interrupted:
                    job.interrupted = True
                    _signal(job.proc, signal.SIGINT)
                elif time.monotonic() > deadline + INTERRUPT_GRACE_S:
                    _signal(job.proc, signal.SIGKILL)
            if job.proc.poll() is not None:
                job.returncode = job.proc.returncode
                job.seconds = round(time.monotonic() - job.started, 1)
                training.remove(job)
                evaluating.append((job, _start(eval_command(job, args), job.log, "a")))
        for job, proc in list(evaluating):
            if proc.poll() is not None:
                path = job.run.with_suffix(".eval.json")
                job.result = json.loads(path.read_text()) if path.is_file() else {"error": f"evaluation failed, see {job.log}"}
                evaluating.remove((job, proc))
        time.sleep(1.0)


def evaluate(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Val metrics of the run's newest checkpoint (an error string when there is none)."""
    from avatar.eval.evaluate import evaluate_model
    from avatar.run import load_avatar, resolve_device
    from avatar.subject_data import SubjectData

    try:
        avatar = load_avatar(run, args.device)
    except Exception as err:  # a run that never checkpointed: recorded, the sweep goes on
        return {"error": f"{type(err).__name__}: {err}"}
    data = SubjectData(avatar.subject_dir, avatar.resolution, avatar.model.motion_features,
                       resolve_device(args.device), None)
    metrics = evaluate_model(avatar.model, data, "val", landmarks=not args.no_landmarks)
    return {"step": avatar.step, **{k: metrics.get(k) for k in KEEP}}


def summarise(jobs: list[Job]) -> dict[str, Any]:
    """Per variant: the mean and the spread of the scalar metrics over its seeds that trained to the
    end (an interrupted run stopped early and is listed, not averaged)."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(job.variant for job in jobs):
        rows = [job.result for job in jobs
                if job.variant == variant and "error" not in job.result and not job.interrupted and job.returncode == 0]
        stats: dict[str, Any] = {"seeds": len(rows)}
        for key in ("psnr", "psnr_frame", "psnr_head", "psnr_head_tracked", "temporal_psnr_head", "lmd"):
            values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
            if values:
                stats[key] = {"mean": round(float(np.mean(values)), 3), "min": round(min(values), 3),
                              "max": round(max(values), 3)}
        out[variant] = stats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subject", type=Path, nargs="?")
    parser.add_argument("--eval-one", type=Path, default=None, help=argparse.SUPPRESS)  # one run, into --json
    parser.add_argument("--variant", action="append", help='"NAME key=value ..." (repeatable)')
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds each variant trains with")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--iters", type=int, default=0, help="steps (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds after which training stops")
    parser.add_argument("--until", type=float, default=0.0,
                        help="also stop training at this Unix time (e.g. $(( $(date +%%s) + 420 )) at a device call's start)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-landmarks", action="store_true", help="skip LMD (no mediapipe face mesh)")
    args = parser.parse_args()
    if args.eval_one is not None:
        args.json.write_text(json.dumps(evaluate(args.eval_one, args)))
        return
    if args.subject is None or not args.variant:
        parser.error("give a SUBJECT and at least one --variant")
    if not (args.subject / "subject.json").is_file():
        raise SystemExit(f"{args.subject} is not a preprocessed subject (no subject.json)")
    variants = [parse_variant(text) for text in args.variant]
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("two variants share a name")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = work_dir(args.work, "avatar-sweep-")
    jobs = [Job(name, seed, sets, work / f"{name}_s{seed}", work / f"{name}_s{seed}.log")
            for seed in seeds for name, sets in variants]  # seed-major: a late deadline cuts whole seeds
    started = time.time()
    run_jobs(jobs, args.subject.resolve(), args)
    report = {
        "benchmark": "sweep",
        "machine": machine_info(),
        "subject": str(args.subject),
        "preset": args.preset,
        "device": args.device,
        "parallel": args.parallel,
        "wall_seconds": round(time.time() - started, 1),
        "summary": summarise(jobs),
        "runs": [{"variant": job.variant, "seed": job.seed, "sets": job.sets, "train_seconds": job.seconds,
                  "returncode": job.returncode, "interrupted": job.interrupted, **job.result} for job in jobs],
    }
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    sys.exit(0 if all("error" not in job.result for job in jobs) else 1)


if __name__ == "__main__":
    main()
