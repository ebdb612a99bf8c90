"""Ray marching with empty-space skipping and front-to-back volume compositing (instant-NGP style).

Four functions, plain tensors in and out:

- :func:`ray_aabb`: where rays enter and leave the scene's box.
- :func:`march_rays`: uniform samples along each ray inside the box, only in occupied cells of an
  occupancy grid, packed ray after ray (``offsets`` / ``ray_ids``).
- :func:`composite_rays`: alpha compositing of per-sample densities and colours into per-ray colour,
  opacity and depth, with early ray termination; differentiable w.r.t. densities and colours.
- :func:`composite_weights`: the per-sample weights of that compositing, for regularisers.

:func:`march_rays` and :func:`composite_rays` have three implementations, picked with
``implementation=``: ``"torch"`` (the vectorised PyTorch twins ``_march_rays`` / ``_composite_rays``
below, any device and dtype: the reference), ``"cpp"`` (C++ kernel, CPU float32/float64) and
``"cuda"`` (CUDA kernel, CUDA float32/float64), see :mod:`avatar.render._raymarch_kernels`.
``"auto"`` takes the kernel of the tensors' device when it builds, else the twin; an explicitly
requested kernel that cannot serve the tensors warns (once per reason) and uses the twin.

Why packed samples: rays in a head crop cross very different amounts of occupied space (most miss
the head), so a dense [rays, max_samples] layout would be mostly padding for the network that
evaluates the samples. The packed layout is nerfacc's and instant-NGP's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from avatar.render import _raymarch_kernels

Implementation = Literal["auto", "torch", "cpp", "cuda"]
_IMPLEMENTATIONS = ("auto", "torch", "cpp", "cuda")
_WARNED: set[str] = set()
_DENSE_CHUNK = 1 << 22
"""Candidates (rays x steps) per chunk of the torch marching twin, to bound its memory."""


@dataclass
class RaySamples:
    """Samples of a batch of R rays, packed ray after ray (S samples in all)."""

    ts: Tensor
    """Parameter t of each sample's centre along its ray (position = origin + t * dir). [S]"""
    deltas: Tensor
    """Length in t each sample stands for (the marching step). [S]"""
    ray_ids: Tensor
    """Ray of each sample, int64, non-decreasing. [S]"""
    offsets: Tensor
    """Samples of ray r are ``offsets[r]:offsets[r + 1]``, int64; ``offsets[0] = 0``. [R + 1]"""
    positions: Tensor
    """Sample centres in world space. [S, 3]"""

    @property
    def n_samples(self) -> int:
        return self.ts.shape[0]


def ray_aabb(
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3]
    aabb: Tensor,  # [6]
) -> tuple[Tensor, Tensor]:
    """Where rays enter and leave an axis-aligned box (slab test), in the rays' parameter t.

    Args:
        origins: ray origins. [R, 3]
        dirs: ray directions; need not be unit (t is in units of ``dirs``), components may be 0. [R, 3]
        aabb: the box, (xmin, ymin, zmin, xmax, ymax, zmax). [6]

    Returns:
        near: entry, clamped to >= 0 (an origin inside the box gives 0). [R]
        far: exit. [R]
        Rays that miss the box, only touch it, have it behind them or have a zero direction get
        ``near = far = 0``, so they produce no samples.

    Raises:
        ValueError: shapes or devices do not match.
    """
    if origins.dim() != 2 or origins.shape[-1] != 3 or dirs.shape != origins.shape:
        raise ValueError(f"origins and dirs must both be [R, 3], got {tuple(origins.shape)} and {tuple(dirs.shape)}")
    if aabb.shape != (6,):
        raise ValueError(f"aabb must be [6] (xmin, ymin, zmin, xmax, ymax, zmax), got {tuple(aabb.shape)}")
    aabb = aabb.to(origins)
    lo, hi = aabb[:3], aabb[3:]
    flat = dirs == 0
    safe = torch.where(flat, torch.ones_like(dirs), dirs)
    t0, t1 = (lo - origins) / safe, (hi - origins) / safe
    inside = (origins >= lo) & (origins <= hi)
    inf = torch.full_like(dirs, float("inf"))
    # A direction component of 0 puts no bound on t when the origin is within that slab, and
    # excludes every t when it is not.
    t_enter = torch.where(flat, torch.where(inside, -inf, inf), torch.minimum(t0, t1))
    t_exit = torch.where(flat, torch.where(inside, inf, -inf), torch.maximum(t0, t1))
    near = t_enter.amax(dim=-1).clamp_min(0.0)
    far = t_exit.amin(dim=-1)
    hit = (far > near) & torch.isfinite(far)
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero)


