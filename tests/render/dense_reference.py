"""Brute-force Gaussian splatting: every pixel against every Gaussian, autograd for gradients.

Written independently of ``avatar.render`` (other formulas for the rotation, the inverse and the
transmittance) to check it: same conventions (gsplat's), no tiles, no sorting tricks, no
hand-written backward. Memory is pixels x Gaussians, so only small scenes fit. Also used by
``benchmarks/rasterizer.py`` for the speed ratio.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotation_from_quat(q: Tensor) -> Tensor:
    """R = (w^2 - |v|^2) I + 2 v v^T + 2 w [v]_x for the unit quaternion (w, v). [N, 4] -> [N, 3, 3]"""
    q = q / q.norm(dim=-1, keepdim=True)
    w, v = q[:, :1], q[:, 1:]
    eye = torch.eye(3, dtype=q.dtype, device=q.device)
    vx, vy, vz = v.unbind(-1)
    zero = torch.zeros_like(vx)
    cross = torch.stack([zero, -vz, vy, vz, zero, -vx, -vy, vx, zero], -1).reshape(-1, 3, 3)
    return ((w * w - (v * v).sum(-1, keepdim=True))[..., None] * eye
            + 2 * v[:, :, None] * v[:, None, :] + 2 * w[..., None] * cross)


def render_dense(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmats: Tensor, Ks: Tensor, width: int, height: int, backgrounds: Tensor | None = None,
    near: float = 0.01, far: float = 1e10, eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render [N, D] (or [C, N, D]) colours; returns rgb [C,H,W,D], alpha [C,H,W,1],
    expected-depth numerator (sum of w z) [C,H,W,1] and means2d [C,N,2] (grad retained)."""
    n_cams = viewmats.shape[0]
    rot = rotation_from_quat(quats)
    cov = rot @ torch.diag_embed(scales ** 2) @ rot.transpose(1, 2)  # [N, 3, 3]
    outs = []
    means2d_all = []
    projected = []
    for ci in range(n_cams):
        r, t, k = viewmats[ci, :3, :3], viewmats[ci, :3, 3], Ks[ci]
        pc = means @ r.T + t  # [N, 3]
        covc = r @ cov @ r.T
        z_raw = pc[:, 2]
        ok = (z_raw >= near) & (z_raw <= far)
        z = torch.where(ok, z_raw, torch.ones_like(z_raw))
        fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
        # gsplat's Jacobian clamp: x/z, y/z limited to 1.3x the field of view.
        limx = (-(cx / fx) - 0.15 * width / fx, (width - cx) / fx + 0.15 * width / fx)
        limy = (-(cy / fy) - 0.15 * height / fy, (height - cy) / fy + 0.15 * height / fy)
        u = torch.clamp(pc[:, 0] / z, limx[0], limx[1])
        v = torch.clamp(pc[:, 1] / z, limy[0], limy[1])
        jac = torch.zeros(pc.shape[0], 2, 3, dtype=means.dtype, device=means.device)
        jac[:, 0, 0] = fx / z
        jac[:, 1, 1] = fy / z
        jac[:, 0, 2] = -fx * u / z
        jac[:, 1, 2] = -fy * v / z
        eye2 = torch.eye(2, dtype=means.dtype, device=means.device)
        cov2 = jac @ covc @ jac.transpose(1, 2) + eps2d * eye2
        det = torch.linalg.det(cov2)
        ok = ok & (det > 0)
        cov2 = torch.where(ok[:, None, None], cov2, eye2)
        prec = torch.linalg.inv(cov2)  # [N, 2, 2]
        means2d_all.append(torch.stack([fx * pc[:, 0] / z + cx, fy * pc[:, 1] / z + cy], -1))
        projected.append((z_raw, ok, prec))
    means2d = torch.stack(means2d_all)  # [C, N, 2]
    if means2d.requires_grad:
        means2d.retain_grad()

    for ci in range(n_cams):
        z_raw, ok, prec = projected[ci]
        m2 = means2d[ci]
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=means.dtype, device=means.device) + 0.5,
            torch.arange(width, dtype=means.dtype, device=means.device) + 0.5, indexing="ij")
        pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # [P, 2]
        d = pix[:, None, :] - m2[None, :, :]  # [P, N, 2]
        maha = torch.einsum("pni,nij,pnj->pn", d, prec, d)
        alpha = torch.clamp(opacities[None, :] * torch.exp(-0.5 * maha), max=0.999)
        alpha = torch.where((alpha >= 1.0 / 255.0) & ok[None, :], alpha, torch.zeros_like(alpha))
        order = torch.argsort(z_raw.detach(), stable=True)
        alpha = alpha[:, order]
        col = colors[ci] if colors.dim() == 3 else colors
        feat = torch.cat([col, z_raw[:, None]], -1)[order]  # [N, D + 1]
        trans_incl = torch.cumprod(1.0 - alpha, dim=1)
        trans_excl = torch.cat([torch.ones_like(alpha[:, :1]), trans_incl[:, :-1]], 1)
        # A pixel stops before the Gaussian that would take its transmittance to <= 1e-4.
        used = trans_incl > 1e-4
        w = alpha * trans_excl * used
        img = w @ feat  # [P, D + 1]
        acc = w.sum(1, keepdim=True)
        outs.append(torch.cat([img, acc], -1).reshape(height, width, -1))
    out = torch.stack(outs)
    dim = out.shape[-1] - 2
    rgb, depth, alpha = out[..., :dim], out[..., dim:dim + 1], out[..., dim + 1:]
    if backgrounds is not None:
        rgb = rgb + (1 - alpha) * backgrounds[:, None, None, :]
    return rgb, alpha, depth, means2d
