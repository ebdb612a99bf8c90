"""The C++ (CPU) and CUDA kernels of ray marching and compositing: loading, ctypes calls, autograd.

Why kernels: the PyTorch twins in :mod:`avatar.render.raymarch` are vectorised over a dense
[rays, steps] grid and over padded [rays, samples] matrices, so they do work (and allocate memory)
for every candidate step and every padding slot. A per-ray loop visits each candidate once and stops
at the ray's end, at ``max_samples`` or, when compositing, at the stop transmittance.

The sources (``csrc/raymarch_cpu.cpp``, ``cuda_ext/raymarch.cu``) have a C ABI and no torch headers;
:mod:`avatar.render._build` compiles them on first use and caches them. Both libraries export the
same symbols; the CUDA launchers take the current stream as a trailing ``void*`` instead of a thread
count. Each loader is memoised, so a failed build warns once and returns None for the process.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from avatar.render._build import CUDA_SOURCE_DIR, cpu_kernel, cuda_kernel

_CPU_SOURCE = Path(__file__).with_name("csrc") / "raymarch_cpu.cpp"
_CUDA_SOURCE = CUDA_SOURCE_DIR / "raymarch.cu"
_ABI_SYMBOL = "avatar_raymarch_abi_version"
_ABI_VERSION = 1
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _declare(lib: ctypes.CDLL, cuda: bool) -> ctypes.CDLL:
    """Set the argtypes of every entry point. The CPU calls end with a thread count; the CUDA ones
    with the stream, and the CUDA backward takes a workspace before it."""
    ptr, i64, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    last = ptr if cuda else ctypes.c_int
    signatures = {
        "avatar_march_count": [ptr] * 7 + [i64, i64, ptr, last],
        "avatar_march_fill": [ptr] * 7 + [i64, i64] + [ptr] * 5 + [last],
        "avatar_composite_fwd": [ptr] * 5 + [i64, i64, dbl] + [ptr] * 3 + [last],
        "avatar_composite_bwd": [ptr] * 5 + [i64, i64, dbl] + [ptr] * (6 if cuda else 5) + [last],
    }
    for suffix in _DTYPES.values():
        for name, args in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = args
            fn.restype = ctypes.c_int
    return lib


@functools.cache
def load_cpu() -> ctypes.CDLL | None:
    """The C++ kernel, compiled on first call; None (after one warning) when it cannot be built."""
    lib = cpu_kernel("avatar_raymarch_cpu", _CPU_SOURCE, _ABI_SYMBOL, _ABI_VERSION, "ray marching")
    return None if lib is None else _declare(lib, cuda=False)


@functools.cache
def load_cuda() -> ctypes.CDLL | None:
    """The CUDA kernel, compiled on first call; None without CUDA, or (after one warning) when it
    cannot be built."""
    if not torch.cuda.is_available():
        return None
    lib = cuda_kernel("avatar_raymarch_cuda", _CUDA_SOURCE, _ABI_SYMBOL, _ABI_VERSION, "ray marching")
    return None if lib is None else _declare(lib, cuda=True)


def cpu_available(dtype: torch.dtype) -> bool:
    """Whether the C++ kernel supports ``dtype`` and builds (compiles on first call)."""
    return dtype in _DTYPES and load_cpu() is not None


def cuda_available(dtype: torch.dtype) -> bool:
    """Whether CUDA is usable, the CUDA kernel supports ``dtype`` and builds (compiles on first call)."""
    return dtype in _DTYPES and load_cuda() is not None


def _lib_and_last(device: torch.device) -> tuple[ctypes.CDLL, int | None]:
    """The library for ``device`` and the trailing argument of its calls (threads or stream)."""
    if device.type == "cuda":
        lib = load_cuda()
        assert lib is not None, "the CUDA ray marching kernel is not available; check cuda_available() first"
        return lib, torch.cuda.current_stream(device).cuda_stream
    lib = load_cpu()
    assert lib is not None, "the C++ ray marching kernel is not available; check cpu_available() first"
    return lib, torch.get_num_threads()


def _call(lib: ctypes.CDLL, name: str, dtype: torch.dtype, *args) -> None:
    rc = getattr(lib, f"{name}_{_DTYPES[dtype]}")(*args)
    if rc != 0:
        raise RuntimeError(f"{name} failed with error code {rc} (a cudaError_t on CUDA)")


def _p(t: Tensor) -> int:
    return t.data_ptr()


def march(
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    occupancy: Tensor,  # [Gx, Gy, Gz] bool
    params: Tensor,  # [7]: lo (3), scale (3), step
    max_samples: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kernel twin of :func:`avatar.render.raymarch._march_rays` on ``origins.device``.

    Inputs must be contiguous, on one device, in one float dtype (float32/float64); the caller
    (:func:`avatar.render.raymarch.march_rays`) checks that.

    Returns:
        ts [S], deltas [S], ray_ids [S] int64, offsets [R+1] int64, positions [S, 3].
    """
    lib, last = _lib_and_last(origins.device)
    dtype, n_rays = origins.dtype, origins.shape[0]
    dims = torch.tensor(occupancy.shape, dtype=torch.int64, device=origins.device)
    occ = occupancy.view(torch.uint8)
    inputs = [_p(t) for t in (origins, dirs, near, far, occ, dims, params)]
    counts = torch.empty(n_rays, dtype=torch.int64, device=origins.device)
    _call(lib, "avatar_march_count", dtype, *inputs, n_rays, max_samples, _p(counts), last)
    offsets = torch.zeros(n_rays + 1, dtype=torch.int64, device=origins.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    n_samples = int(offsets[-1])  # a device sync on CUDA: the outputs' size
    ts = origins.new_empty(n_samples)
    deltas = origins.new_empty(n_samples)
    ray_ids = torch.empty(n_samples, dtype=torch.int64, device=origins.device)
    positions = origins.new_empty(n_samples, 3)
    _call(lib, "avatar_march_fill", dtype, *inputs, n_rays, max_samples, _p(offsets),
          _p(ts), _p(deltas), _p(ray_ids), _p(positions), last)
    return ts, deltas, ray_ids, offsets, positions


class _Composite(torch.autograd.Function):
    """Kernel forward and backward of compositing (the backward re-runs each ray, nothing per
    sample is saved but the inputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        sigmas: Tensor,  # [S]
        rgbs: Tensor,  # [S, C]
        deltas: Tensor,  # [S]
        ts: Tensor,  # [S]
        offsets: Tensor,  # [R+1]
        stop_transmittance: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        lib, last = _lib_and_last(sigmas.device)
        n_rays, channels = offsets.shape[0] - 1, rgbs.shape[1]
        rgb = rgbs.new_empty(n_rays, channels)
        opacity = rgbs.new_empty(n_rays)
        depth = rgbs.new_empty(n_rays)
        _call(lib, "avatar_composite_fwd", sigmas.dtype, _p(sigmas), _p(rgbs), _p(deltas), _p(ts), _p(offsets),
              n_rays, channels, stop_transmittance, _p(rgb), _p(opacity), _p(depth), last)
        ctx.save_for_backward(sigmas, rgbs, deltas, ts, offsets)
        ctx.stop_transmittance = stop_transmittance
        return rgb, opacity, depth

    @staticmethod
    def backward(ctx, g_rgb: Tensor, g_opacity: Tensor, g_depth: Tensor):  # type: ignore[override]
        sigmas, rgbs, deltas, ts, offsets = ctx.saved_tensors
        lib, last = _lib_and_last(sigmas.device)
        n_rays, channels = offsets.shape[0] - 1, rgbs.shape[1]
        g_rgb, g_opacity, g_depth = (g.contiguous() for g in (g_rgb, g_opacity, g_depth))  # zeros when unused
        grad_sigmas = torch.zeros_like(sigmas)  # samples after a ray's stop get no gradient
        grad_rgbs = torch.zeros_like(rgbs)
        args = [_p(sigmas), _p(rgbs), _p(deltas), _p(ts), _p(offsets), n_rays, channels, ctx.stop_transmittance,
                _p(g_rgb), _p(g_opacity), _p(g_depth), _p(grad_sigmas), _p(grad_rgbs)]
        if sigmas.device.type == "cuda":
            args.append(_p(torch.empty_like(sigmas)))  # workspace: the transmittance before each sample
        _call(lib, "avatar_composite_bwd", sigmas.dtype, *args, last)
        return grad_sigmas, grad_rgbs, None, None, None, None


def composite(
    sigmas: Tensor,  # [S]
    rgbs: Tensor,  # [S, C]
    deltas: Tensor,  # [S]
    ts: Tensor,  # [S]
    offsets: Tensor,  # [R+1]
    stop_transmittance: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel twin of :func:`avatar.render.raymarch._composite_rays` on ``sigmas.device``
    (contiguous inputs of one float dtype, checked by the caller).

    Returns:
        rgb [R, C], opacity [R], depth [R]; differentiable w.r.t. sigmas and rgbs.
    """
    return _Composite.apply(sigmas, rgbs, deltas, ts, offsets, stop_transmittance)
