"""The tri-plane encoding's kernels (C++ CPU and CUDA): loaded with ctypes, autograd-wrapped.

Why kernels: the PyTorch twin (:func:`avatar.render.triplane._triplane_encode`) materialises
every (corner, level, plane, point) index and weight, about 25 tensors of ``12 L M`` elements per
call, and its backward scatters through ``index_add_``. One loop over points that computes a
point's cells, reads its four corners and writes its features keeps everything in registers:
see benchmarks/RESULTS.md ("Tri-plane encoding kernels") for the speed-up.

Sources: ``csrc/triplane_cpu.cpp`` (plain C++17, std::thread) and ``cuda_ext/triplane.cu``
(plain CUDA C++, launchers taking raw device pointers and a stream). Neither includes a torch
header; :mod:`avatar.render._build` compiles and caches them on first use. Both must match the
twin in both passes (tests/render/test_triplane_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from avatar.render._build import CUDA_SOURCE_DIR, cpu_kernel, cuda_kernel

_CPU_SOURCE = Path(__file__).with_name("csrc") / "triplane_cpu.cpp"
_CUDA_SOURCE = CUDA_SOURCE_DIR / "triplane.cu"
_ABI_VERSION = 1
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

@functools.cache
def load_cpu() -> ctypes.CDLL | None:
    """Compile (once per source version and machine) and load the C++ kernel; None on failure
    (after a warning). Memoised: one attempt per process."""
    lib = cpu_kernel("avatar_triplane_cpu", _CPU_SOURCE, "avatar_triplane_abi_version", _ABI_VERSION,
                     "the tri-plane encoding")
    if lib is None:
        return None
    ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _SUFFIX.values():
        fwd = getattr(lib, f"avatar_triplane_fwd_{suffix}")
        fwd.argtypes = [ptr] * 4 + [i64] * 6 + [ptr, cint, cint]
        fwd.restype = cint
        bwd = getattr(lib, f"avatar_triplane_bwd_{suffix}")
        bwd.argtypes = [ptr] * 4 + [i64] * 6 + [ptr] * 3 + [cint, cint]
        bwd.restype = cint
    return lib


@functools.cache
def load_cuda() -> ctypes.CDLL | None:
    """Compile and load the CUDA kernel; None (after a warning) when it does not build. Only
    called once ``torch.cuda.is_available()``: nvcc on PATH does not make a GPU."""
    lib = cuda_kernel("avatar_triplane_cuda", _CUDA_SOURCE, "avatar_triplane_cuda_abi_version", _ABI_VERSION,
                      "the tri-plane encoding")
    if lib is None:
        return None
    ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _SUFFIX.values():
        fwd = getattr(lib, f"avatar_triplane_cuda_fwd_{suffix}")
        fwd.argtypes = [ptr] * 4 + [i64] * 6 + [ptr, ptr]
        fwd.restype = cint
        bwd = getattr(lib, f"avatar_triplane_cuda_bwd_{suffix}")
        bwd.argtypes = [ptr] * 4 + [i64] * 6 + [ptr] * 3 + [ptr]
        bwd.restype = cint
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc == 1:
        raise ValueError(f"the tri-plane {what} kernel rejected its sizes or table layout (a level's rows "
                         "reach outside the table, or a size is out of range)")
    if rc != 0:
        raise RuntimeError(f"the tri-plane {what} kernel failed (code {rc})")


class _TriPlaneEncode(torch.autograd.Function):
    """Kernel forward, kernel backward (recomputing cells and weights; nothing per point saved)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        coords: Tensor,  # [M, 3]
        embeddings: Tensor,  # [E, F]
        resolutions: Tensor,  # [L]
        offsets: Tensor,  # [L, 3]
        n_dense: int,
        log2_hashmap_size: int,
        threads: int,
        exact_threads: bool,
    ) -> Tensor:  # [M, 3, L, F]
        coords, embeddings = coords.contiguous(), embeddings.contiguous()
        resolutions = resolutions.to(device=coords.device, dtype=torch.int64).contiguous()
        offsets = offsets.to(device=coords.device, dtype=torch.int64).contiguous()
        m, n_levels, feats = coords.shape[0], resolutions.shape[0], embeddings.shape[1]
        out = embeddings.new_empty(m, 3, n_levels, feats)
        sizes = (m, n_levels, feats, n_dense, log2_hashmap_size, embeddings.shape[0])
        ins = [_ptr(t) for t in (coords, embeddings, resolutions, offsets)]
        suffix = _SUFFIX[embeddings.dtype]
        if coords.device.type == "cuda":
            lib = load_cuda()
            assert lib is not None, "the CUDA kernel is not available; resolve the implementation first"
            with torch.cuda.device(coords.device):
                stream = torch.cuda.current_stream().cuda_stream
                _check(getattr(lib, f"avatar_triplane_cuda_fwd_{suffix}")(*ins, *sizes, _ptr(out), stream),
                       "CUDA forward")
        else:
            lib = load_cpu()
            assert lib is not None, "the C++ kernel is not available; resolve the implementation first"
            rc = getattr(lib, f"avatar_triplane_fwd_{suffix}")(*ins, *sizes, _ptr(out), threads, exact_threads)
            _check(rc, "C++ forward")
        ctx.save_for_backward(coords, embeddings, resolutions, offsets)
        ctx.config = (n_dense, log2_hashmap_size, threads, exact_threads)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]  # grad [M, 3, L, F]
        coords, embeddings, resolutions, offsets = ctx.saved_tensors
        n_dense, log2_hashmap_size, threads, exact_threads = ctx.config
        grad_coords = torch.empty_like(coords) if ctx.needs_input_grad[0] else None
        grad_table = torch.zeros_like(embeddings) if ctx.needs_input_grad[1] else None
        if grad_coords is None and grad_table is None:
            return (None,) * 8
        grad = grad.contiguous()
        m, n_levels, feats = coords.shape[0], resolutions.shape[0], embeddings.shape[1]
        sizes = (m, n_levels, feats, n_dense, log2_hashmap_size, embeddings.shape[0])
        ins = [_ptr(t) for t in (coords, embeddings, resolutions, offsets, grad, grad_table, grad_coords)]
        suffix = _SUFFIX[embeddings.dtype]
        if coords.device.type == "cuda":
            lib = load_cuda()
            with torch.cuda.device(coords.device):
                if grad_coords is not None:
                    grad_coords.zero_()  # the CUDA kernel accumulates it with atomics
                stream = torch.cuda.current_stream().cuda_stream
                rc = getattr(lib, f"avatar_triplane_cuda_bwd_{suffix}")(*ins[:4], *sizes, *ins[4:], stream)
            _check(rc, "CUDA backward")
        else:
            lib = load_cpu()
            rc = getattr(lib, f"avatar_triplane_bwd_{suffix}")(*ins[:4], *sizes, *ins[4:], threads, exact_threads)
            _check(rc, "C++ backward")
        return grad_coords, grad_table, None, None, None, None, None, None


def triplane_encode_kernel(
    coords: Tensor,  # [M, 3]
    embeddings: Tensor,  # [E, F]
    resolutions: Tensor,  # [L]
    offsets: Tensor,  # [L, 3]
    n_dense: int,
    log2_hashmap_size: int,
    threads: int | None = None,
) -> Tensor:  # [M, 3, L, F]
    """The kernel twin of :func:`avatar.render.triplane._triplane_encode`: C++ for CPU tensors,
    CUDA for CUDA tensors. Check :func:`avatar.render.triplane.kernel_unavailable` first (coords
    and embeddings of one dtype, float32 or float64, on one device).

    Args:
        threads: C++ threads, exactly (tests run the threaded paths on few points with it); by
            default up to ``torch.get_num_threads()``, fewer on small inputs. Ignored on CUDA.
    """
    n_threads = torch.get_num_threads() if threads is None else int(threads)
    return _TriPlaneEncode.apply(coords, embeddings, resolutions, offsets, int(n_dense), int(log2_hashmap_size),
                                 n_threads, threads is not None)
