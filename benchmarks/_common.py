"""Helpers shared by the command-line benchmarks: run ``avatar`` as a child process and measure it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


def avatar_cmd(*args: str) -> list[str]:
    """The command line that runs ``avatar ARGS`` with this interpreter."""
    return [sys.executable, "-m", "avatar.cli", *args]


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}"


def machine_info() -> dict:
    """The CPU's model name, its cores, torch's threads and versions, and the GPU when there is one:
    what a kernel timing depends on."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def work_dir(path: Optional[Path], prefix: str = "avatar-bench-") -> Path:
    """``path`` (created if missing), or a fresh temporary directory when it is None."""
    work = path or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def print_report(benchmark: str, results: list[dict]) -> None:
    """The benchmark's JSON on stdout: its name, the machine, Python and one row per case."""
    print(json.dumps({
        "benchmark": benchmark,
        "machine": machine(),
        "python": platform.python_version(),
        "results": results,
    }, indent=2))


def make_sample(work: Path, name: str, duration: float) -> Path:
    """The synthetic sample video of ``duration`` seconds in ``work/name`` (made once)."""
    out = work / name
    video = out / "sample.mp4"
    if not video.exists():
        subprocess.run(avatar_cmd("sample", "-o", str(out), "--duration", str(duration)), check=True)
    return video


def run_measured(cmd: list[str], what: str, log: Path) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log``; (wall seconds, peak resident memory of the child in MB).

    The child's own resource usage comes from ``wait4``, so earlier children do not count.
    Raises SystemExit with the end of the log when it fails.
    """
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss / 1024
