"""One function renders 3D Gaussians: :func:`rasterize`, with interchangeable backends.

- ``"gsplat"``: gsplat's CUDA kernels (optional dependency), the fast path on NVIDIA GPUs.
- ``"cpu"``: the project's C++ compositing kernel for CPU tensors, compiled on first use
  (see :mod:`avatar.render._cpu_kernel`); projection and binning stay in PyTorch.
- ``"torch"``: the pure-PyTorch rasterizer (:mod:`avatar.render._torch_impl`), any device; the
  reference the other backends are tested against.

All three implement the same image formation (gsplat's): EWA splatting with a low-pass
``eps2d`` on the 2D covariance, ``alpha = min(0.999, o exp(-sigma))``, contributions under 1/255
skipped, front-to-back by camera depth, a pixel stops before its transmittance would reach 1e-4.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from avatar.render import _torch_impl
from avatar.render.sh import num_sh_bases, spherical_harmonics

Backend = Literal["auto", "torch", "cpu", "gsplat"]
RenderMode = Literal["RGB", "RGB+D", "RGB+ED"]


def rasterize(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] | [C, N, D] | [N, K, 3] with sh_degree
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    backgrounds: Tensor | None = None,  # [C, D]
    *,
    sh_degree: int | None = None,
    backend: Backend = "auto",
    render_mode: RenderMode = "RGB",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render 3D Gaussians into a batch of pinhole cameras, differentiably.

    Gradients reach means, quats, scales, opacities, colors (or SH coefficients), backgrounds
    and, with the torch and cpu backends, viewmats and Ks too.

    Args:
        means: Gaussian centres in world space. [N, 3]
        quats: rotations as (w, x, y, z); need not be normalised. [N, 4]
        scales: standard deviations along the rotated axes, linear (not log). [N, 3]
        opacities: in (0, 1) (not logits). [N]
        colors: per-Gaussian features, [N, D] or per camera [C, N, D]; or, with ``sh_degree``,
            SH coefficients [N, K, 3] with K >= (sh_degree + 1) ** 2, turned into colours as
            ``clamp_min(SH(view dir) + 0.5, 0)`` (3DGS and gsplat convention).
        viewmats: world-to-camera transforms, OpenCV axes (x right, y down, z forward).
            [C, 4, 4]
        Ks: pinhole intrinsics in pixels; pixel (i, j) has its centre at (j + 0.5, i + 0.5).
            [C, 3, 3]
        width, height: image size in pixels.
        backgrounds: colour behind the Gaussians, per camera; None for black. [C, D]
        sh_degree: SH degree 0..3 to evaluate when ``colors`` holds SH coefficients.
        backend: "torch" (pure PyTorch, any device), "cpu" (C++ kernel, CPU tensors),
            "gsplat" (CUDA tensors, needs gsplat) or "auto": gsplat for CUDA tensors when it
            imports, else the C++ kernel for CPU tensors when it compiles, else torch; a
            fallback from the requested fast path warns.
        render_mode: "RGB", or also a depth image in ``meta["depth"]``: "RGB+D" the
            alpha-weighted sum of camera depths, "RGB+ED" that sum divided by alpha (expected
            depth).
        near_plane, far_plane: Gaussians whose centre's camera z is outside are culled.
        eps2d: low-pass filter added to the 2D covariance diagonal, in pixels^2.
        tile_size: side of the square tiles Gaussians are binned to.

    Returns:
        rgb: rendered features over the background. [C, H, W, D]
        alpha: accumulated opacity ``1 - T_final``. [C, H, W, 1]
        meta: what densification and debugging need:

            - ``means2d`` [C, N, 2]: projected centres, part of the graph; after
              ``backward()`` its ``.grad`` holds the screen-space gradient (pixels), because
              ``retain_grad()`` is called when it requires grad.
            - ``radii`` [C, N, 2] int32: screen bounding-box half-extents, 0 when culled.
            - ``visible`` [C, N] bool: ``(radii > 0).all(-1)``.
            - ``depths`` [C, N]: camera z of the centres.
            - ``depth`` [C, H, W, 1]: only for "RGB+D" / "RGB+ED".
            - ``width``, ``height``, ``n_cameras``, ``tile_size``, ``backend`` (the one used).
            - torch/cpu backends: ``conics`` [C, N, 3], ``n_isects``.

    Raises:
        ValueError: a tensor has the wrong shape, dtype or device, or an option is unknown.

    Examples:
        >>> import torch
        >>> from avatar.render import rasterize
        >>> n = 100
        >>> means = torch.randn(n, 3) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
        >>> quats, scales = torch.randn(n, 4), torch.full((n, 3), 0.05)
        >>> opacities, colors = torch.full((n,), 0.8), torch.rand(n, 3)
        >>> viewmats, Ks = torch.eye(4)[None], torch.tensor([[[100.0, 0, 32], [0, 100, 32], [0, 0, 1]]])
        >>> rgb, alpha, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 64, 64)
        >>> rgb.shape, alpha.shape, meta["radii"].shape
        (torch.Size([1, 64, 64, 3]), torch.Size([1, 64, 64, 1]), torch.Size([1, 100, 2]))
    """
    n_cams = _check_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds,
        sh_degree, render_mode, tile_size,
    )
    chosen = _choose_backend(backend, means)
    meta: dict[str, Any]
    if chosen == "gsplat":
        from avatar.render._gsplat import rasterize_gsplat

        render, alpha, depth, meta = rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            sh_degree=sh_degree, render_mode=render_mode, near_plane=near_plane,
            far_plane=far_plane, eps2d=eps2d, tile_size=tile_size,
        )
        depth_is_expected = True  # gsplat already divided "ED" by alpha
    else:
        render, alpha, depth, meta = _rasterize_own(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            sh_degree=sh_degree, render_mode=render_mode, near_plane=near_plane,
            far_plane=far_plane, eps2d=eps2d, tile_size=tile_size, use_cpu_kernel=chosen == "cpu",
        )
        depth_is_expected = False

    if backgrounds is not None:
        render = render + (1.0 - alpha) * backgrounds[:, None, None, :]
    if depth is not None:
        if render_mode == "RGB+ED" and not depth_is_expected:
            depth = depth / alpha.clamp_min(1e-10)
        meta["depth"] = depth
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    meta["visible"] = (meta["radii"] > 0).all(dim=-1)
    meta.update(width=width, height=height, n_cameras=n_cams, tile_size=tile_size, backend=chosen)
    return render, alpha, meta