def march_rays(
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    occupancy: Tensor,  # [G, G, G] bool
    aabb: Tensor,  # [6]
    step: float,
    max_samples: int,
    implementation: Implementation = "auto",
) -> RaySamples:
    """Uniform samples along each ray, skipping empty space with an occupancy grid. No gradients.

    Ray r's candidates are ``t_k = near[r] + (k + 0.5) * step`` for k = 0, 1, ... while
    ``t_k < far[r]``; candidate k is kept when the occupancy cell holding ``origins[r] + t_k *
    dirs[r]`` is set, and the ray stops after ``max_samples`` kept samples. The cell of a point p
    along axis a is ``floor((p_a - lo_a) * G_a / (hi_a - lo_a))`` clamped to [0, G_a - 1] (points
    outside the box, from rounding or from a ``near``/``far`` not given by :func:`ray_aabb`, use the
    border cell).

    Every implementation computes t, p and the cell index in the inputs' dtype with one rounding per
    operation, in the order written above (``G / (hi - lo)`` once per axis), so all of them return
    exactly the same samples.

    Args:
        origins: ray origins. [R, 3]
        dirs: ray directions (t is in units of them). [R, 3]
        near, far: the interval of t to sample, e.g. from :func:`ray_aabb`; finite. [R]
        occupancy: which cells of a grid over ``aabb`` may hold density, bool, indexed [ix, iy, iz]
            (x first). Any [Gx, Gy, Gz] works; the NGP grid is cubic. [G, G, G]
        aabb: the box the grid covers, (xmin, ymin, zmin, xmax, ymax, zmax). [6]
        step: distance in t between candidates (> 0); also each sample's ``delta``.
        max_samples: most samples kept per ray (>= 0).
        implementation: "auto", "torch", "cpp" or "cuda" (see the module docstring).

    Returns:
        The samples, packed ray after ray (:class:`RaySamples`); ``ts``, ``deltas`` and
        ``positions`` have the dtype of ``origins``.

    Raises:
        ValueError: a shape, dtype or device does not match, or an option is out of range.

    Examples:
        >>> import torch
        >>> from avatar.render.raymarch import march_rays, ray_aabb
        >>> aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
        >>> origins, dirs = torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
        >>> near, far = ray_aabb(origins, dirs, aabb)
        >>> occupancy = torch.ones(4, 4, 4, dtype=torch.bool)
        >>> samples = march_rays(origins, dirs, near, far, occupancy, aabb, step=0.5, max_samples=64)
        >>> samples.ts.tolist(), samples.offsets.tolist()
        ([2.25, 2.75, 3.25, 3.75], [0, 4])
    """
    n_rays = origins.shape[0] if origins.dim() == 2 else -1
    if origins.dim() != 2 or origins.shape[1] != 3 or dirs.shape != origins.shape:
        raise ValueError(f"origins and dirs must both be [R, 3], got {tuple(origins.shape)} and {tuple(dirs.shape)}")
    if near.shape != (n_rays,) or far.shape != (n_rays,):
        raise ValueError(f"near and far must be [R] = [{n_rays}], got {tuple(near.shape)} and {tuple(far.shape)}")
    if occupancy.dim() != 3 or occupancy.dtype != torch.bool or min(occupancy.shape) < 1:
        raise ValueError(f"occupancy must be a bool [Gx, Gy, Gz] grid, got {occupancy.dtype} {tuple(occupancy.shape)}")
    if aabb.shape != (6,):
        raise ValueError(f"aabb must be [6] (xmin, ymin, zmin, xmax, ymax, zmax), got {tuple(aabb.shape)}")
    if not origins.is_floating_point():
        raise ValueError(f"origins must be floating point, got {origins.dtype}")
    for name, t in (("dirs", dirs), ("near", near), ("far", far), ("occupancy", occupancy)):
        if t.device != origins.device:
            raise ValueError(f"{name} is on {t.device}, origins on {origins.device}: all must be on one device")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step}")
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    dtype = origins.dtype
    dirs, near, far = (t.to(dtype).contiguous() for t in (dirs, near, far))
    origins, occupancy = origins.contiguous(), occupancy.contiguous()
    if not (torch.isfinite(near).all() and torch.isfinite(far).all()):
        raise ValueError("near and far must be finite (ray_aabb gives finite ones)")
    params = _grid_params(aabb.to(origins), occupancy.shape, step)  # aabb may live anywhere

    chosen = _choose(implementation, origins, "march_rays")
    with torch.no_grad():
        if chosen == "torch":
            ts, deltas, ray_ids, offsets, positions = _march_rays(
                origins, dirs, near, far, occupancy, params, max_samples)
        else:
            ts, deltas, ray_ids, offsets, positions = _raymarch_kernels.march(
                origins, dirs, near, far, occupancy, params, max_samples)
    return RaySamples(ts=ts, deltas=deltas, ray_ids=ray_ids, offsets=offsets, positions=positions)


