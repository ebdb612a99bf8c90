"""Training the NGP talking head (``--model ngp``) on random ray batches of a subject's frames.

Each step renders the rays of one train frame: two square patches (one on the mouth, one
anywhere on the head; they carry the D-SSIM term) and random pixels, half on the head's
bounding box and half on the rectangle the field's box projects to (so that everything a render
marches is supervised, and the field learns to be empty around the head). The loss is the
anchors': squared error of the composite, D-SSIM on the patches, the head's alpha against the
head mask, and the audio code's mouth read-out.

The occupancy grid is refreshed every ``grid_every`` steps from the densities under the
conditions of two random train frames (all cells during ``grid_warmup``, then a random quarter),
so the marcher skips empty space that stays empty whatever is said.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from avatar.configs import Config
from avatar.errors import AvatarError
from avatar.image_metrics import dssim_loss
from avatar.models.gaussians import GaussianInitConfig
from avatar.models.ngp import NGPHead, NGPHeadConfig, fit_ngp_boxes
from avatar.render.raymarch import composite_weights
from avatar.run import model_state, optimizer_state, save_checkpoint
from avatar.subject_data import Frame
from avatar.train.base import TrainerBase, initial_head
from avatar.train.config import BaseTrainConfig
from avatar.train.losses import distortion_loss, mask_box


@dataclass
class NGPLearningRates(Config):
    """Adam learning rates (torch-ngp's), decayed exponentially to ``final_factor`` of themselves."""

    tables: float = 1e-2
    """Hash-grid tables of both fields."""
    networks: float = 1e-3
    """MLPs, region attention, the audio encoder and its read-out."""
    final_factor: float = 0.1


@dataclass
class NGPLossWeights(Config):
    mse: float = 1.0
    """Squared error of the composited pixels (NeRF's loss)."""
    dssim: float = 0.1
    """D-SSIM on the two patches."""
    alpha: float = 0.2
    """L1 between the head's alpha and the head mask (face, hair, mouth labels)."""
    audio_mouth: float = 1.0
    """The audio code's mouth read-out (as in the Gaussian kind, see its ``LossWeights``)."""
    distortion: float = 0.0
    """mip-NeRF 360's distortion loss on the rays' weights (:func:`avatar.train.losses.distortion_loss`),
    with distances in units of the head box's half extent."""


@dataclass
class NGPTrainConfig(BaseTrainConfig):
    """Everything an NGP run needs; saved to RUN/config.json."""

    model_kind: str = "ngp"
    static_iterations: int = 0
    """The field learns conditions from the first step (ER-NeRF); a static stage buys nothing here."""
    rays: int = 4096
    """Rays per step, the patches included."""
    patch: int = 32
    """Side of each of the two square patches (pixels at the training resolution)."""
    grid_every: int = 16
    """Steps between occupancy-grid refreshes."""
    grid_warmup: int = 256
    """Steps during which every refresh measures every cell."""
    model: NGPHeadConfig = field(default_factory=NGPHeadConfig)
    lr: NGPLearningRates = field(default_factory=NGPLearningRates)
    loss: NGPLossWeights = field(default_factory=NGPLossWeights)


def _network_optimizer(model: NGPHead, lr: NGPLearningRates) -> torch.optim.Adam:
    tables, others = [], []
    for name, p in model.named_parameters():
        (tables if name.endswith("encoding.embeddings") else others).append(p)
    return torch.optim.Adam([
        {"params": tables, "lr": lr.tables, "name": "tables"},
        {"params": others, "lr": lr.networks, "name": "networks"},
    ], betas=(0.9, 0.99), eps=1e-15)


def _uniform_pixels(box: tuple[int, int, int, int], n: int, generator: torch.Generator) -> Tensor:
    x0, y0, x1, y1 = box
    u = torch.rand(n, 2, generator=generator)
    xs = (x0 + u[:, 0] * max(x1 - x0, 1)).long().clamp(x0, max(x1 - 1, x0))
    ys = (y0 + u[:, 1] * max(y1 - y0, 1)).long().clamp(y0, max(y1 - 1, y0))
    return torch.stack([xs, ys], dim=-1)


def _patch_pixels(centre: tuple[float, float], size: int, width: int, height: int) -> Tensor:
    """[size * size, 2] pixels of a square patch around ``centre``, moved inside the image."""
    x0 = int(round(min(max(centre[0] - size / 2, 0), width - size)))
    y0 = int(round(min(max(centre[1] - size / 2, 0), height - size)))
    ys, xs = torch.meshgrid(torch.arange(y0, y0 + size), torch.arange(x0, x0 + size), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def pick_rays(frame: Frame, field_box: tuple[int, int, int, int], rays: int, patch: int,
              generator: torch.Generator) -> tuple[Tensor, int]:
    """Pixels [R, 2] (column, row) of one step's rays and how many of the first ones form the two
    patches (``2 patch^2``, row-major, mouth patch first; 0 when the image is smaller than a patch)."""
    h, w = frame.image.shape[:2]
    head = mask_box(frame.head_mask, pad=max(2, w // 64))
    parts, n_patch = [], 0
    if patch <= min(h, w) and 2 * patch * patch < rays:
        mx0, my0, mx1, my1 = frame.mouth_box
        jitter = (torch.rand(4, generator=generator) - 0.5) * patch / 2
        mouth = ((mx0 + mx1) / 2 + float(jitter[0]), (my0 + my1) / 2 + float(jitter[1]))
        hx0, hy0, hx1, hy1 = head
        anywhere = (hx0 + float(torch.rand(1, generator=generator)) * (hx1 - hx0),
                    hy0 + float(torch.rand(1, generator=generator)) * (hy1 - hy0))
        parts += [_patch_pixels(mouth, patch, w, h), _patch_pixels(anywhere, patch, w, h)]
        n_patch = 2 * patch * patch
    rest = rays - n_patch
    parts += [_uniform_pixels(head, rest - rest // 2, generator), _uniform_pixels(field_box, rest // 2, generator)]
    return torch.cat(parts).to(frame.image.device), n_patch


class NGPTrainer(TrainerBase):
    """Holds the state of one NGP training run (model, optimizer, occupancy grid, RNG)."""

    config: NGPTrainConfig

    def setup(self, resume: bool) -> None:
        cfg = self.config
        tensors, meta = self.start(resume)
        resume = tensors is not None
        if resume:
            try:
                self.model = NGPHead.from_state_dict(cfg.model, model_state(tensors)).to(self.device)
            except (KeyError, RuntimeError) as err:
                raise AvatarError(f"checkpoint step {self.step} of {self.paths.root} does not fit its config.json "
                                  f"({err}); train again with --force.") from None
        else:
            init = initial_head(self.data, GaussianInitConfig(), cfg.seed)
            model_cfg = fit_ngp_boxes(cfg.model, init.face_points, init.mouth_points)
            self.config = cfg = dataclasses.replace(cfg, model=model_cfg)
            self.save_config()
            self.model = NGPHead(model_cfg).to(self.device)
        self.optimizers = {"networks": _network_optimizer(self.model, cfg.lr)}
        if resume:
            try:
                self.optimizers["networks"].load_state_dict(optimizer_state("networks", tensors, meta))
                self.restore_random_state(tensors)
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise AvatarError(f"checkpoint step {self.step} of {self.paths.root} does not fit its run "
                                  f"({type(err).__name__}: {err}); train again with --force.") from None
        self._last: Optional[tuple[int, dict[str, float]]] = None

    def size(self) -> str:
        occupied = float(self.model.occupancy().float().mean())
        return f"{occupied:.0%} of the grid occupied"

    def _set_learning_rates(self) -> None:
        cfg, lr = self.config, self.config.lr
        t = min(self.step / max(cfg.iterations, 1), 1.0)
        factor = math.exp(t * math.log(lr.final_factor))
        for group in self.optimizers["networks"].param_groups:
            group["lr"] = (lr.tables if group["name"] == "tables" else lr.networks) * factor

    def _update_grid(self) -> None:
        cfg = self.config
        if self.step % cfg.grid_every != 0:
            return
        g = cfg.model.grid_resolution
        n = g ** 3
        if self.step < cfg.grid_warmup:
            cells = torch.arange(n)
        else:
            cells = torch.randperm(n, generator=self.sampler)[: n // 4]
        conds = []
        for _ in range(2):
            index = self.pick_frame()
            conds.append(self.condition(index, self.data.motion[index]))
        for start in range(0, len(cells), 1 << 16):
            self.model.update_density_grid(conds, cells[start:start + (1 << 16)].to(self.device),
                                           generator=self.sampler)

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self._set_learning_rates()
        self._update_grid()
        frame = self.data.frame(self.pick_frame())
        cond = self.condition(frame.index, frame.motion)
        r = cfg.resolution
        xy, n_patch = pick_rays(frame, self.model.box_pixels(frame.viewmat, frame.K, r, r), cfg.rays, cfg.patch,
                                self.sampler)
        out = self.model.render_pixels(cond, frame.viewmat, frame.K, xy)
        rows, cols = xy[:, 1], xy[:, 0]
        background = frame.over(cfg.background)[rows, cols]
        pred = out["rgb"] + (1 - out["alpha"])[:, None] * background
        gt = frame.image[rows, cols]
        mse = (pred - gt).square().mean()
        loss = cfg.loss.mse * mse
        parts: dict[str, float] = {"mse": float(mse.detach())}
        if n_patch and cfg.loss.dssim > 0:
            p = cfg.patch
            dssim = dssim_loss(pred[:n_patch].reshape(2, p, p, 3), gt[:n_patch].reshape(2, p, p, 3), layout="BHWC")
            loss = loss + cfg.loss.dssim * dssim
            parts["dssim"] = float(dssim.detach())
        if cfg.loss.alpha > 0:
            alpha = (out["alpha"] - frame.head_mask[rows, cols, 0]).abs().mean()
            loss = loss + cfg.loss.alpha * alpha
            parts["alpha"] = float(alpha.detach())
        if cfg.loss.distortion > 0 and "ray_samples" in out:
            s = out["ray_samples"]
            weights = composite_weights(out["sigma"], s.deltas, s.offsets, self.model.config.stop_transmittance)
            scale = self.model.density_scale
            distortion = distortion_loss(weights, s.ts * scale, s.deltas * scale, s.offsets)
            loss = loss + cfg.loss.distortion * distortion
            parts["distortion"] = float(distortion.detach())
        mouth = self.mouth_loss()
        if mouth is not None:
            loss = loss + cfg.loss.audio_mouth * mouth
            parts["audio_mouth"] = float(mouth.detach())
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        with torch.no_grad():
            mse_clamped = (pred.detach().clamp(0, 1) - gt).square().mean()
        parts.update(loss=float(loss.detach()), psnr=float(-10 * torch.log10(mse_clamped.clamp_min(1e-10))),
                     samples_per_ray=out["samples"] / len(xy))
        self._last = (frame.index, parts)
        return parts

    @torch.no_grad()
    def preview(self) -> tuple[Tensor, Tensor]:
        """The last step's frame, rendered whole (eval mode), and its ground truth."""
        index = self._last[0] if self._last else int(self.train_idx[0])
        frame = self.data.frame(index)
        r = self.config.resolution
        self.model.eval()
        out = self.model.render(self.condition(index, frame.motion), frame.viewmat, frame.K, r, r,
                                frame.over(self.config.background))
        self.model.train()
        return out["rgb"], frame.image

    def save(self) -> None:
        save_checkpoint(self.paths, self.step, self.model, self.optimizers, self.random_state(),
                        {"occupied": round(float(self.model.occupancy().float().mean()), 4)})