def _rasterize_own(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None,
    render_mode: str,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    tile_size: int,
    use_cpu_kernel: bool,
) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Any]]:
    """The torch / C++ pipeline: project, bin, composite. Returns (render, alpha, depth, meta)."""
    n_cams = viewmats.shape[0]
    covars = _torch_impl._quat_scale_to_covar(quats, scales)
    means2d, conics, depths, radii = _torch_impl._project_gaussians(
        means, covars, opacities, viewmats, Ks, width, height,
        eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
    )
    if sh_degree is not None:
        # View direction from each camera centre, -R^T t, to each Gaussian.
        rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
        campos = -torch.einsum("cji,cj->ci", rot, trans)  # [C, 3]
        dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
        feats = spherical_harmonics(sh_degree, dirs, colors[None]).add(0.5).clamp_min(0.0)
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(n_cams, -1, -1)
    if render_mode != "RGB":
        feats = torch.cat([feats, depths[..., None]], dim=-1)

    tile_width, tile_height = -(-width // tile_size), -(-height // tile_size)
    _, flatten_ids, tile_offsets = _torch_impl._isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height
    )
    opac = opacities[None].expand(n_cams, -1)
    if use_cpu_kernel:
        from avatar.render import _cpu_kernel

        render, alpha = _cpu_kernel.rasterize_to_pixels(
            means2d, conics, opac, feats, flatten_ids, tile_offsets, width, height, tile_size
        )
    else:
        render, alpha = _torch_impl._rasterize_to_pixels(
            means2d, conics, opac, feats, flatten_ids, tile_offsets, width, height, tile_size
        )
    depth = None
    if render_mode != "RGB":
        render, depth = render[..., :-1], render[..., -1:]
    meta = {
        "means2d": means2d,
        "radii": radii,
        "depths": depths,
        "conics": conics,
        "n_isects": int(flatten_ids.numel()),
    }
    return render, alpha, depth, meta


