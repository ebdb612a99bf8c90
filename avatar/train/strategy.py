"""Densification: grow Gaussians where the image wants detail, prune those that do not matter.

The adaptive density control of 3D Gaussian splatting, as a strategy object in gsplat's style:
a :class:`DensifyStrategy` dataclass holds thresholds and schedule; the running statistics live
in a plain dict of tensors that the *caller* owns (from :meth:`DensifyStrategy.initialize_state`),
so a trainer can checkpoint it with the rest (safetensors takes it as is) and keep one per
Gaussian set (face and mouth branches densify independently).

Usage, once per training step::

    strategy = DensifyStrategy(max_gaussians=20_000)
    state = strategy.initialize_state(len(gaussians))
    ...
    rgb, alpha, meta = rasterize(...)         # meta["means2d"] keeps its grad
    loss.backward()
    optimizer.step(); optimizer.zero_grad()   # either order works; stats come from means2d
    counts = strategy.step_post_backward(gaussians, optimizer, state, step, meta, scene_scale)

Each call accumulates the screen-space gradient of every Gaussian visible in ``meta``. Every
``refine_every`` steps inside ``[refine_start_iter, refine_stop_iter)`` Gaussians whose mean
gradient is high are cloned (small ones: under-reconstruction) or split (big ones:
over-reconstruction), and transparent or oversized ones are pruned. Every ``reset_every`` steps
all opacities are clamped low so that useless Gaussians reveal themselves.

The optimizer layout the edits need (one parameter per group) is described in
:mod:`avatar.train.ops`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from avatar.models.gaussians import GaussianSet
from avatar.train import ops

log = logging.getLogger(__name__)

STATE_KEYS = ("grad2d", "count", "radii")


@dataclass
class DensifyStrategy:
    """Thresholds and schedule of densification (defaults: gsplat's / 3DGS's, which were tuned on
    scenes normalised the same way: gradients in NDC units, sizes relative to the scene scale)."""

    grow_grad2d: float = 0.0002
    """Grow a Gaussian whose mean screen-space position gradient exceeds this. The gradient is
    measured in NDC units, i.e. the pixel gradient times (W/2, H/2), and times the number of
    cameras C of the render (losses average over cameras, which divides each camera's
    gradient by C): the threshold then does not depend on resolution or batch size."""
    grow_scale3d: float = 0.01
    """A growing Gaussian whose largest scale is at most this times ``scene_scale`` is cloned;
    a larger one is split into two (scales / 1.6, positions sampled from it)."""
    prune_opa: float = 0.005
    """Prune Gaussians whose opacity falls below this: they no longer contribute."""
    prune_scale3d: float = 0.1
    """Prune Gaussians whose largest scale exceeds this times ``scene_scale`` (blurry blobs).
    Applied only after the first opacity reset (or always when resets are off), as in 3DGS:
    right after initialisation large Gaussians are normal."""
    prune_scale2d: float = 0.15
    """Prune Gaussians whose screen radius exceeded this fraction of the image's larger side,
    while ``step < refine_scale2d_stop_iter``."""
    refine_scale2d_stop_iter: int = 0
    """Last step of screen-size pruning; 0 (default, like gsplat) disables it."""
    refine_start_iter: int = 500
    """No growing or pruning before this step: positions settle first, and the gradient
    statistics need a few hundred steps to mean something."""
    refine_stop_iter: int = 15_000
    """No refinement (and no opacity reset) from this step on: the last part of training
    polishes a fixed set."""
    refine_every: int = 100
    """Steps between refinements; statistics are accumulated over this window and then reset."""
    reset_every: int = 3000
    """Steps between opacity resets; 0 disables them (short schedules, or deformation-driven
    sets where a reset would make the face transparent for too long)."""
    reset_value: float = 0.01
    """Opacity ceiling applied by a reset; kept at twice ``prune_opa`` so a reset alone does not
    prune anything."""
    pause_refine_after_reset: int = 0
    """Skip refinements during this many steps after a reset (opacities are still recovering)."""
    max_gaussians: int = 0
    """Never grow beyond this many Gaussians; 0 means no cap. When the candidates would exceed
    it, the ones with the highest gradient win. Pruning never removes Gaussians to meet it."""
    recycle_share: float = 0.0
    """At the cap, retire up to this share of the set at each refinement (the least opaque ones,
    below ``recycle_opa``) so that as many high-gradient candidates can grow in their place: a
    capped set otherwise stops moving Gaussians to where the image wants detail once it is full.
    0 (default) switches it off."""
    recycle_opa: float = 0.05
    """Only Gaussians less opaque than this are retired by ``recycle_share``."""

    def __post_init__(self) -> None:
        if self.refine_every <= 0:
            raise ValueError(f"refine_every must be positive, got {self.refine_every}")
        for name in ("reset_every", "max_gaussians", "refine_start_iter", "refine_stop_iter",
                     "pause_refine_after_reset", "refine_scale2d_stop_iter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.reset_value < 1.0:
            raise ValueError(f"reset_value must be in (0, 1), got {self.reset_value}")
        if not 0.0 <= self.recycle_share < 1.0:
            raise ValueError(f"recycle_share must be in [0, 1), got {self.recycle_share}")

    def initialize_state(self, n: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Fresh running statistics for ``n`` Gaussians, owned by the caller.

        Returns:
            ``grad2d`` float32 [N] sum of the NDC gradient norms, ``count`` float32 [N] how many
            (camera, step) pairs saw the Gaussian, ``radii`` float32 [N] largest screen radius
            seen, as a fraction of the image's larger side. Plain tensors: checkpoint them as is.
        """
        return {key: torch.zeros(n, dtype=torch.float32, device=device) for key in STATE_KEYS}

    def check_sanity(self, gaussians: GaussianSet, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ValueError`` when the optimizer does not hold one parameter per group."""
        ops.check_optimizer(gaussians, optimizer)

    def step_post_backward(
        self,
        gaussians: GaussianSet,
        optimizer: Optional[torch.optim.Optimizer],
        state: dict[str, Tensor],
        step: int,
        meta: dict[str, Any],
        scene_scale: float = 1.0,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, int]:
        """Accumulate this step's statistics, and refine or reset when the schedule says so.

        Call after ``loss.backward()`` (before or after ``optimizer.step()``), with the
        ``meta`` of the render whose Gaussians are index-aligned with ``gaussians`` (a deformed
        copy of them is fine).

        Args:
            gaussians: the canonical set, edited in place when it refines.
            optimizer: its Adam (kept in sync), or None to edit the set only.
            state: from :meth:`initialize_state`; updated in place (tensors may be replaced).
            step: the training step, from 0.
            meta: from :func:`avatar.render.rasterize`: ``means2d`` [C, N, 2] with ``.grad``,
                ``radii`` [C, N, 2], ``width``, ``height``; ``visible`` [C, N] if present.
            scene_scale: the scene's extent (e.g. radius of the initial cloud) that the 3D
                scale thresholds are relative to.
            generator: random source of split positions (None: torch's global one).

        Returns:
            ``{"cloned", "split", "pruned", "reset", "n_gaussians"}``: Gaussians cloned, split
            and pruned by this call, 1 if opacities were reset, and the size afterwards.

        Raises:
            ValueError: ``meta["means2d"]`` has no gradient or shapes disagree with the set.
        """
        counts = {"cloned": 0, "split": 0, "pruned": 0, "reset": 0, "n_gaussians": len(gaussians)}
        if step >= self.refine_stop_iter:
            return counts
        self._accumulate(state, meta, len(gaussians))

        if (
            step > self.refine_start_iter
            and step % self.refine_every == 0
            and (self.reset_every == 0 or step % self.reset_every >= self.pause_refine_after_reset)
        ):
            retired = self._retire(gaussians, optimizer, state)
            counts["cloned"], counts["split"], origin = self._grow(
                gaussians, optimizer, state, scene_scale, generator)
            counts["pruned"] = retired + self._prune(gaussians, optimizer, state, step, scene_scale, origin)
            state.update(self.initialize_state(len(gaussians), state["grad2d"].device))
            log.debug("step %d: cloned %d, split %d, pruned %d -> %d Gaussians", step,
                      counts["cloned"], counts["split"], counts["pruned"], len(gaussians))

        if self.reset_every > 0 and step > 0 and step % self.reset_every == 0:
            ops.reset_opacity(gaussians, optimizer, self.reset_value)
            counts["reset"] = 1
        counts["n_gaussians"] = len(gaussians)
        return counts

    def _accumulate(self, state: dict[str, Tensor], meta: dict[str, Any], n: int) -> None:
        """Add the NDC gradient norm of each visible (camera, Gaussian) pair to the statistics."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state must hold {list(STATE_KEYS)} (from initialize_state), missing {missing}")
        if state["grad2d"].shape != (n,):
            raise ValueError(
                f"state tensors must be [N] = [{n}] like the Gaussian set, got "
                f"{tuple(state['grad2d'].shape)}; re-create it with initialize_state after "
                "changing the set outside the strategy"
            )
        means2d = meta["means2d"]
        grad = means2d.grad
        if grad is None:
            raise ValueError(
                "meta['means2d'].grad is None: call step_post_backward after loss.backward(), "
                "with the meta of a render whose loss was back-propagated"
            )
        if grad.dim() == 2:  # an unbatched [N, 2] render
            grad = grad[None]
        radii = meta["radii"]
        if radii.dim() == 2:
            radii = radii[None]
        if grad.shape[1:] != (n, 2) or radii.shape[:2] != grad.shape[:2]:
            raise ValueError(
                f"meta['means2d'].grad must be [C, N, 2] and meta['radii'] [C, N, 2] with "
                f"N = {n}, got {tuple(grad.shape)} and {tuple(radii.shape)}"
            )
        visible = meta.get("visible")
        if visible is None:
            visible = (radii > 0).all(dim=-1)
        elif visible.dim() == 1:
            visible = visible[None]
        width, height = float(meta["width"]), float(meta["height"])
        n_cams = grad.shape[0]
        device = grad.device
        for key in STATE_KEYS:
            state[key] = state[key].to(device)

        scale = grad.new_tensor([width / 2.0 * n_cams, height / 2.0 * n_cams])
        norms = (grad.detach() * scale).norm(dim=-1)  # [C, N]
        vis = visible.to(device)
        state["grad2d"] += (norms * vis).sum(dim=0).float()
        state["count"] += vis.sum(dim=0).float()
        extent = radii.amax(dim=-1).float() / max(width, height)  # [C, N]
        extent = torch.where(vis, extent.to(device), torch.zeros_like(extent, device=device))
        state["radii"] = torch.maximum(state["radii"], extent.amax(dim=0))

    def _retire(self, gaussians: GaussianSet, optimizer: Optional[torch.optim.Optimizer],
                state: dict[str, Tensor]) -> int:
        """Make room at the cap (``recycle_share``): remove the least opaque Gaussians below
        ``recycle_opa``, with their statistics. Returns how many."""
        n = len(gaussians)
        if self.max_gaussians == 0 or self.recycle_share == 0.0:
            return 0
        wanted = int(self.recycle_share * n) - max(0, self.max_gaussians - n)
        opacity = gaussians.opacities.detach()
        faint = opacity < self.recycle_opa
        k = min(wanted, int(faint.sum()), n - 1)
        if k <= 0:
            return 0
        retire = torch.zeros_like(faint)
        retire[torch.topk(torch.where(faint, -opacity, torch.full_like(opacity, -2.0)), k).indices] = True
        ops.remove(gaussians, optimizer, retire)
        keep = ~retire
        for key in STATE_KEYS:
            state[key] = state[key][keep.to(state[key].device)]
        return k

    def _grow(
        self,
        gaussians: GaussianSet,
        optimizer: Optional[torch.optim.Optimizer],
        state: dict[str, Tensor],
        scene_scale: float,
        generator: Optional[torch.Generator],
    ) -> tuple[int, int, Tensor]:
        """Clone small and split big Gaussians with a high mean gradient, within the cap.

        Returns the numbers cloned and split, and for each row of the grown set the row it
        came from before growth (clones: their original; split children: -1, they are new
        Gaussians with no screen statistics). int64 [N']
        """
        n = len(gaussians)
        avg = state["grad2d"] / state["count"].clamp_min(1.0)
        device = gaussians.means.device
        avg = avg.to(device)
        high = avg > self.grow_grad2d
        if self.max_gaussians > 0:
            budget = max(0, self.max_gaussians - n)  # clone and split each add one Gaussian
            if int(high.sum()) > budget:
                ranked = torch.where(high, avg, torch.full_like(avg, -1.0))
                high = torch.zeros_like(high)
                if budget > 0:
                    high[torch.topk(ranked, budget).indices] = True
        small = gaussians.scales.detach().amax(dim=-1) <= self.grow_scale3d * scene_scale
        to_clone = high & small
        origin = torch.arange(n, device=device)
        n_cloned = ops.duplicate(gaussians, optimizer, to_clone)
        origin = torch.cat([origin, origin[to_clone]])
        to_split = torch.cat([high & ~small, high.new_zeros(n_cloned)])
        n_split = ops.split(gaussians, optimizer, to_split, generator=generator)
        origin = torch.cat([origin[~to_split], origin.new_full((2 * n_split,), -1)])
        return n_cloned, n_split, origin

    def _prune(
        self,
        gaussians: GaussianSet,
        optimizer: Optional[torch.optim.Optimizer],
        state: dict[str, Tensor],
        step: int,
        scene_scale: float,
        origin: Tensor,
    ) -> int:
        """Remove transparent and oversized Gaussians; never the whole set.

        ``origin`` maps each row to its row before growth (-1 for split children), so the
        screen radii accumulated before growth are judged on the right rows. int64 [N]
        """
        prune = gaussians.opacities.detach() < self.prune_opa
        if self.reset_every == 0 or step > self.reset_every:
            prune |= gaussians.scales.detach().amax(dim=-1) > self.prune_scale3d * scene_scale
            if step < self.refine_scale2d_stop_iter:
                radii = state["radii"].to(prune.device)[origin.clamp_min(0)]
                prune |= (origin >= 0) & (radii > self.prune_scale2d)
        if bool(prune.all()):
            log.warning("pruning would remove all %d Gaussians; keeping them", len(gaussians))
            return 0
        return ops.remove(gaussians, optimizer, prune)


__all__ = ["DensifyStrategy", "STATE_KEYS"]
