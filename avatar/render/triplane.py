"""The tri-plane hash-grid encoding as one function: :func:`triplane_encode`, with its torch twin.

A point of the unit cube is projected onto the three axis-aligned planes xy, yz and xz; each
plane holds a multi-resolution 2D grid of learned feature vectors (instant-ngp's hash encoding,
in 2D), read by bilinear interpolation. Per level ``l`` a plane is ``R_l`` x ``R_l`` cells
(``(R_l + 1)^2`` vertices); the first ``n_dense`` levels index their vertices densely
(``x + y (R_l + 1)``), the finer ones hash them into ``2**log2_hashmap_size`` rows
(``(x XOR y * 2654435761) & mask``, instant-ngp's prime). The module that owns the tables and
their layout is :class:`avatar.models.encodings.TriPlaneEncoding`.

Implementations (``implementation=``):

- ``"torch"``: :func:`_triplane_encode`, the vectorised PyTorch reference, any device and dtype.
- ``"cpp"``: the C++ kernel (``csrc/triplane_cpu.cpp``), CPU float32/float64 tensors.
- ``"cuda"``: the CUDA kernel (``cuda_ext/triplane.cu``), CUDA float32/float64 tensors.
- ``"auto"``: the kernel of the tensors' device when it builds, else the torch twin, silently.

An explicit kernel that is unavailable for the inputs (wrong device or dtype, no compiler, a
failed build) warns once and falls back to the twin, so a config asking for ``"cpp"`` still runs
where no compiler is installed.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

Implementation = Literal["auto", "torch", "cpp", "cuda"]

IMPLEMENTATIONS = ("auto", "torch", "cpp", "cuda")
"""Valid values of ``implementation``."""

PLANE_AXES = ((0, 1), (1, 2), (0, 2))
"""The coordinate axes of the three planes, in output order: xy, yz, xz."""

HASH_PRIME = 2654435761
"""Multiplier of the y coordinate in the spatial hash (instant-ngp's second prime; x uses 1)."""

_KERNEL_DTYPES = (torch.float32, torch.float64)
_warned: set[tuple[str, str]] = set()


def _row_view(rows: Tensor) -> Tensor:
    """``rows`` [K, F] viewed so that one element holds a whole row, when the dtype allows.

    Why: gathering and scattering 8-byte rows as single complex numbers runs 3-4x faster on the
    CPU than the same work on a ``[K, 2]`` float tensor (a 1D ``index_select``/``index_add_`` is
    vectorised, the 2D one loops over rows), and complex addition is exactly the per-channel
    addition the backward needs. Other shapes, dtypes and devices are returned unchanged (on
    CUDA the plain 2D kernels are fast already).
    """
    complex_of = {torch.float32: torch.complex64, torch.float64: torch.complex128}
    if (
        rows.device.type == "cpu"
        and rows.dtype in complex_of
        and rows.shape[1] % 2 == 0
        and rows.is_contiguous()
    ):
        viewed = rows.view(complex_of[rows.dtype])  # [K, F / 2]
        return viewed[:, 0] if viewed.shape[1] == 1 else viewed
    return rows


def _gather_rows(table: Tensor, index: Tensor) -> Tensor:  # [E, F], [K] -> [K, F]
    rows = _row_view(table).index_select(0, index)
    if rows.is_complex():
        rows = torch.view_as_real(rows).reshape(index.shape[0], table.shape[1])
    return rows


def _scatter_add_rows(n_rows: int, index: Tensor, rows: Tensor) -> Tensor:  # [K], [K, F] -> [E, F]
    rows = rows.contiguous()
    out = rows.new_zeros(n_rows, rows.shape[1])
    _row_view(out).index_add_(0, index, _row_view(rows))
    return out


class _BilinearGather(torch.autograd.Function):
    """``sum_c weights[c, q] * table[index[c, q]]`` over the 4 corners ``c`` of a cell.

    One autograd node instead of a gather, a product and a sum, because the generic backward is
    slow on the CPU: ``embedding``'s and ``index_put_``'s backward sort the ~2 M indices of a
    20 k-point call (4-10x slower than one ``index_add_``), and the corner reduction over a
    middle dimension of size 4 is strided. Here the corners are the leading dimension.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weights: Tensor) -> Tensor:  # type: ignore[override]
        # table [E, F], index [4, Q] int64, weights [4, Q] -> [Q, F]
        n_corners, q = index.shape
        corners = _gather_rows(table, index.reshape(-1)).reshape(n_corners, q, table.shape[1])
        out = corners[0] * weights[0, :, None]
        for c in range(1, n_corners):
            out.addcmul_(corners[c], weights[c, :, None])
        ctx.n_rows = table.shape[0]
        ctx.save_for_backward(index, weights, corners if weights.requires_grad else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:  # type: ignore[override]
        index, weights, corners = ctx.saved_tensors  # grad [Q, F]
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            rows = weights[:, :, None] * grad[None]  # [4, Q, F]
            rows = rows.reshape(-1, grad.shape[1])  # [4 Q, F]
            grad_table = _scatter_add_rows(ctx.n_rows, index.reshape(-1), rows)
        if ctx.needs_input_grad[2]:
            grad_weights = (corners * grad[None]).sum(dim=-1)  # [4, Q]
        return grad_table, None, grad_weights


def _triplane_encode(
    coords: Tensor,  # [M, 3]
    embeddings: Tensor,  # [E, F]
    resolutions: Tensor,  # [L]
    offsets: Tensor,  # [L, 3]
    n_dense: int,
    log2_hashmap_size: int,
) -> Tensor:  # [M, 3, L, F]
    """Bilinearly interpolated tri-plane features of points in the unit cube (torch twin).

    The reference every kernel is tested against. Vectorised over points, planes and levels; the
    dense levels are a prefix of the levels, so dense and hashed indices are two slices, not a
    per-level loop. Per level, ``pos = u R``, ``cell = min(trunc(pos), R - 1)`` (the far edge
    ``u = 1`` falls in the last cell), ``frac = pos - cell``; corners in the order (x0, y0),
    (x1, y0), (x0, y1), (x1, y1); weights computed in the coordinates' dtype, then cast to the
    table's. Arguments as :func:`triplane_encode`.
    """
    m, n_levels = coords.shape[0], resolutions.shape[0]
    q = n_levels * 3 * m
    uv = torch.stack([coords[:, list(a)] for a in PLANE_AXES])  # [3, M, 2]
    pos = uv * resolutions.to(coords.dtype)[:, None, None, None]  # [L, 3, M, 2]
    cell = torch.minimum(pos.detach().long(), (resolutions - 1)[:, None, None, None])  # [L, 3, M, 2]
    frac = pos - cell  # [L, 3, M, 2], in [0, 1]
    cx, cy = cell.unbind(-1)  # [L, 3, M] each

    parts = []
    if n_dense > 0:  # row-major vertex index, the corners at +0, +1, +stride, +stride + 1
        stride = resolutions[:n_dense, None, None] + 1  # [Ld, 1, 1]
        base = cx[:n_dense] + cy[:n_dense] * stride  # [Ld, 3, M]
        parts.append(torch.stack([base, base + 1, base + stride, base + stride + 1]))
    if n_dense < n_levels:  # instant-ngp spatial hash of each corner
        mask = (1 << log2_hashmap_size) - 1
        x0, y0 = cx[n_dense:], cy[n_dense:] * HASH_PRIME  # [Lh, 3, M]
        x1, y1 = x0 + 1, y0 + HASH_PRIME
        parts.append(torch.stack([x0 ^ y0, x1 ^ y0, x0 ^ y1, x1 ^ y1]) & mask)
    index = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [4, L, 3, M]
    index = (index + offsets[None, :, :, None]).reshape(4, q)  # [4, Q = L 3 M]

    fx, fy = frac.unbind(-1)  # [L, 3, M] each
    gx, gy = 1 - fx, 1 - fy
    weights = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy]).reshape(4, q)  # [4, Q]
    feats = _BilinearGather.apply(embeddings, index, weights.to(embeddings.dtype))  # [Q, F]
    return feats.reshape(n_levels, 3, m, embeddings.shape[1]).permute(2, 1, 0, 3)  # [M, 3, L, F]


def kernel_unavailable(implementation: str, coords: Tensor, embeddings: Tensor) -> str | None:
    """Why kernel ``implementation`` ("cpp" or "cuda") cannot encode these tensors, or None when
    it can. Builds (once per process) the kernel it asks about."""
    want = "cuda" if implementation == "cuda" else "cpu"
    if coords.device.type != want or embeddings.device != coords.device:
        return f"it needs {want.upper()} tensors, got coords on {coords.device} and embeddings on {embeddings.device}"
    if coords.dtype != embeddings.dtype or coords.dtype not in _KERNEL_DTYPES:
        return (f"it needs coords and embeddings of one dtype, float32 or float64, got {coords.dtype} and "
                f"{embeddings.dtype}")
    from avatar.render import _triplane_kernels

    if want == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if _triplane_kernels.load_cuda() is None:
            return "the CUDA kernel did not build (see the warning above)"
    elif _triplane_kernels.load_cpu() is None:
        return "the C++ kernel did not build (see the warning above)"
    return None


def resolve_implementation(implementation: str, coords: Tensor, embeddings: Tensor) -> str:
    """The implementation :func:`triplane_encode` uses for these tensors: "torch", "cpp" or "cuda".

    Raises:
        ValueError: ``implementation`` is not one of :data:`IMPLEMENTATIONS`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "torch":
        return "torch"
    if implementation == "auto":
        kind = "cuda" if coords.device.type == "cuda" else "cpp"
        return kind if kernel_unavailable(kind, coords, embeddings) is None else "torch"
    reason = kernel_unavailable(implementation, coords, embeddings)
    if reason is None:
        return implementation
    if (implementation, reason) not in _warned:
        _warned.add((implementation, reason))
        warnings.warn(f"triplane_encode: implementation={implementation!r} is unavailable ({reason}); "
                      "falling back to PyTorch", RuntimeWarning, stacklevel=3)
    return "torch"


def triplane_encode(
    coords: Tensor,  # [M, 3]
    embeddings: Tensor,  # [E, F]
    resolutions: Tensor,  # [L]
    offsets: Tensor,  # [L, 3]
    n_dense: int,
    log2_hashmap_size: int,
    implementation: Implementation = "auto",
) -> Tensor:  # [M, 3, L, F]
    """Bilinearly interpolated tri-plane features of points in the unit cube.

    Args:
        coords: positions in ``[0, 1]^3``; clamp first (the twin raises on a dense index below
            zero, the kernels clamp the cell instead). [M, 3]
        embeddings: all tables: rows ``offsets[l, p]`` onwards belong to level ``l`` of plane
            ``p`` (``(R_l + 1)^2`` rows when dense, ``2**log2_hashmap_size`` when hashed). [E, F]
        resolutions: cells per side of each level, int64. [L]
        offsets: first table row of each level and plane, int64. [L, 3]
        n_dense: the first ``n_dense`` levels are indexed densely, the rest hashed.
        log2_hashmap_size: hashed levels use ``2**log2_hashmap_size`` rows.
        implementation: "auto", "torch", "cpp" or "cuda" (see the module docstring).

    Returns:
        Features per point, plane (xy, yz, xz) and level, in ``embeddings``' dtype.
        Differentiable (once) with respect to ``embeddings`` and ``coords`` (through the
        bilinear weights; zero across a cell's interior is not special-cased). [M, 3, L, F]

    Raises:
        ValueError: bad shapes or an unknown ``implementation``.

    Examples:
        >>> import torch
        >>> res = torch.tensor([4, 8])
        >>> offsets = torch.tensor([[0, 25, 50], [75, 139, 203]])  # level 0 dense, level 1 hashed
        >>> table = torch.randn(267, 2)
        >>> triplane_encode(torch.rand(10, 3), table, res, offsets, n_dense=1, log2_hashmap_size=6).shape
        torch.Size([10, 3, 2, 2])
    """
    if coords.ndim != 2 or coords.shape[1] != 3 or not coords.is_floating_point():
        raise ValueError(f"coords: expected a floating tensor of shape [M, 3], got {tuple(coords.shape)} {coords.dtype}")
    if embeddings.ndim != 2 or not embeddings.is_floating_point():
        raise ValueError(f"embeddings: expected a floating tensor of shape [E, F], got {tuple(embeddings.shape)}")
    n_levels = resolutions.shape[0] if resolutions.ndim == 1 else -1
    if n_levels < 1 or tuple(offsets.shape) != (n_levels, 3):
        raise ValueError(f"resolutions [L] and offsets [L, 3]: got {tuple(resolutions.shape)} and "
                         f"{tuple(offsets.shape)}")
    if not 0 <= n_dense <= n_levels:
        raise ValueError(f"n_dense: expected 0..{n_levels}, got {n_dense}")
    chosen = resolve_implementation(implementation, coords, embeddings)
    if chosen == "torch":
        return _triplane_encode(coords, embeddings, resolutions, offsets, n_dense, log2_hashmap_size)
    from avatar.render._triplane_kernels import triplane_encode_kernel

    return triplane_encode_kernel(coords, embeddings, resolutions, offsets, n_dense, log2_hashmap_size)