def _choose_backend(backend: str, means: Tensor) -> str:
    """Resolve ``backend`` for tensors on ``means.device``; warn when a fast path is missing."""
    if backend not in ("auto", "torch", "cpu", "gsplat"):
        raise ValueError(f"backend must be 'auto', 'torch', 'cpu' or 'gsplat', got {backend!r}")
    on_cuda = means.device.type == "cuda"
    if backend == "gsplat":
        if not on_cuda:
            raise ValueError(f"backend='gsplat' needs CUDA tensors, got tensors on {means.device}")
        from avatar.render._gsplat import gsplat_problem

        problem = gsplat_problem()
        if problem is not None:
            raise ValueError(f"backend='gsplat' cannot run: {problem}; pip install gsplat with a working "
                             "CUDA toolkit, or use backend='torch'")
        return "gsplat"
    if backend == "cpu":
        if means.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {means.device}")
        from avatar.render import _cpu_kernel

        if not _cpu_kernel.available(means.dtype):
            raise ValueError(
                f"backend='cpu' is unavailable for {means.dtype} tensors (it needs float32 or "
                "float64 and a C++ compiler, see the warning above); use backend='torch'"
            )
        return "cpu"
    if backend == "torch":
        return "torch"
    if on_cuda:
        from avatar.render._gsplat import gsplat_problem

        problem = gsplat_problem()
        if problem is None:
            return "gsplat"
        warnings.warn(
            f"{problem}; rendering CUDA tensors with the slower pure-PyTorch rasterizer "
            "(pip install gsplat, with a CUDA toolkit that builds it, for the fast path)",
            RuntimeWarning,
            stacklevel=3,
        )
        return "torch"
    if means.device.type == "cpu":
        from avatar.render import _cpu_kernel

        if _cpu_kernel.available(means.dtype):
            return "cpu"
    return "torch"


def _check_inputs(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None,
    sh_degree: int | None,
    render_mode: str,
    tile_size: int,
) -> int:
    """Raise ValueError naming the expected and the actual shape; return the number of cameras."""

    def expect(name: str, t: Tensor, shape: tuple[int | None, ...], what: str) -> None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")

    if means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f"means must be [N, 3], got shape {tuple(means.shape)}")
    n = means.shape[0]
    expect("quats", quats, (n, 4), f"[N, 4] = [{n}, 4]")
    expect("scales", scales, (n, 3), f"[N, 3] = [{n}, 3]")
    expect("opacities", opacities, (n,), f"[N] = [{n}]")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats must be [C, 4, 4], got shape {tuple(viewmats.shape)}")
    n_cams = viewmats.shape[0]
    expect("Ks", Ks, (n_cams, 3, 3), f"[C, 3, 3] = [{n_cams}, 3, 3]")
    if sh_degree is not None:
        k = num_sh_bases(sh_degree)
        if colors.dim() != 3 or colors.shape[0] != n or colors.shape[1] < k or colors.shape[2] != 3:
            raise ValueError(
                f"with sh_degree={sh_degree}, colors must be SH coefficients [N, K, 3] with "
                f"N = {n}, K >= {k}, got shape {tuple(colors.shape)}"
            )
        dim = 3
    elif colors.dim() == 2 and colors.shape[0] == n:
        dim = colors.shape[1]
    elif colors.dim() == 3 and colors.shape[:2] == (n_cams, n):
        dim = colors.shape[2]
    else:
        raise ValueError(
            f"colors must be [N, D] = [{n}, D] or [C, N, D] = [{n_cams}, {n}, D] (or SH "
            f"coefficients [N, K, 3] with sh_degree), got shape {tuple(colors.shape)}"
        )
    if backgrounds is not None:
        expect("backgrounds", backgrounds, (n_cams, dim), f"[C, D] = [{n_cams}, {dim}]")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if render_mode not in ("RGB", "RGB+D", "RGB+ED"):
        raise ValueError(f"render_mode must be 'RGB', 'RGB+D' or 'RGB+ED', got {render_mode!r}")
    tensors = {
        "means": means, "quats": quats, "scales": scales, "opacities": opacities,
        "colors": colors, "viewmats": viewmats, "Ks": Ks,
    }
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not t.is_floating_point() or t.dtype != means.dtype:
            raise ValueError(f"{name} must have dtype {means.dtype} like means, got {t.dtype}")
        if t.device != means.device:
            raise ValueError(f"{name} must be on {means.device} like means, got {t.device}")
    return n_cams
