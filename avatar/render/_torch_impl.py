"""Pure-PyTorch Gaussian rasterizer: the reference implementation and the portable path.

The steps are gsplat's, with the same names behind a leading underscore:

1. :func:`_quat_scale_to_covar` - 3D covariance ``R S S^T R^T`` from quaternion and scale.
2. :func:`_project_gaussians` - world to camera, EWA projection with the perspective Jacobian
   (clamped to 1.3x the field of view, as gsplat does), a ``eps2d`` low-pass on the 2D covariance,
   culling (near/far plane, degenerate covariance, off screen) and opacity-aware radii.
3. :func:`_isect_tiles` - every (camera, tile, Gaussian) overlap, sorted by tile then depth.
4. :func:`_rasterize_to_pixels` - front-to-back alpha compositing of each tile's pixels over that
   tile's depth-sorted list, with a hand-written backward.

Compositing follows gsplat exactly: ``alpha = min(0.999, o * exp(-sigma))``; a Gaussian with
``alpha < 1/255`` is skipped; a pixel stops before the Gaussian that would bring its
transmittance to ``<= 1e-4``. The radius of a Gaussian is the extent where its alpha falls below
1/255 (``min(3.33, sqrt(2 ln(255 o)))`` standard deviations per axis), so tile binning never
drops a contribution the compositing rule would keep: the result equals a dense every-pixel
by-every-Gaussian evaluation.

Why a hand-written backward: autograd over the per-tile ``[list, pixels]`` tensors would keep
about fifteen of them alive per chunk for the backward pass (memory of order intersections x 256
x 15 floats) and spend most of its time allocating. Here the forward keeps only the rendered
image; the backward recomputes each chunk's weights, gets d loss / d sigma in closed form (one
running sum over the list) and reduces it to per-intersection gradients with matrix products
against the pixel basis. Memory stays bounded by one chunk of tile-Gaussian intersections x tile
pixels (plus the per-Gaussian and per-pixel tensors), never pixels x Gaussians.

On CPU this path is a few times slower than the C++ kernel of :mod:`avatar.render._cpu_kernel`
(see benchmarks/RESULTS.md); it is the reference the other backends are tested against and the
fallback wherever that kernel cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
"""Contributions with a smaller alpha are skipped (gsplat, 3DGS)."""
ALPHA_MAX = 0.999
"""Alpha of one Gaussian is clamped here, so a pixel is never made fully opaque by one splat.
gsplat's value (the original 3DGS rasterizer uses 0.99)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops before the Gaussian that would bring its transmittance to this or below."""
MAX_EXTEND = 3.33
"""Largest radius in standard deviations: sqrt(2 ln 255), where alpha <= 1 falls below 1/255."""

_PAD_OPACITY = 1e-30
"""Opacity given to padding entries of a tile list: its alpha is far below the 1/255 cut."""
DEFAULT_CHUNK_ELEMENTS = 1 << 20
"""Target size of one compositing chunk, in (list entry, pixel) pairs: 4 MiB per float32
temporary (about six are alive at once), large enough that per-operation overhead and thread
synchronisation are amortised."""


def _quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances from rotations and scales.

    Args:
        quats: rotations as (w, x, y, z); normalised here. [N, 4]
        scales: standard deviations along the rotated axes (linear, not log). [N, 3]

    Returns:
        Covariances ``R diag(s)^2 R^T``. [N, 3, 3]
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))
    m = rot * scales.unsqueeze(-2)  # R @ diag(s)
    return m @ m.transpose(-1, -2)


