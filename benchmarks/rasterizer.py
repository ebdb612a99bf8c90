"""Speed of avatar.render.rasterize (forward and forward+backward), printed as JSON.

    python benchmarks/rasterizer.py [--reps 7] [--no-torch] [--no-dense]

"forward_backward" is one training-style step: ``rasterize`` (projection, binning, compositing)
plus ``backward`` of a random linear loss on rgb and alpha to every input; "forward" is the same
call under ``torch.no_grad()``. After one warm-up call per backend (which also compiles the C++
kernel the first time), the backends of a configuration are timed in turn, rep after rep, so
that a burst of load from other processes hits them alike; each figure is the median (``*_ms``)
and the fastest (``*_min_ms``) of ``--reps`` runs. On a shared machine the fastest run is the best
estimate of the unloaded time.

The scene stands in for a talking head: Gaussians on and inside a head-sized ellipsoid 2.5 units
in front of the camera (about 55% of the image width), on-screen standard deviations around
1.5 px at 256 px with 20k Gaussians (the world size shrinks as 1/sqrt(N) so coverage is the same
at every N), opacities uniform in [0.1, 0.99], random orientations.

The dense comparison renders every pixel against every Gaussian (tests/render/dense_reference.py,
autograd); it only fits in memory for small images, so it runs at 96x96 and 128x128 (about
4 GB at 128x128 with 4k Gaussians).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from _common import machine_info

from avatar.render import _cpu_kernel, rasterize

ROOT = Path(__file__).resolve().parents[1]


def head_scene(n: int, width: int, height: int, seed: int = 0) -> list[torch.Tensor]:
    """[means, quats, scales, opacities, colors, viewmats, Ks] of the benchmark scene."""
    g = torch.Generator().manual_seed(seed)
    center = torch.tensor([0.0, 0.0, 2.5])
    radii = torch.tensor([0.45, 0.6, 0.45])
    dirs = torch.randn(n, 3, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    on_shell = torch.rand(n, generator=g) < 0.7
    shell_r = 1.0 - 0.05 * torch.rand(n, generator=g)
    r = torch.where(on_shell, shell_r, torch.rand(n, generator=g) ** (1 / 3))  # uniform in volume
    means = center + dirs * radii * r[:, None]
    quats = torch.randn(n, 4, generator=g)
    base = 0.012 * math.sqrt(20000 / n)  # world units; 1.5 px on screen at 256 px, 20k
    scales = base * torch.exp(0.5 * torch.randn(n, 3, generator=g))
    opacities = 0.1 + 0.89 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    f = 1.2 * width
    Ks = torch.tensor([[[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]])
    viewmats = torch.eye(4)[None]
    return [means, quats, scales, opacities, colors, viewmats, Ks]


def time_renderers(
    renderers: dict[str, Callable], n: int, width: int, height: int, reps: int,
    with_forward: bool = True,
) -> dict[str, dict]:
    """Time each ``render(means, quats, scales, opacities, colors, viewmats, Ks, W, H)`` on the
    benchmark scene, interleaved rep by rep. Returns per-renderer figures in ms."""
    means, quats, scales, opacities, colors, viewmats, Ks = head_scene(n, width, height)
    params = [t.requires_grad_() for t in (means, quats, scales, opacities, colors)]
    g = torch.Generator().manual_seed(1)
    cot_rgb = torch.randn(1, height, width, 3, generator=g)
    cot_alpha = torch.randn(1, height, width, 1, generator=g)
    info: dict[str, dict] = {name: {} for name in renderers}

    def step(name: str) -> float:
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        out = renderers[name](*params, viewmats, Ks, width, height)
        loss = (out[0] * cot_rgb).sum() + (out[1] * cot_alpha).sum()
        loss.backward()
        elapsed = time.perf_counter() - t0
        if len(out) > 2 and isinstance(out[2], dict):
            info[name] = {"n_isects": out[2].get("n_isects"),
                          "alpha_mean": round(out[1].mean().item(), 3)}
        return elapsed

    def forward(name: str) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            renderers[name](*params, viewmats, Ks, width, height)
        return time.perf_counter() - t0

    times: dict[str, dict[str, list[float]]] = {name: {"fb": [], "fw": []} for name in renderers}
    for name in renderers:  # warm-up
        step(name)
    for _ in range(reps):
        for name in renderers:
            times[name]["fb"].append(step(name))
            if with_forward:
                times[name]["fw"].append(forward(name))

    def ms(values: list[float], fn: Callable) -> float:
        return round(1000.0 * fn(values), 1)

    out = {}
    for name in renderers:
        row = {"forward_backward_ms": ms(times[name]["fb"], statistics.median),
               "forward_backward_min_ms": ms(times[name]["fb"], min)}
        if with_forward:
            row.update(forward_ms=ms(times[name]["fw"], statistics.median),
                       forward_min_ms=ms(times[name]["fw"], min))
        out[name] = {**row, **info[name]}
    return out


def load_dense() -> Callable:
    path = ROOT / "tests" / "render" / "dense_reference.py"
    spec = importlib.util.spec_from_file_location("dense_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render_dense


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed runs per figure")
    parser.add_argument("--no-torch", action="store_true", help="skip the pure-PyTorch backend")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    args = parser.parse_args(argv)

    def backend(name: str) -> Callable:
        return lambda *a: rasterize(*a, backend=name)

    names = ["cpu"] if _cpu_kernel.available() else []
    if not args.no_torch:
        names.append("torch")
    own = {name: backend(name) for name in names}

    results = []
    threads = torch.get_num_threads()
    # The target configuration also single-threaded: a figure that another process on the
    # second core distorts less (two-thread PyTorch ops wait for their slower thread).
    for width, n, n_threads in ((256, 20000, threads), (256, 20000, 1), (512, 50000, threads)):
        torch.set_num_threads(n_threads)
        timings = time_renderers(own, n, width, width, args.reps)
        for name, timing in timings.items():
            row = {"backend": name, "width": width, "height": width, "n_gaussians": n,
                   "threads": n_threads, "reps": args.reps, **timing}
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    torch.set_num_threads(threads)

    dense_rows = []
    if not args.no_dense:
        everyone = {"dense": load_dense(), **own}
        for width, n in ((96, 3000), (128, 4000)):
            reps = min(args.reps, 3)  # a dense step takes seconds
            timings = time_renderers(everyone, n, width, width, reps, with_forward=False)
            row = {"width": width, "height": width, "n_gaussians": n,
                   "pairs_dense": width * width * n, "reps": reps}
            for name, timing in timings.items():
                row[f"{name}_ms"] = timing["forward_backward_ms"]
                row[f"{name}_min_ms"] = timing["forward_backward_min_ms"]
            for name in own:
                # Ratio of the fastest runs: the least disturbed by other processes.
                row[f"speedup_{name}_vs_dense"] = round(
                    row["dense_min_ms"] / row[f"{name}_min_ms"], 1)
            dense_rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    report = {
        "benchmark": "rasterizer",
        "machine": machine_info(),
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "*_ms: median, *_min_ms: fastest of the runs; forward_backward = rasterize + "
                "backward to all inputs; other processes may share the CPU (see load average)",
        "target": {"config": "256x256, 20k Gaussians, CPU forward+backward", "ms": 300},
        "results": results,
        "dense_comparison": dense_rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
