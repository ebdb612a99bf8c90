"""Dispatch to gsplat's CUDA rasterizer (optional dependency, imported only when used).

gsplat (Apache-2.0, nerfstudio-project/gsplat) is the fast path on NVIDIA GPUs. This module maps
our call onto ``gsplat.rasterization`` and its results back onto our conventions:

- backgrounds are composited by the caller (``rgb + (1 - alpha) * bg``), identical to gsplat's
  own ``+ T * bg``, so both backends share that code;
- ``packed=False`` so that ``meta["means2d"]`` and ``meta["radii"]`` are dense ``[C, N, ...]``;
- radii are returned as ``[C, N, 2]`` whatever the gsplat version (before 1.5 they were
  ``[C, N]``).

Not yet run on a GPU in this project's CI: written against gsplat's documented API.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor


def gsplat_available() -> bool:
    """Whether ``import gsplat`` works (it compiles or loads its CUDA kernels lazily itself)."""
    return gsplat_problem(kernels=False) is None


@functools.cache
def gsplat_problem(kernels: bool = True) -> str | None:
    """Why gsplat cannot rasterize here, or None when it can.

    ``import gsplat`` succeeds without its CUDA kernels: they are compiled on first use (minutes,
    once per machine), and a toolchain that cannot build them raises only then, in the middle of
    a render. With ``kernels`` the build is triggered now, so that a failed one is a reason to
    render with the PyTorch backend instead of a crash. The answer is kept for the process: a
    failed build is not retried at every render.
    """
    try:
        import gsplat  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA toolchain raising at import
        return f"gsplat is not installed ({type(err).__name__}: {err})"
    if not kernels:
        return None
    try:
        from gsplat.cuda._backend import _C
    except Exception as err:
        return f"gsplat's CUDA kernels did not build ({type(err).__name__}: {str(err)[:300]})"
    if _C is None:
        return "gsplat's CUDA kernels did not build (gsplat found no CUDA toolkit)"
    return None


def rasterize_gsplat(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] | [C, N, D] | [N, K, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    sh_degree: int | None,
    render_mode: str,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    tile_size: int,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Any]]:
    """Render with ``gsplat.rasterization``; arguments as :func:`avatar.render.rasterize`.

    Returns:
        render: colours without background. [C, H, W, D]
        alphas: [C, H, W, 1]
        depth: the depth channel for ``render_mode`` "RGB+D"/"RGB+ED", else None. [C, H, W, 1]
        meta: gsplat's meta dict, with ``radii`` as [C, N, 2] int32.
    """
    import gsplat

    render, alphas, meta = gsplat.rasterization(
        means=means,
        quats=quats,
        scales=scales,
        opacities=opacities,
        colors=colors,
        viewmats=viewmats,
        Ks=Ks,
        width=width,
        height=height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=False,
        tile_size=tile_size,
        backgrounds=None,
        render_mode=render_mode,
        absgrad=absgrad,
        rasterize_mode="classic",
    )
    depth = None
    if render_mode != "RGB":
        render, depth = render[..., :-1], render[..., -1:]
    radii = meta["radii"]
    if radii.dim() == 2:  # gsplat < 1.5: one isotropic radius per Gaussian
        meta["radii"] = radii[..., None].expand(*radii.shape, 2).contiguous()
    return render, alphas, depth, meta