def _project_gaussians(
    means: Tensor,  # [N, 3]
    covars: Tensor,  # [N, 3, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project 3D Gaussians into each camera (EWA splatting, pinhole, OpenCV axes).

    Culled Gaussians (behind the near plane, beyond the far plane, degenerate 2D covariance, too
    transparent to ever reach alpha 1/255, or entirely off screen) get ``radii == 0``; their other
    outputs are finite stand-ins so that no NaN can leak into gradients.

    Args:
        means: centres in world space. [N, 3]
        covars: world-space covariances. [N, 3, 3]
        opacities: in (0, 1); only used for the opacity-aware radius. [N]
        viewmats: world-to-camera transforms. [C, 4, 4]
        Ks: pinhole intrinsics. [C, 3, 3]
        width, height: image size in pixels.
        eps2d: low-pass added to the diagonal of the 2D covariance (pixels^2).
        near_plane, far_plane: depth range kept, in camera z.

    Returns:
        means2d: pixel coordinates of the centres (pixel (i, j) has its centre at (j+.5, i+.5)).
            [C, N, 2]
        conics: the inverse 2D covariance as (a, b, c) = (inv00, inv01, inv11). [C, N, 3]
        depths: camera-space z of the centres. [C, N]
        radii: integer half-extents of the screen-space bounding box along x and y, 0 if culled.
            [C, N, 2] int32
    """
    rot = viewmats[:, :3, :3]  # [C, 3, 3]
    trans = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", rot, covars, rot)  # [C, N, 3, 3]
    x, y, z = means_c.unbind(-1)

    in_range = (z >= near_plane) & (z <= far_plane)  # gsplat keeps both ends
    z = torch.where(in_range, z, torch.ones_like(z))  # stand-in depth for culled Gaussians

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # Clamp the Jacobian's x/z, y/z to 1.3x the field of view so that Gaussians far outside the
    # image do not get absurd screen footprints (gsplat's rule).
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)

    zeros = torch.zeros_like(z)
    jac = torch.stack(
        [fx / z, zeros, -fx * tx / (z * z), zeros, fy / z, -fy * ty / (z * z)], dim=-1
    ).reshape(z.shape + (2, 3))  # [C, N, 2, 3]
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)  # [C, N, 2, 2]
    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    valid = in_range & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [C, N, 3]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [C, N, 2]

    with torch.no_grad():
        # Opacity-aware extent: beyond sqrt(2 ln(o / (1/255))) standard deviations alpha < 1/255.
        opac = opacities.detach().to(a.dtype).expand_as(a)
        keep = valid & (opac >= ALPHA_THRESHOLD)  # a new tensor: `valid` is saved by autograd
        extend = torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = extend.clamp_max(MAX_EXTEND)
        rx = torch.ceil(extend * torch.sqrt(a.detach().clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c.detach().clamp_min(0)))
        keep &= (rx > 0) | (ry > 0)
        mx, my = means2d.detach().unbind(-1)
        on_screen = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        keep &= on_screen & torch.isfinite(rx) & torch.isfinite(ry)
        radii = torch.stack([rx, ry], dim=-1)
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii))
        # Clamp only to stay inside int32; tile ranges are clipped to the image later anyway.
        radii = radii.clamp_max(float(1 << 30)).to(torch.int32)
    return means2d, conics, means_c[..., 2], radii


def _isect_tiles(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N, 2]
    depths: Tensor,  # [C, N]
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """List every (camera, tile, Gaussian) overlap, sorted by tile and, within a tile, by depth.

    A Gaussian overlaps the tiles its bounding box ``means2d +- radii`` touches.

    Args:
        means2d: projected centres. [C, N, 2]
        radii: bounding-box half-extents, 0 for culled Gaussians. [C, N, 2]
        depths: camera z, the compositing order. [C, N]
        tile_size: tile side in pixels.
        tile_width, tile_height: number of tiles along x and y.

    Returns:
        isect_tiles: global tile id ``camera * n_tiles + ty * tile_width + tx`` per overlap,
            ascending. [M] int64
        flatten_ids: the Gaussian of each overlap as ``camera * N + n``; within a tile, ordered
            front to back. [M] int64
        tile_offsets: overlaps of global tile t are ``[tile_offsets[t], tile_offsets[t+1])``.
            [C * n_tiles + 1] int64
    """
    n_cams, n_gauss = depths.shape
    n_tiles = tile_width * tile_height
    device = depths.device
    with torch.no_grad():
        mx, my = means2d.detach().unbind(-1)
        rx, ry = radii.to(mx.dtype).unbind(-1)
        visible = (radii > 0).all(dim=-1)
        x0 = torch.floor((mx - rx) / tile_size).clamp(0, tile_width).long()
        x1 = torch.ceil((mx + rx) / tile_size).clamp(0, tile_width).long()
        y0 = torch.floor((my - ry) / tile_size).clamp(0, tile_height).long()
        y1 = torch.ceil((my + ry) / tile_size).clamp(0, tile_height).long()
        span_x = x1 - x0
        counts = (span_x * (y1 - y0)) * visible  # [C, N]

        # Emit overlaps Gaussian by Gaussian in front-to-back order; a stable sort by tile id then
        # keeps that order inside every tile.
        order = torch.argsort(depths.detach(), dim=1, stable=True)  # [C, N]
        flat_order = (order + torch.arange(n_cams, device=device)[:, None] * n_gauss).reshape(-1)
        cnt = counts.reshape(-1)[flat_order]
        gauss = torch.repeat_interleave(flat_order, cnt)  # [M]
        n_isects = gauss.numel()
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(n_isects, device=device) - torch.repeat_interleave(first, cnt)
        span = span_x.reshape(-1)[gauss]
        tx = x0.reshape(-1)[gauss] + local % span.clamp_min(1)
        ty = y0.reshape(-1)[gauss] + local // span.clamp_min(1)
        cam = gauss // n_gauss
        tile_ids = cam * n_tiles + ty * tile_width + tx
        tile_ids, perm = torch.sort(tile_ids, stable=True)
        flatten_ids = gauss[perm]
        per_tile = torch.bincount(tile_ids, minlength=n_cams * n_tiles)
        tile_offsets = torch.zeros(n_cams * n_tiles + 1, dtype=torch.int64, device=device)
        tile_offsets[1:] = torch.cumsum(per_tile, 0)
    return tile_ids, flatten_ids, tile_offsets


def _pixel_basis(tile_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Quadratic monomials of the pixel centres of a tile, relative to the tile centre.

    The Mahalanobis term of every (Gaussian, pixel) pair of a tile is then one matrix product,
    and the backward's sums over pixels are another. Coordinates relative to the tile centre
    (|u|, |v| <= 7.5) keep the expanded polynomial well conditioned in float32.

    Returns:
        Columns ``(1, u, v, u^2, u v, v^2)`` for the tile's pixels in row-major order. [6, P]
    """
    r = torch.arange(tile_size, dtype=dtype, device=device) + 0.5 - 0.5 * tile_size
    v, u = torch.meshgrid(r, r, indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)
    return torch.stack([torch.ones_like(u), u, v, u * u, u * v, v * v], dim=0)


def _logit_coeffs(mean: Tensor, conic: Tensor, opac: Tensor) -> Tensor:
    """Coefficients of ``ln(o) - sigma`` in the monomial basis of :func:`_pixel_basis`.

    ``sigma(u, v) = 0.5 a du^2 + b du dv + 0.5 c dv^2`` with ``du = u - mu`` expands to
    ``k0 + k1 u + k2 v + k3 u^2 + k4 u v + k5 v^2``; folding the sign and ``ln(o)`` in lets one
    matrix product and one ``exp`` give the unclamped alpha of every pair.

    Args:
        mean: centres relative to the tile centre (mu, mv). [B, L, 2]
        conic: (a, b, c). [B, L, 3]
        opac: opacities, > 0 (padding uses a tiny value, whose alpha is then cut). [B, L]

    Returns:
        (ln o - k0, -k1, ..., -k5). [B, L, 6]
    """
    mu, mv = mean.unbind(-1)
    a, b, c = conic.unbind(-1)
    k0 = 0.5 * a * mu * mu + b * mu * mv + 0.5 * c * mv * mv
    return torch.stack(
        [torch.log(opac) - k0, a * mu + b * mv, b * mu + c * mv, -0.5 * a, -b, -0.5 * c], dim=-1
    )


def _alpha_cut(dtype: torch.dtype) -> float:
    """Largest value below 1/255 in ``dtype``: ``threshold(x, cut)`` then keeps x >= 1/255."""
    third = torch.tensor(ALPHA_THRESHOLD, dtype=dtype)
    return torch.nextafter(third, torch.zeros_like(third)).item()


def _composite_weights(
    coeffs: Tensor, basis: Tensor, keep_alpha: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Front-to-back blending weights of one chunk of tiles.

    Layout is [tile, list entry, pixel]: pixels contiguous, so the running product over the
    list and all matrix products stream along rows (several times faster on CPU than
    [tile, pixel, entry]). Transmittance is a running product (``cumprod``), in the same order
    as a per-pixel loop. It never increases along the list, so "stop before the entry that
    would bring it to <= 1e-4" keeps exactly the entries whose inclusive transmittance stays
    above 1e-4.

    Args:
        coeffs: logit coefficients (:func:`_logit_coeffs`). [B, L, 6]
        basis: pixel monomials. [6, P]
        keep_alpha: also return alpha and 1 - alpha (the backward needs them).

    Returns:
        weights: ``alpha_i T_i`` of each used (entry, pixel), 0 elsewhere. [B, L, P]
        alpha: per-pair alpha after clamping and the 1/255 cut (None unless keep_alpha).
            [B, L, P]
        one_minus: ``1 - alpha`` (None unless keep_alpha). [B, L, P]
    """
    alpha = torch.matmul(coeffs, basis)  # ln(o) - sigma, [B, L, P]
    # exp(-30) is far below the 1/255 cut; clamping first keeps exp away from denormals,
    # which are several times slower on CPUs.
    alpha.clamp_(min=-30.0).exp_().clamp_(max=ALPHA_MAX)
    F.threshold(alpha, _alpha_cut(alpha.dtype), 0.0, inplace=True)
    one_minus = torch.rsub(alpha, 1.0)
    trans = torch.cumprod(one_minus, dim=1) if keep_alpha else one_minus.cumprod_(dim=1)
    weights = alpha.clone() if keep_alpha else alpha
    weights[:, 1:].mul_(trans[:, :-1])  # alpha_i * T_{i-1}
    # 1 where the inclusive transmittance stays above the stop level, else 0.
    used = F.threshold(trans, TRANSMITTANCE_MIN, 0.0, inplace=True).ceil_()
    weights.mul_(used)
    if keep_alpha:
        return weights, alpha, one_minus
    return weights, None, None


def _chunks(lengths: list[int], pixels: int, budget: int) -> list[tuple[int, int]]:
    """Split tiles (sorted by list length, longest first) into chunks of about ``budget`` pairs."""
    out = []
    start = 0
    while start < len(lengths):
        n = max(1, budget // max(1, pixels * lengths[start]))
        out.append((start, min(len(lengths), start + n)))
        start += n
    return out


class _TileLayout:
    """Which tiles to composite, in which chunks, and where their pixels sit (shared by passes)."""

    def __init__(
        self,
        tile_offsets: Tensor,
        width: int,
        height: int,
        tile_size: int,
        budget: int,
        dtype: torch.dtype,
    ) -> None:
        self.tile_size = tile_size
        self.tile_width = -(-width // tile_size)
        self.tile_height = -(-height // tile_size)
        self.n_tiles = self.tile_width * self.tile_height
        self.pixels = tile_size * tile_size
        lengths = tile_offsets[1:] - tile_offsets[:-1]
        nonempty = torch.nonzero(lengths).squeeze(1)
        lens, order = torch.sort(lengths[nonempty], descending=True)
        self.tiles = nonempty[order]  # non-empty global tile ids, longest list first
        self.starts = tile_offsets[self.tiles]
        self.lengths = lens
        lens_list = lens.tolist()
        self.chunks = _chunks(lens_list, self.pixels, budget)
        self.max_len = [lens_list[s] for s, _ in self.chunks]
        local = self.tiles % self.n_tiles
        half = 0.5 * tile_size
        self.centers = torch.stack(
            [
                (local % self.tile_width).to(dtype) * tile_size + half,
                (local // self.tile_width).to(dtype) * tile_size + half,
            ],
            dim=-1,
        )  # [n_nonempty, 2]

    def gather(self, k: int, flatten_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gaussian ids of chunk ``k`` as a padded [B, L] table, its padding mask and its tiles."""
        s, e = self.chunks[k]
        length = self.max_len[k]
        ar = torch.arange(length, device=flatten_ids.device)
        pad = ar[None, :] >= self.lengths[s:e, None]  # [B, L]
        idx = (self.starts[s:e, None] + ar[None, :]).masked_fill_(pad, 0)
        return flatten_ids[idx], pad, self.tiles[s:e]

    def to_image(self, tiles: Tensor, n_cams: int, width: int, height: int) -> Tensor:
        """[C * n_tiles, D, P] channel-major tile pixels -> [C, H, W, D] image (cropped)."""
        ts, dim = self.tile_size, tiles.shape[1]
        img = tiles.view(n_cams, self.tile_height, self.tile_width, dim, ts, ts)
        img = img.permute(0, 1, 4, 2, 5, 3).reshape(
            n_cams, self.tile_height * ts, self.tile_width * ts, dim
        )
        return img[:, :height, :width]

    def from_image(self, img: Tensor, width: int, height: int) -> Tensor:
        """[C, H, W, D] image -> [C * n_tiles, D, P] channel-major tile pixels (zero-padded)."""
        ts = self.tile_size
        n_cams, _, _, dim = img.shape
        pad_w, pad_h = self.tile_width * ts - width, self.tile_height * ts - height
        img = F.pad(img, (0, 0, 0, pad_w, 0, pad_h))
        img = img.reshape(n_cams, self.tile_height, ts, self.tile_width, ts, dim)
        return img.permute(0, 1, 3, 5, 2, 4).reshape(n_cams * self.n_tiles, dim, ts * ts)


class _RasterizeToPixels(torch.autograd.Function):
    """Tile compositing with a recomputing, chunked backward (see the module docstring)."""

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
        chunk_elements: int,
    ) -> tuple[Tensor, Tensor]:
        n_cams, n_gauss, dim = feats.shape
        dtype = feats.dtype
        layout = _TileLayout(tile_offsets, width, height, tile_size, chunk_elements, dtype)
        basis = _pixel_basis(tile_size, dtype, feats.device)
        mean_f = means2d.reshape(-1, 2)
        conic_f = conics.reshape(-1, 3)
        opac_f = opacities.reshape(-1)
        # One extra channel of ones: compositing it yields the pixel alpha (1 - T_final), and its
        # gradient is handled by the same formula as the colours.
        feat_f = torch.cat([feats.reshape(-1, dim), feats.new_ones(n_cams * n_gauss, 1)], dim=-1)

        out = feats.new_zeros(n_cams * layout.n_tiles, dim + 1, layout.pixels)
        for k, (s, e) in enumerate(layout.chunks):
            gid, pad, tiles = layout.gather(k, flatten_ids)
            opac = opac_f[gid].masked_fill(pad, _PAD_OPACITY)
            coeffs = _logit_coeffs(mean_f[gid] - layout.centers[s:e, None, :], conic_f[gid], opac)
            weights, _, _ = _composite_weights(coeffs, basis, keep_alpha=False)
            out[tiles] = torch.bmm(feat_f[gid].transpose(1, 2), weights)  # [B, D + 1, P]

        ctx.save_for_backward(means2d, conics, opacities, feats, flatten_ids)
        ctx.layout = layout
        ctx.geometry = (width, height)
        render, alpha = layout.to_image(out, n_cams, width, height).split([dim, 1], -1)
        return render, alpha

    @staticmethod
    def backward(ctx, v_render: Tensor, v_alpha: Tensor):  # type: ignore[override]
        means2d, conics, opacities, feats, flatten_ids = ctx.saved_tensors
        layout: _TileLayout = ctx.layout
        width, height = ctx.geometry
        n_cams, n_gauss, dim = feats.shape
        dtype = feats.dtype
        basis = _pixel_basis(layout.tile_size, dtype, feats.device)
        mean_f = means2d.reshape(-1, 2)
        conic_f = conics.reshape(-1, 3)
        opac_f = opacities.reshape(-1)
        feat_f = torch.cat([feats.reshape(-1, dim), feats.new_ones(n_cams * n_gauss, 1)], dim=-1)
        v_out = layout.from_image(torch.cat([v_render, v_alpha], dim=-1), width, height)

        v_mean = torch.zeros_like(mean_f)
        v_conic = torch.zeros_like(conic_f)
        v_opac = torch.zeros_like(opac_f)
        v_feat = torch.zeros(n_cams * n_gauss, dim, dtype=dtype, device=feats.device)
        for k, (s, e) in enumerate(layout.chunks):
            gid, pad, tiles = layout.gather(k, flatten_ids)
            mean = mean_f[gid] - layout.centers[s:e, None, :]  # [B, L, 2]
            conic = conic_f[gid]  # [B, L, 3]
            opac = opac_f[gid].masked_fill(pad, _PAD_OPACITY)  # [B, L]
            g = v_out[tiles]  # [B, D + 1, P]
            weights, alpha, one_minus = _composite_weights(
                _logit_coeffs(mean, conic, opac), basis, keep_alpha=True
            )
            # With gf_i = g . f_i and later_i = sum_{j>i} w_j gf_j, the loss moves with alpha_i
            # as T_i gf_i - later_i / (1 - alpha_i); times d alpha / d sigma = -alpha that is
            #   d loss / d sigma_i = alpha_i / (1 - alpha_i) * later_i - w_i gf_i.
            # Entries after the early stop get exactly 0 (w = 0 there and for all later ones).
            contrib = torch.bmm(feat_f[gid], g).mul_(weights)  # w_i gf_i, [B, L, P]
            later = torch.cumsum(contrib, dim=1)
            # Total minus inclusive prefix; after the stop the prefix equals the total exactly.
            torch.sub(later[:, -1:].clone(), later, out=later)
            ratio = torch.div(alpha, one_minus, out=one_minus)
            v_sigma = later.mul_(ratio).sub_(contrib)
            v_sigma.mul_(alpha.lt_(ALPHA_MAX))  # a clamped alpha does not depend on sigma or o
            # Sums over pixels as products with the pixel basis / the output gradient.
            g_coef = torch.matmul(basis, v_sigma.transpose(1, 2))  # [B, 6, L]
            v_f = torch.bmm(g[:, :dim], weights.transpose(1, 2))  # [B, D, L]
            flat = gid.reshape(-1)
            v_feat.index_add_(0, flat, v_f.transpose(1, 2).reshape(-1, dim))

            g0, g1, g2, g3, g4, g5 = g_coef.unbind(1)  # each [B, L]
            mu, mv = mean.unbind(-1)
            a, b, c = conic.unbind(-1)
            v_ca = 0.5 * g3 - mu * g1 + 0.5 * mu * mu * g0
            v_cb = g4 - mv * g1 - mu * g2 + mu * mv * g0
            v_cc = 0.5 * g5 - mv * g2 + 0.5 * mv * mv * g0
            v_mu = -a * g1 - b * g2 + (a * mu + b * mv) * g0
            v_mv = -b * g1 - c * g2 + (b * mu + c * mv) * g0
            # sum_p v_sigma = -o * sum_p v_alpha exp(-sigma)  =>  d/do = -g0 / o.
            v_o = -g0 / opac  # padding has g0 == 0
            v_mean.index_add_(0, flat, torch.stack([v_mu, v_mv], -1).reshape(-1, 2))
            v_conic.index_add_(0, flat, torch.stack([v_ca, v_cb, v_cc], -1).reshape(-1, 3))
            v_opac.index_add_(0, flat, v_o.reshape(-1))

        return (
            v_mean.view_as(means2d),
            v_conic.view_as(conics),
            v_opac.view_as(opacities),
            v_feat.view_as(feats),
            None, None, None, None, None, None,
        )


def _rasterize_to_pixels(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, D]
    flatten_ids: Tensor,  # [M]
    tile_offsets: Tensor,  # [C * n_tiles + 1]
    width: int,
    height: int,
    tile_size: int = 16,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite depth-sorted Gaussians into each tile's pixels (differentiable).

    Args:
        means2d: projected centres in pixels. [C, N, 2]
        conics: inverse 2D covariances (a, b, c). [C, N, 3]
        opacities: per-camera opacities. [C, N]
        feats: features to composite (colours, optionally depth). [C, N, D]
        flatten_ids, tile_offsets: from :func:`_isect_tiles`.
        width, height: image size.
        tile_size: tile side in pixels, as used by :func:`_isect_tiles`.
        chunk_elements: about how many (pixel, list entry) pairs to process at once.

    Returns:
        render: composited features, without background. [C, H, W, D]
        alphas: ``1 - T_final``. [C, H, W, 1]
    """
    return _RasterizeToPixels.apply(
        means2d, conics, opacities, feats, flatten_ids, tile_offsets,
        width, height, tile_size, chunk_elements,
    )
