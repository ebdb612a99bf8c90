"""Speed of avatar.render.triplane_encode per implementation (forward, backward), printed as JSON.

    python benchmarks/triplane.py [--reps 15] [--points 20000 65536]

The encoding is the default :class:`TriPlaneConfig` (8 levels of 16..256 cells, 2 features,
log2_hashmap_size 14: 6 dense levels and 2 hashed, 173k table rows, float32), the points uniform
in the unit cube: one call per training step of the deformation field, one point per Gaussian
(20k) or per ray sample of a batch (65k).

For each size and gradient case ("table": gradient to the tables only, as for frozen positions;
"table+coords": to the positions too) and each implementation: "forward" is the call under
``torch.no_grad()``, "backward" is ``out.backward(cot)`` of a fixed random cotangent after a
forward with the graph, "forward_backward" their sum in one run. After one warm-up call per
implementation (which also compiles a kernel the first time), implementations are timed in turn,
rep after rep, so that a burst of load from other processes hits them alike; each figure is the
median (``*_ms``) and the fastest (``*_min_ms``) of ``--reps`` runs, and ``speedup_*`` the ratio
of the torch twin's fastest run to the kernel's. The CPU figures are printed for all torch
threads and for one thread (a figure that another process on the second core distorts less).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from _common import machine_info

from avatar.models.encodings import TriPlaneConfig, TriPlaneEncoding
from avatar.render.triplane import kernel_unavailable, triplane_encode


def run(device: torch.device, impls: list[str], n_points: int, grads: str, reps: int) -> list[dict]:
    """Time each implementation on one batch; one row per implementation."""
    enc = TriPlaneEncoding(TriPlaneConfig()).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc.embeddings.copy_(torch.rand(enc.embeddings.shape, generator=g) * 2e-4 - 1e-4)
    coords = torch.rand(n_points, 3, generator=g).to(device)
    cot = torch.randn(n_points, 3, enc.config.n_levels, enc.config.features_per_level, generator=g).to(device)
    layout = (enc.resolutions, enc.offsets, enc.n_dense, enc.config.log2_hashmap_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(impl: str) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            triplane_encode(coords, enc.embeddings, *layout, implementation=impl)
        sync()
        return time.perf_counter() - t0

    def forward_backward(impl: str) -> tuple[float, float]:
        enc.embeddings.grad = None
        x = coords.detach().requires_grad_(grads == "table+coords")
        sync()
        t0 = time.perf_counter()
        out = triplane_encode(x, enc.embeddings, *layout, implementation=impl)
        sync()
        t1 = time.perf_counter()
        out.backward(cot)
        sync()
        return t1 - t0, time.perf_counter() - t1

    times: dict[str, dict[str, list[float]]] = {i: {"fw": [], "fwg": [], "bw": [], "fb": []} for i in impls}
    for impl in impls:  # warm-up
        forward(impl)
        forward_backward(impl)
    for _ in range(reps):
        for impl in impls:
            times[impl]["fw"].append(forward(impl))
            fwg, bw = forward_backward(impl)
            times[impl]["fwg"].append(fwg)
            times[impl]["bw"].append(bw)
            times[impl]["fb"].append(fwg + bw)

    rows = []
    for impl in impls:
        t = times[impl]
        row = {"device": device.type, "implementation": impl, "n_points": n_points, "grads": grads,
               "threads": torch.get_num_threads() if device.type == "cpu" else None, "reps": reps}
        for key, name in (("fw", "forward"), ("bw", "backward"), ("fb", "forward_backward")):
            row[f"{name}_ms"] = round(1000 * statistics.median(t[key]), 2)
            row[f"{name}_min_ms"] = round(1000 * min(t[key]), 2)
        rows.append(row)
    base = rows[0]  # torch
    for row in rows[1:]:
        for name in ("forward", "backward", "forward_backward"):
            row[f"speedup_{name}"] = round(base[f"{name}_min_ms"] / row[f"{name}_min_ms"], 1)
    for row in rows:
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed runs per figure")
    parser.add_argument("--points", type=int, nargs="+", default=[20000, 65536], help="batch sizes")
    args = parser.parse_args(argv)

    probe = torch.zeros(1, 3), torch.zeros(1, 2)
    cpu_impls = ["torch"] + (["cpp"] if kernel_unavailable("cpp", *probe) is None else [])
    results = []
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        for n_points in args.points:
            for grads in ("table", "table+coords"):
                results += run(torch.device("cpu"), cpu_impls, n_points, grads, args.reps)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        probe = torch.zeros(1, 3, device="cuda"), torch.zeros(1, 2, device="cuda")
        cuda_impls = ["torch"] + (["cuda"] if kernel_unavailable("cuda", *probe) is None else [])
        for n_points in args.points:
            for grads in ("table", "table+coords"):
                results += run(torch.device("cuda"), cuda_impls, n_points, grads, args.reps)

    print(json.dumps({
        "benchmark": "triplane",
        "machine": machine_info(),
        "config": "TriPlaneConfig() defaults: 8 levels 16..256, F=2, log2_hashmap_size 14 (6 dense), float32",
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "*_ms: median, *_min_ms: fastest of the runs; speedups are ratios of the fastest runs "
                "(torch twin / kernel); other processes may share the CPU (see load average)",
        "target": "C++ forward+backward >= 5x faster than the torch twin on the 2-core CPU",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
