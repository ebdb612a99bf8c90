"""Edits of a :class:`~avatar.models.gaussians.GaussianSet` that keep its Adam state in sync.

Densification changes the *number* of Gaussians. Every edit here therefore does three things at
once, under ``torch.no_grad()``:

1. builds new tensors for each parameter (rows appended, replaced or dropped),
2. swaps them into the set as fresh ``nn.Parameter`` objects
   (:meth:`GaussianSet.replace_parameters`),
3. rewrites the optimizer so it points at those new parameters, carrying each surviving row's
   Adam moments (``exp_avg``, ``exp_avg_sq``, and ``max_exp_avg_sq`` with amsgrad) along with
   the row. New rows start with zero moments: they have no gradient history, and copying the
   parent's momentum would push the parent and its copy in lockstep.

Optimizer layout
----------------
One ``torch.optim.Adam`` may hold any number of parameter groups, but each parameter of the set
must sit in a group **of its own** (one tensor per group), so that per-parameter learning rates
and schedules stay independent. Groups are found by the *identity* of the parameter they hold,
not by name; :func:`make_optimizer` builds the recommended layout, with ``group["name"]`` set to
the parameter name ("means", "quats", "log_scales", "opacity_logits", "sh"), optionally
prefixed when several sets share one optimizer (e.g. "mouth.means"). :func:`check_optimizer`
verifies a hand-built one.

A parameter that no optimizer group holds is still edited (the set stays consistent), it is
simply not trained.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar.models.gaussians import GaussianSet

SPLIT_SCALE_DIVISOR = 1.6
"""Children of a split get the parent's scales divided by this (3DGS: 0.8 * 2 = 1.6), so two
children roughly cover the parent's extent without doubling its footprint."""

RowEdit = Callable[[str, Tensor], Tensor]
"""``(parameter name, old rows [N, ...]) -> new rows [M, ...]`` applied to each parameter."""


def make_optimizer(
    gaussians: GaussianSet,
    lrs: dict[str, float],
    *,
    prefix: str = "",
    eps: float = 1e-15,
    optimizer: Optional[torch.optim.Adam] = None,
) -> torch.optim.Adam:
    """An Adam with one group per parameter of ``gaussians`` (the layout the ops expect).

    Args:
        gaussians: the set to optimise.
        lrs: learning rate per parameter name; every name of ``GaussianSet.PARAM_NAMES`` must
            be present (a rate of 0 keeps a parameter fixed but still in sync).
        prefix: prepended to ``group["name"]`` (e.g. "mouth.") when several sets share one
            optimizer.
        eps: Adam epsilon. 1e-15 as in 3DGS: gradients of positions are tiny, and the default
            1e-8 would swamp them.
        optimizer: add the groups to this existing Adam instead of creating one.

    Returns:
        The optimizer (``optimizer`` itself when given).

    Raises:
        ValueError: a learning rate is missing.
    """
    missing = [n for n in GaussianSet.PARAM_NAMES if n not in lrs]
    if missing:
        raise ValueError(
            f"lrs must give a learning rate for each of {list(GaussianSet.PARAM_NAMES)}, "
            f"missing {missing}"
        )
    groups = [
        {"params": [getattr(gaussians, n)], "lr": float(lrs[n]), "name": prefix + n}
        for n in GaussianSet.PARAM_NAMES
    ]
    if optimizer is None:
        return torch.optim.Adam(groups, eps=eps)
    for group in groups:
        group["eps"] = eps
        optimizer.add_param_group(group)
    return optimizer