def composite_rays(
    sigmas: Tensor,  # [S]
    rgbs: Tensor,  # [S, C]
    deltas: Tensor,  # [S]
    ts: Tensor,  # [S]
    offsets: Tensor,  # [R + 1]
    stop_transmittance: float = 1e-4,
    implementation: Implementation = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Front-to-back alpha compositing of packed samples into per-ray colour, opacity and depth.

    Along each ray, in sample order, with ``s_i = sigma_i * delta_i`` and ``T_0 = 1``:

    - sample i contributes iff ``T_i >= stop_transmittance``; the first sample that fails this ends
      the ray (it and all later samples get weight 0 and no gradient),
    - ``alpha_i = 1 - exp(-s_i)``, ``w_i = T_i * alpha_i``, ``T_{i+1} = T_i * exp(-s_i)``
      (= ``T_i (1 - alpha_i)``).

    Implementations differ only by rounding (the twin computes ``T_i`` as ``exp(-sum_{j<i} s_j)``,
    the kernels as a running product); only a ``T_i`` within rounding of ``stop_transmittance`` can
    be decided differently. ``stop_transmittance = 0`` never stops.

    Args:
        sigmas: densities, >= 0. [S]
        rgbs: per-sample features, any C >= 1. [S, C]
        deltas: length each sample stands for (``RaySamples.deltas``). [S]
        ts: sample positions along the ray, for depth (``RaySamples.ts``). [S]
        offsets: samples of ray r are ``offsets[r]:offsets[r + 1]``; int64, ``offsets[0] = 0``,
            ``offsets[-1] = S``. [R + 1]
        stop_transmittance: early ray termination threshold, in [0, 1].
        implementation: "auto", "torch", "cpp" or "cuda" (see the module docstring).

    Returns:
        rgb: ``sum_i w_i rgbs_i``, over black. [R, C]
        opacity: ``sum_i w_i`` (= 1 - final transmittance). [R]
        depth: ``sum_i w_i ts_i``, not divided by opacity. [R]
        Differentiable w.r.t. ``sigmas`` and ``rgbs``; ``deltas`` and ``ts`` are treated as constants.

    Raises:
        ValueError: a shape, dtype or device does not match, or an option is out of range.
    """
    _check_composite(sigmas, deltas, offsets, stop_transmittance)
    if rgbs.dim() != 2 or rgbs.shape[0] != sigmas.shape[0] or rgbs.shape[1] < 1:
        raise ValueError(f"rgbs must be [S, C] = [{sigmas.shape[0]}, C >= 1], got {tuple(rgbs.shape)}")
    if ts.shape != sigmas.shape:
        raise ValueError(f"ts must be [S] = [{sigmas.shape[0]}], got {tuple(ts.shape)}")
    if rgbs.dtype != sigmas.dtype or rgbs.device != sigmas.device or ts.device != sigmas.device:
        raise ValueError(f"rgbs and ts must match sigmas ({sigmas.dtype} on {sigmas.device}), got "
                         f"{rgbs.dtype} on {rgbs.device} and {ts.device}")
    deltas, ts = deltas.detach().to(sigmas.dtype).contiguous(), ts.detach().to(sigmas.dtype).contiguous()
    sigmas, rgbs, offsets = sigmas.contiguous(), rgbs.contiguous(), offsets.contiguous()
    chosen = _choose(implementation, sigmas, "composite_rays")
    if chosen == "torch":
        return _composite_rays(sigmas, rgbs, deltas, ts, offsets, stop_transmittance)
    return _raymarch_kernels.composite(sigmas, rgbs, deltas, ts, offsets, float(stop_transmittance))


def composite_weights(
    sigmas: Tensor,  # [S]
    deltas: Tensor,  # [S]
    offsets: Tensor,  # [R + 1]
    stop_transmittance: float = 1e-4,
) -> Tensor:
    """The compositing weights ``w_i = T_i * alpha_i`` of :func:`composite_rays` (same definition,
    same early termination), for losses on the weights themselves (distortion, entropy).

    PyTorch only, differentiable w.r.t. ``sigmas`` (``deltas`` is a constant).

    Args:
        sigmas: densities, >= 0. [S]
        deltas: length each sample stands for. [S]
        offsets: samples of ray r are ``offsets[r]:offsets[r + 1]``, int64. [R + 1]
        stop_transmittance: early ray termination threshold, in [0, 1].

    Returns:
        weights: 0 for samples after a ray's stop. [S]
    """
    _check_composite(sigmas, deltas, offsets, stop_transmittance)
    return _composite_weights(sigmas, deltas.detach().to(sigmas.dtype), offsets, stop_transmittance)


# ---------------------------------------------------------------------------------------------------
# PyTorch twins: the references the kernels are tested against.


def _march_rays(
    origins: Tensor,  # [R, 3]
    dirs: Tensor,  # [R, 3]
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    occupancy: Tensor,  # [Gx, Gy, Gz] bool
    params: Tensor,  # [7]: lo (3), scale (3), step
    max_samples: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Twin of :func:`march_rays`: every candidate of a dense [rays, steps] grid, masked.

    Returns:
        ts [S], deltas [S], ray_ids [S] int64, offsets [R + 1] int64, positions [S, 3].
    """
    n_rays, device, dtype = origins.shape[0], origins.device, origins.dtype
    lo, scale, step = params[:3], params[3:6], params[6]
    top = torch.tensor(occupancy.shape, device=device, dtype=dtype) - 1  # last cell per axis
    strides = torch.tensor([occupancy.shape[1] * occupancy.shape[2], occupancy.shape[2], 1], device=device)
    flat_occ = occupancy.reshape(-1)
    # Enough steps for the longest ray, with margin: the exact test is t < far below.
    longest = float((far - near).max()) if n_rays else 0.0
    n_steps = max(int(longest / float(step)) + 2, 1) if max_samples > 0 else 0
    k = torch.arange(n_steps, device=device, dtype=dtype)
    chunk = max(1, _DENSE_CHUNK // max(n_steps, 1))
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    counts = []
    for r0 in range(0, n_rays, chunk):
        o, d = origins[r0:r0 + chunk], dirs[r0:r0 + chunk]
        t = near[r0:r0 + chunk, None] + (k + 0.5) * step  # [r, steps]
        p = o[:, None, :] + t[..., None] * d[:, None, :]  # [r, steps, 3]
        cell = torch.minimum(((p - lo) * scale).floor().clamp_min(0), top).long()
        keep = (t < far[r0:r0 + chunk, None]) & flat_occ[(cell * strides).sum(-1)]
        keep &= keep.cumsum(dim=1) <= max_samples
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: ray after ray, k increasing
        parts.append((rows + r0, t[rows, cols], p[rows, cols]))
        counts.append(keep.sum(dim=1))
    ray_ids = torch.cat([q[0] for q in parts]) if parts else torch.zeros(0, dtype=torch.int64, device=device)
    ts = torch.cat([q[1] for q in parts]) if parts else origins.new_zeros(0)
    positions = torch.cat([q[2] for q in parts]) if parts else origins.new_zeros(0, 3)
    offsets = torch.zeros(n_rays + 1, dtype=torch.int64, device=device)
    if counts:
        offsets[1:] = torch.cat(counts).cumsum(0)
    return ts, torch.full_like(ts, float(step)), ray_ids, offsets, positions


def _composite_weights(
    sigmas: Tensor,  # [S]
    deltas: Tensor,  # [S]
    offsets: Tensor,  # [R + 1]
    stop_transmittance: float,
) -> Tensor:
    """Weights w_i [S] with early termination, by an exclusive cumulative sum of ``sigma * delta``
    along each ray, on a padded [R, longest ray] matrix (a cumsum over the packed samples of all rays
    would lose precision to the earlier rays' sums)."""
    n_rays = offsets.shape[0] - 1
    counts = offsets.diff()
    ray_ids = torch.repeat_interleave(torch.arange(n_rays, device=offsets.device), counts,
                                      output_size=sigmas.shape[0])
    slot = torch.arange(sigmas.shape[0], device=offsets.device) - offsets[ray_ids]
    longest = int(counts.max()) if n_rays else 0
    s = sigmas * deltas
    padded = s.new_zeros(n_rays, longest + 1).index_put((ray_ids, slot + 1), s)  # column 0: nothing before
    before = padded.cumsum(dim=1)[ray_ids, slot]  # sum_{j < i} s_j
    trans = torch.exp(-before)  # T_i, non-increasing along the ray, so the first failure ends it
    alpha = -torch.expm1(-s)
    weights = trans * alpha
    return torch.where(trans >= stop_transmittance, weights, torch.zeros_like(weights))


def _composite_rays(
    sigmas: Tensor,  # [S]
    rgbs: Tensor,  # [S, C]
    deltas: Tensor,  # [S]
    ts: Tensor,  # [S]
    offsets: Tensor,  # [R + 1]
    stop_transmittance: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of :func:`composite_rays`: weights, then per-ray sums with ``index_add``.

    Returns:
        rgb [R, C], opacity [R], depth [R].
    """
    n_rays = offsets.shape[0] - 1
    weights = _composite_weights(sigmas, deltas, offsets, stop_transmittance)
    ray_ids = torch.repeat_interleave(torch.arange(n_rays, device=offsets.device), offsets.diff(),
                                      output_size=sigmas.shape[0])
    rgb = rgbs.new_zeros(n_rays, rgbs.shape[1]).index_add(0, ray_ids, weights[:, None] * rgbs)
    opacity = weights.new_zeros(n_rays).index_add(0, ray_ids, weights)
    depth = weights.new_zeros(n_rays).index_add(0, ray_ids, weights * ts)
    return rgb, opacity, depth


# ---------------------------------------------------------------------------------------------------
# Checks and dispatch.


def _grid_params(aabb: Tensor, dims: tuple[int, ...], step: float) -> Tensor:
    """[lo (3), G / (hi - lo) (3), step] in ``aabb``'s dtype: the numbers every implementation uses."""
    lo, hi = aabb[:3], aabb[3:]
    if not bool((hi > lo).all()):
        raise ValueError(f"aabb must have min < max on every axis, got {aabb.tolist()}")
    scale = torch.tensor(dims, dtype=aabb.dtype, device=aabb.device) / (hi - lo)
    return torch.cat([lo, scale, torch.tensor([step], dtype=aabb.dtype, device=aabb.device)]).contiguous()


def _check_composite(sigmas: Tensor, deltas: Tensor, offsets: Tensor, stop_transmittance: float) -> None:
    if sigmas.dim() != 1 or not sigmas.is_floating_point():
        raise ValueError(f"sigmas must be a floating point [S] tensor, got {sigmas.dtype} {tuple(sigmas.shape)}")
    if deltas.shape != sigmas.shape:
        raise ValueError(f"deltas must be [S] = [{sigmas.shape[0]}], got {tuple(deltas.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1 or offsets.dtype != torch.int64:
        raise ValueError(f"offsets must be an int64 [R + 1] tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    if deltas.device != sigmas.device or offsets.device != sigmas.device:
        raise ValueError(f"deltas and offsets must be on {sigmas.device}, got {deltas.device} and {offsets.device}")
    if not 0.0 <= stop_transmittance <= 1.0:
        raise ValueError(f"stop_transmittance must be in [0, 1], got {stop_transmittance}")
    if offsets.device.type == "cpu":  # on CUDA this check would cost a device sync
        if int(offsets[0]) != 0 or int(offsets[-1]) != sigmas.shape[0] or bool((offsets.diff() < 0).any()):
            raise ValueError(f"offsets must rise from 0 to S = {sigmas.shape[0]}, got {offsets[0]} ... {offsets[-1]}")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _choose(implementation: str, like: Tensor, what: str) -> str:
    """Resolve ``implementation`` for tensors like ``like``; an unavailable explicit choice warns once."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(map(repr, _IMPLEMENTATIONS))}, got {implementation!r}")
    device, dtype = like.device.type, like.dtype
    if implementation == "torch":
        return "torch"
    if implementation == "auto":
        if device == "cuda" and _raymarch_kernels.cuda_available(dtype):
            return "cuda"
        if device == "cpu" and _raymarch_kernels.cpu_available(dtype):
            return "cpp"
        return "torch"
    wanted_device = "cpu" if implementation == "cpp" else "cuda"
    if device != wanted_device:
        why = f"it needs {wanted_device.upper()} tensors, got {device} ones"
    elif dtype not in (torch.float32, torch.float64):
        why = f"it supports float32 and float64, got {dtype}"
    elif (_raymarch_kernels.cpu_available if implementation == "cpp" else _raymarch_kernels.cuda_available)(dtype):
        return implementation
    else:
        why = "the kernel could not be built (see the earlier warning)"
    _warn_once(f"{what}: implementation={implementation!r} is unavailable ({why}); using the PyTorch twin")
    return "torch"
