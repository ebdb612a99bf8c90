"""The C++ CPU compositing kernel: compiled on first use, loaded with ctypes, autograd-wrapped.

Why this exists: the pure-PyTorch compositor has to materialise every (Gaussian, pixel) pair of
a tile and stream it through ~25 passes (forward, recomputation and backward). A per-pixel loop
in C++ skips pairs below the alpha threshold without an ``exp`` and stops at full opacity: about
3x faster on a 2-core CPU (74 vs 225 ms for a 256x256 training step with 20k Gaussians, see
benchmarks/RESULTS.md), and much less disturbed by other processes.

Why ctypes and not ``torch.utils.cpp_extension``: ``csrc/rasterize_cpu.cpp`` uses no torch
headers, so it compiles with a plain ``c++ -O3 -shared`` in a second or two (torch's extension
headers take far longer), needs no ``ninja`` and cannot break on a torch ABI
change. Building and caching are :mod:`avatar.render._build`'s.

When no compiler is available or compilation fails, :func:`available` returns False and
``rasterize(backend="auto")`` uses the pure-PyTorch backend instead.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from avatar.render._build import cpu_kernel

_SOURCE = Path(__file__).with_name("csrc") / "rasterize_cpu.cpp"
_ABI_VERSION = 1
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


@functools.cache
def _load_library() -> ctypes.CDLL | None:
    """Compile (once per source version and machine) and load the kernel; None on failure.

    Memoised: the compile attempt, successful or not, happens at most once per process.
    """
    lib = cpu_kernel("avatar_rasterize_cpu", _SOURCE, "avatar_rasterize_abi_version", _ABI_VERSION,
                     "the Gaussian rasterizer")
    if lib is None:
        return None
    ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _DTYPES.values():
        fwd = getattr(lib, f"avatar_rasterize_fwd_{suffix}")
        fwd.argtypes = [ptr] * 6 + [i64] * 6 + [ptr, ptr, cint]
        fwd.restype = cint
        bwd = getattr(lib, f"avatar_rasterize_bwd_{suffix}")
        bwd.argtypes = [ptr] * 6 + [i64] * 7 + [ptr] * 6 + [cint]
        bwd.restype = cint
    return lib


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel is (or can be) compiled and supports ``dtype``; compiles on first call."""
    return dtype in _DTYPES and _load_library() is not None


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class _CpuRasterizeToPixels(torch.autograd.Function):
    """Autograd wrapper: C++ forward, C++ backward (recomputing, no saved per-pixel lists)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        means2d: Tensor,  # [C, N, 2]
        conics: Tensor,  # [C, N, 3]
        opacities: Tensor,  # [C, N]
        feats: Tensor,  # [C, N, D]
        flatten_ids: Tensor,  # [M]
        tile_offsets: Tensor,  # [C * n_tiles + 1]
        width: int,
        height: int,
        tile_size: int,
    ) -> tuple[Tensor, Tensor]:
        lib = _load_library()
        assert lib is not None, "the C++ kernel is not available; check available() first"
        n_cams, n_gauss, dim = feats.shape
        suffix = _DTYPES[feats.dtype]
        inputs = [t.contiguous() for t in (means2d, conics, opacities, feats)]
        ids, offsets = flatten_ids.contiguous(), tile_offsets.contiguous()
        render = feats.new_empty(n_cams, height, width, dim)
        alpha = feats.new_empty(n_cams, height, width, 1)
        getattr(lib, f"avatar_rasterize_fwd_{suffix}")(
            *map(_ptr, inputs), _ptr(ids), _ptr(offsets),
            n_cams, n_gauss, dim, width, height, tile_size,
            _ptr(render), _ptr(alpha), torch.get_num_threads(),
        )
        ctx.save_for_backward(*inputs, ids, offsets)
        ctx.geometry = (width, height, tile_size)
        return render, alpha

    @staticmethod
    def backward(ctx, v_render: Tensor, v_alpha: Tensor):  # type: ignore[override]
        lib = _load_library()
        means2d, conics, opacities, feats, ids, offsets = ctx.saved_tensors
        width, height, tile_size = ctx.geometry
        n_cams, n_gauss, dim = feats.shape
        suffix = _DTYPES[feats.dtype]
        v_render = v_render.contiguous()
        v_alpha = v_alpha.contiguous()
        grads = [torch.zeros_like(t) for t in (means2d, conics, opacities, feats)]
        getattr(lib, f"avatar_rasterize_bwd_{suffix}")(
            *map(_ptr, (means2d, conics, opacities, feats)), _ptr(ids), _ptr(offsets),
            ids.numel(), n_cams, n_gauss, dim, width, height, tile_size,
            _ptr(v_render), _ptr(v_alpha), *map(_ptr, grads), torch.get_num_threads(),
        )
        return (*grads, None, None, None, None, None)


def rasterize_to_pixels(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, D]
    flatten_ids: Tensor,  # [M]
    tile_offsets: Tensor,  # [C * n_tiles + 1]
    width: int,
    height: int,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """C++ twin of :func:`avatar.render._torch_impl._rasterize_to_pixels` (CPU tensors).

    Returns:
        render: composited features, without background. [C, H, W, D]
        alphas: ``1 - T_final``. [C, H, W, 1]
    """
    return _CpuRasterizeToPixels.apply(
        means2d, conics, opacities, feats, flatten_ids, tile_offsets, width, height, tile_size
    )
