"""Speed of avatar.render.raymarch (marching, compositing forward and forward+backward), printed as JSON.

    python benchmarks/raymarch.py [--reps 7] [--rays 16384] [--grid 64]

The scene stands in for one training batch of an instant-NGP head: ``--rays`` random pixels of a
256x256 crop seen by a pinhole camera 3.5 units in front of the centre of the [-1, 1]^3 box,
framed so that the head fills most of the crop (about half of the rays hit it). The occupancy
grid (``--grid``^3) is set inside a head-sized ellipsoid (about 15 % of the cells); the step is
chosen so that rays that hit the head get about 64 samples on average (``max_samples`` 1024).
Densities rise from 0 at the ellipsoid's surface to 400 at its centre, so most rays that hit the
head stop early (stop transmittance 1e-4); colours have 3 channels. The figures are printed for
all torch threads and for one thread.

"march" is :func:`march_rays`; "composite_forward" is :func:`composite_rays` under
``torch.no_grad()``; "composite_forward_backward" is :func:`composite_rays` plus ``backward`` of a
random linear loss on rgb, opacity and depth to sigmas and rgbs. After one warm-up call per
implementation (which also compiles a kernel the first time), implementations are timed in turn,
rep after rep, so that a burst of load from other processes hits them alike; each figure is the
median (``*_ms``) and the fastest (``*_min_ms``) of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
from _common import machine_info

from avatar.render import _raymarch_kernels
from avatar.render.raymarch import composite_rays, march_rays, ray_aabb

RADII = (0.62, 0.78, 0.6)
"""Half-axes of the head ellipsoid in the [-1, 1]^3 box: 4/3 pi abc / 8 = 15 % of the volume."""


def scene(n_rays: int, grid: int, device: torch.device, seed: int = 0) -> dict:
    """Rays, box and occupancy grid of the benchmark."""
    g = torch.Generator().manual_seed(seed)
    width = 256
    focal = (width / 2) * 3.5 / 0.85  # the crop's half-height is 0.85 units at the head's centre
    pix = torch.randint(0, width * width, (n_rays,), generator=g)
    u = (pix % width).double() + torch.rand(n_rays, generator=g, dtype=torch.float64)
    v = (pix // width).double() + torch.rand(n_rays, generator=g, dtype=torch.float64)
    dirs = torch.stack([(u - width / 2) / focal, (v - width / 2) / focal, torch.ones(n_rays, dtype=torch.float64)], -1)
    origins = torch.tensor([0.0, 0.0, -3.5], dtype=torch.float64).expand(n_rays, 3)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * 2 - 1
    x, y, z = torch.meshgrid(centres, centres, centres, indexing="ij")
    radius = ((x / RADII[0]) ** 2 + (y / RADII[1]) ** 2 + (z / RADII[2]) ** 2).sqrt()
    occupancy = radius <= 1.0
    return {"origins": origins.float().contiguous().to(device), "dirs": dirs.float().to(device),
            "aabb": aabb.to(device), "occupancy": occupancy.to(device)}


def density(positions: torch.Tensor) -> torch.Tensor:
    radii = torch.tensor(RADII, device=positions.device, dtype=positions.dtype)
    radius = (positions / radii).norm(dim=-1)
    return 400.0 * (1.0 - radius).clamp_min(0.0)


def choose_step(sc: dict) -> float:
    """The step that gives rays hitting the head about 64 samples each."""
    near, far = ray_aabb(sc["origins"], sc["dirs"], sc["aabb"])
    probe = march_rays(sc["origins"], sc["dirs"], near, far, sc["occupancy"], sc["aabb"], 0.01, 100_000)
    counts = probe.offsets.diff()
    mean_hit = counts[counts > 0].float().mean().item()
    return 0.01 * mean_hit / 64.0


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run(device: torch.device, impls: list[str], n_rays: int, grid: int, reps: int) -> list[dict]:
    sc = scene(n_rays, grid, device)
    step = choose_step(sc)
    near, far = ray_aabb(sc["origins"], sc["dirs"], sc["aabb"])
    samples = march_rays(sc["origins"], sc["dirs"], near, far, sc["occupancy"], sc["aabb"], step, 1024,
                         implementation="torch")
    sigmas = density(samples.positions)
    g = torch.Generator().manual_seed(1)
    rgbs = torch.rand(samples.n_samples, 3, generator=g).to(device)
    cots = [torch.randn(shape, generator=g).to(device) for shape in ((n_rays, 3), (n_rays,), (n_rays,))]

    def march(impl: str) -> Callable[[], object]:
        return lambda: march_rays(sc["origins"], sc["dirs"], near, far, sc["occupancy"], sc["aabb"], step, 1024,
                                  implementation=impl)

    def forward(impl: str) -> Callable[[], object]:
        def fn() -> None:
            with torch.no_grad():
                composite_rays(sigmas, rgbs, samples.deltas, samples.ts, samples.offsets, implementation=impl)
        return fn

    def forward_backward(impl: str) -> Callable[[], object]:
        def fn() -> None:
            s, c = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
            outs = composite_rays(s, c, samples.deltas, samples.ts, samples.offsets, implementation=impl)
            sum((o * cot).sum() for o, cot in zip(outs, cots)).backward()
        return fn

    cases = {"march": march, "composite_forward": forward, "composite_forward_backward": forward_backward}
    times: dict[tuple[str, str], list[float]] = {(case, impl): [] for case in cases for impl in impls}
    for case, make in cases.items():
        for impl in impls:
            timed(make(impl), device)  # warm-up (and the kernel's first build)
        for _ in range(reps):
            for impl in impls:
                times[case, impl].append(timed(make(impl), device))

    with torch.no_grad():
        _, opacity, _ = composite_rays(sigmas, rgbs, samples.deltas, samples.ts, samples.offsets)
    counts = samples.offsets.diff()
    shared = {
        "device": device.type, "rays": n_rays, "grid": grid,
        "occupied_fraction": round(sc["occupancy"].float().mean().item(), 3), "step": round(step, 5),
        "samples": samples.n_samples, "rays_hit": int((counts > 0).sum()),
        "samples_per_hit_ray": round(samples.n_samples / max(int((counts > 0).sum()), 1), 1),
        "mean_opacity_hit_rays": round(opacity[counts > 0].mean().item(), 3), "threads": torch.get_num_threads(),
    }
    rows = []
    for case in cases:
        row = {"case": case, **shared}
        for impl in impls:
            row[f"{impl}_ms"] = round(1000 * statistics.median(times[case, impl]), 2)
            row[f"{impl}_min_ms"] = round(1000 * min(times[case, impl]), 2)
        for impl in impls:
            if impl != "torch" and "torch" in impls:
                row[f"speedup_{impl}_vs_torch"] = round(row["torch_min_ms"] / row[f"{impl}_min_ms"], 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed runs per figure")
    parser.add_argument("--rays", type=int, default=16384, help="rays per batch")
    parser.add_argument("--grid", type=int, default=64, help="occupancy grid resolution")
    args = parser.parse_args(argv)

    results = []
    cpu_impls = ["torch"] + (["cpp"] if _raymarch_kernels.cpu_available(torch.float32) else [])
    threads = torch.get_num_threads()
    # Also single-threaded: a figure that another process on a second core distorts less.
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        results += run(torch.device("cpu"), cpu_impls, args.rays, args.grid, args.reps)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        cuda_impls = ["torch"] + (["cuda"] if _raymarch_kernels.cuda_available(torch.float32) else [])
        results += run(torch.device("cuda"), cuda_impls, args.rays, args.grid, args.reps)

    print(json.dumps({
        "benchmark": "raymarch",
        "machine": machine_info(),
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "*_ms: median, *_min_ms: fastest of the runs; speedups are ratios of the fastest runs",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