def check_optimizer(gaussians: GaussianSet, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless each parameter of ``gaussians`` is alone in one group.

    A group holding two tensors could not have its rows edited consistently (the ops replace
    ``group["params"][0]``), and a parameter in two groups would be stepped twice.
    """
    for name in GaussianSet.PARAM_NAMES:
        param = getattr(gaussians, name)
        holders = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
        if len(holders) > 1:
            raise ValueError(f"parameter {name!r} must be in one optimizer group, found in {len(holders)}")
        if holders and len(holders[0]["params"]) != 1:
            raise ValueError(
                f"parameter {name!r} must be alone in its optimizer group (one tensor per group), "
                f"got a group of {len(holders[0]['params'])} tensors"
            )


@torch.no_grad()
def edit_rows(
    gaussians: GaussianSet,
    optimizer: Optional[torch.optim.Optimizer],
    param_fn: RowEdit,
    state_fn: RowEdit,
) -> None:
    """Apply a row edit to every parameter of ``gaussians`` and the matching optimizer state.

    The building block of the other ops, public so that a trainer can add its own edits.

    Args:
        gaussians: edited in place (its parameters are replaced by new ``nn.Parameter``s).
        optimizer: its groups' references and per-row state follow; None to edit the set only.
        param_fn: new values of a parameter from its old values.
        state_fn: new optimizer-state rows from old ones (``exp_avg`` etc.; same row mapping as
            ``param_fn``, but new rows usually zero). Scalars such as Adam's ``step`` are kept.
    """
    old = {name: getattr(gaussians, name) for name in GaussianSet.PARAM_NAMES}
    gaussians.replace_parameters({name: param_fn(name, p.data) for name, p in old.items()})
    for name, old_param in old.items():
        getattr(gaussians, name).requires_grad_(old_param.requires_grad)
    if optimizer is None:
        return
    for name, old_param in old.items():
        new_param = getattr(gaussians, name)
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is not old_param:
                    continue
                group["params"][i] = new_param
                state = optimizer.state.pop(old_param, None)
                if state:
                    optimizer.state[new_param] = {
                        key: state_fn(name, value)
                        if isinstance(value, Tensor) and value.dim() > 0
                        and value.shape == old_param.shape
                        else value
                        for key, value in state.items()
                    }


def _check_mask(gaussians: GaussianSet, mask: Tensor, what: str) -> Tensor:
    n = len(gaussians)
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(f"{what} mask must be bool [N] = [{n}], got {mask.dtype} {tuple(mask.shape)}")
    return mask.to(gaussians.means.device)


def _zero_rows(n_new: int) -> RowEdit:
    """State edit that keeps the old rows and appends ``n_new`` zero rows."""

    def fn(_: str, v: Tensor) -> Tensor:
        return torch.cat([v, v.new_zeros((n_new,) + v.shape[1:])])

    return fn


@torch.no_grad()
def duplicate(gaussians: GaussianSet, optimizer: Optional[torch.optim.Optimizer], mask: Tensor) -> int:
    """Append an exact copy of each Gaussian where ``mask`` is True (3DGS "clone").

    Copies land on top of their originals; the next gradient steps pull them apart. Appending
    (rather than interleaving) keeps every existing row at its index.

    Args:
        mask: which Gaussians to copy. bool [N]

    Returns:
        The number of Gaussians added.
    """
    mask = _check_mask(gaussians, mask, "duplicate")
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    edit_rows(gaussians, optimizer, lambda _, v: torch.cat([v, v[idx]]), _zero_rows(idx.numel()))
    return int(idx.numel())


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] of (w, x, y, z) quaternions [..., 4] (normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(quats.shape[:-1] + (3, 3))


@torch.no_grad()
def split(
    gaussians: GaussianSet,
    optimizer: Optional[torch.optim.Optimizer],
    mask: Tensor,
    *,
    generator: Optional[torch.Generator] = None,
) -> int:
    """Replace each Gaussian where ``mask`` is True by two smaller ones drawn from it (3DGS "split").

    Each child's centre is a sample of the parent's own 3D Gaussian (so children spread along
    its long axes), its scales are the parent's divided by :data:`SPLIT_SCALE_DIVISOR`, and it
    inherits rotation, opacity and colour. Parents are removed; unselected Gaussians keep their
    order at the front, the 2K children are appended.

    Args:
        mask: which Gaussians to split. bool [N]
        generator: random source of the child positions (None: torch's global one).

    Returns:
        The net number of Gaussians added (one per split).
    """
    mask = _check_mask(gaussians, mask, "split")
    idx = mask.nonzero().squeeze(1)
    k = int(idx.numel())
    if k == 0:
        return 0
    keep = ~mask
    scales = torch.exp(gaussians.log_scales.data[idx])  # [K, 3]
    rot = quat_to_rotmat(gaussians.quats.data[idx])  # [K, 3, 3]
    noise_device = scales.device if generator is None else generator.device
    noise = torch.randn((2, k, 3), generator=generator, dtype=scales.dtype, device=noise_device)
    noise = noise.to(scales.device)
    offsets = torch.einsum("kij,ckj->cki", rot, scales[None] * noise)  # [2, K, 3]
    children_means = (gaussians.means.data[idx][None] + offsets).reshape(2 * k, 3)
    shrink = math.log(SPLIT_SCALE_DIVISOR)

    def param_fn(name: str, v: Tensor) -> Tensor:
        if name == "means":
            children = children_means
        elif name == "log_scales":
            children = (v[idx] - shrink).repeat(2, 1)
        else:
            children = v[idx].repeat((2,) + (1,) * (v.dim() - 1))
        return torch.cat([v[keep], children])

    def state_fn(_: str, v: Tensor) -> Tensor:
        return torch.cat([v[keep], v.new_zeros((2 * k,) + v.shape[1:])])

    edit_rows(gaussians, optimizer, param_fn, state_fn)
    return k


@torch.no_grad()
def remove(gaussians: GaussianSet, optimizer: Optional[torch.optim.Optimizer], mask: Tensor) -> int:
    """Drop the Gaussians where ``mask`` is True, with their optimizer state.

    Args:
        mask: which Gaussians to remove. bool [N]

    Returns:
        The number removed.
    """
    mask = _check_mask(gaussians, mask, "remove")
    n = int(mask.sum())
    if n == 0:
        return 0
    keep = ~mask
    edit_rows(gaussians, optimizer, lambda _, v: v[keep], lambda _, v: v[keep])
    return n


@torch.no_grad()
def reset_opacity(gaussians: GaussianSet, optimizer: Optional[torch.optim.Optimizer], value: float) -> None:
    """Clamp every opacity to at most ``value`` and clear the opacities' Adam moments.

    The 3DGS opacity reset: Gaussians that matter regain opacity within a few hundred steps,
    floaters and occluded ones do not and are pruned afterwards. The moments are cleared so that
    old momentum does not immediately undo the reset. Other parameters are untouched (their
    tensors are still replaced, keeping the ops uniform).

    Args:
        value: the opacity ceiling, in (0, 1).

    Raises:
        ValueError: ``value`` is outside (0, 1).
    """
    if not 0.0 < value < 1.0:
        raise ValueError(f"opacity reset value must be in (0, 1), got {value}")
    ceiling = math.log(value / (1.0 - value))

    def param_fn(name: str, v: Tensor) -> Tensor:
        return v.clamp_max(ceiling) if name == "opacity_logits" else v

    def state_fn(name: str, v: Tensor) -> Tensor:
        return torch.zeros_like(v) if name == "opacity_logits" else v

    edit_rows(gaussians, optimizer, param_fn, state_fn)


__all__ = [
    "SPLIT_SCALE_DIVISOR",
    "check_optimizer",
    "duplicate",
    "edit_rows",
    "make_optimizer",
    "quat_to_rotmat",
    "remove",
    "reset_opacity",
    "split",
]
