"""Real spherical harmonics (degrees 0..3) for view-dependent Gaussian colour.

The basis, its constants and its sign convention are the ones 3D Gaussian Splatting and gsplat use,
so that SH coefficients trained with one renderer (or read from a standard 3DGS ``.ply``) give the
same colours with the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Normalisation constants of the real SH basis, band by band (the standard 3DGS values).
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients a colour of degree ``degree`` uses: ``(degree + 1) ** 2``."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    return (degree + 1) ** 2


def _sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Evaluate the real SH basis up to ``degree`` at unit directions.

    Args:
        degree: 0..3.
        dirs: unit directions. [..., 3]

    Returns:
        The basis values, in the coefficient order of 3DGS. [..., (degree + 1) ** 2]
    """
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _C2[0] * x * y,
            _C2[1] * y * z,
            _C2[2] * (2.0 * zz - xx - yy),
            _C2[3] * x * z,
            _C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _C3[0] * y * (3.0 * xx - yy),
            _C3[1] * x * y * z,
            _C3[2] * y * (4.0 * zz - xx - yy),
            _C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            _C3[4] * x * (4.0 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Colour of SH coefficients seen from view directions (differentiable in both).

    This is the raw SH sum. The rasterizer, like 3DGS and gsplat, turns it into a colour with
    ``clamp_min(sh + 0.5, 0)``; that offset is not applied here.

    Args:
        degree: highest SH band used, 0..3. Coefficients beyond ``(degree + 1) ** 2`` are ignored,
            which lets training raise the degree progressively on a fixed-size tensor.
        dirs: view directions, from the camera centre towards the Gaussian; need not be unit
            length (they are normalised here). [..., 3]
        coeffs: SH coefficients per colour channel. [..., K, D] with K >= (degree + 1) ** 2

    Returns:
        The SH value per channel. [..., D]
    """
    n_bases = num_sh_bases(degree)
    if dirs.shape[-1] != 3:
        raise ValueError(f"dirs must be [..., 3], got {tuple(dirs.shape)}")
    if coeffs.dim() < 2 or coeffs.shape[-2] < n_bases:
        raise ValueError(
            f"coeffs must be [..., K, D] with K >= {n_bases} for degree {degree}, "
            f"got {tuple(coeffs.shape)}"
        )
    # Normalise without dividing by zero for a Gaussian sitting exactly on the camera centre.
    unit = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    basis = _sh_basis(degree, unit)  # [..., n_bases]
    return (basis.unsqueeze(-1) * coeffs[..., :n_bases, :]).sum(dim=-2)
