"""The training objective of the talking Gaussian head: photometric, mouth, mask and size terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from avatar.configs import Config
from avatar.image_metrics import dssim_loss
from avatar.subject_data import Frame


@dataclass
class LossWeights(Config):
    l1: float = 1.0
    dssim: float = 0.2
    """D-SSIM on the head's bounding box."""
    mouth: float = 1.0
    """Extra L1 inside the box around the lips."""
    alpha: float = 0.2
    """L1 between the head's alpha and the head mask (face, hair, mouth labels)."""
    face_alpha: float = 0.1
    """Mean transparency of the face layer over the skin (face label). Without it the mouth
    layer, which sits behind the face, learns cheek and lip colours and shows through holes in
    the face layer; under a new expression those holes open onto the wrong colours."""
    mouth_alpha: float = 0.0
    """Mean opacity of the face layer over the mouth interior. Above 0 it hands teeth and tongue
    to the mouth layer (without it the face layer paints the inside of the mouth too: 98 % opaque
    there on katie). Off by default: at 0.1 it scored slightly lower on katie and the sample
    (benchmarks/RESULTS.md, Training)."""
    lpips: float = 0.0
    """LPIPS on the head's bounding box, when the ``lpips`` package and its weights load (it
    needs torchvision and downloads the weights once); off in every preset because no run has
    measured it yet (no torchvision on the CPU machine, no GPU lent). A run that asks for it and
    cannot load it trains without it and says so in the log."""
    lpips_net: str = "alex"
    """LPIPS backbone: "alex" or "vgg"."""
    audio_mouth: float = 1.0
    """Mean squared error of the audio code's mouth read-out against the tracked mouth
    (``model.mouth_targets``, standardised), on a batch of train frames per step (``mouth_batch``).
    It teaches the code mouth shape, which carries over to other voices (see
    :data:`avatar.models.talking_head.MOUTH_TARGETS`); 0 switches it off."""
    scale: float = 10.0
    """Penalty on Gaussians larger than ``max_scale`` times the head size."""
    max_scale: float = 0.04


def mouth_readout_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the finite entries of ``target`` [B, K] (a frame or track without a
    face reads NaN); zero when none is finite."""
    ok = torch.isfinite(target)
    if not bool(ok.any()):
        return predicted.sum() * 0.0
    return (predicted[ok] - target[ok]).square().mean()


def mask_box(mask: Tensor, pad: int = 4) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 around a mask [H, W, 1], grown by ``pad`` (the whole image when it is empty)."""
    ys, xs = torch.nonzero(mask[..., 0] > 0.5, as_tuple=True)
    h, w = mask.shape[:2]
    if len(ys) == 0:
        return 0, 0, w, h
    return (max(0, int(xs.min()) - pad), max(0, int(ys.min()) - pad),
            min(w, int(xs.max()) + 1 + pad), min(h, int(ys.max()) + 1 + pad))


def compute_loss(out: dict[str, Any], frame: Frame, weights: LossWeights, scales: Tensor,
                 scene_scale: float, lpips_net: Optional[torch.nn.Module] = None) -> tuple[Tensor, dict[str, float]]:
    """Photometric, mouth, mask and scale terms of one frame (and LPIPS, given its network)."""
    pred, gt = out["rgb"], frame.image
    l1 = (pred - gt).abs().mean()
    x0, y0, x1, y1 = mask_box(frame.head_mask)
    crop_p = pred[y0:y1, x0:x1].permute(2, 0, 1)[None]
    crop_g = gt[y0:y1, x0:x1].permute(2, 0, 1)[None]
    dssim = dssim_loss(crop_p, crop_g) if min(y1 - y0, x1 - x0) >= 11 else pred.new_zeros(())
    perceptual = pred.new_zeros(())
    if lpips_net is not None and weights.lpips > 0 and min(y1 - y0, x1 - x0) >= 32:
        perceptual = lpips_net(crop_p * 2 - 1, crop_g * 2 - 1).mean()
    mx0, my0, mx1, my1 = frame.mouth_box
    mouth = (pred[my0:my1, mx0:mx1] - gt[my0:my1, mx0:mx1]).abs().mean() if mx1 > mx0 and my1 > my0 else pred.new_zeros(())
    alpha = (out["head_alpha"] - frame.head_mask).abs().mean()
    skin = frame.skin_mask
    face_alpha = ((1 - out["face_alpha"]) * skin).sum() / skin.sum().clamp_min(1.0)
    inside = frame.mouth_mask
    mouth_alpha = (out["face_alpha"] * inside).sum() / inside.sum().clamp_min(1.0)
    big = torch.relu(scales - weights.max_scale * scene_scale).mean() / scene_scale
    loss = (weights.l1 * l1 + weights.dssim * dssim + weights.mouth * mouth + weights.alpha * alpha
            + weights.face_alpha * face_alpha + weights.mouth_alpha * mouth_alpha + weights.scale * big
            + weights.lpips * perceptual)
    with torch.no_grad():
        mse = ((pred.clamp(0, 1) - gt) ** 2).mean()
        psnr = float(-10 * torch.log10(mse.clamp_min(1e-10)))
    parts = {"loss": loss, "l1": l1, "dssim": dssim, "mouth": mouth, "alpha": alpha, "face_alpha": face_alpha,
             "mouth_alpha": mouth_alpha, "lpips": perceptual}
    return loss, {**{k: float(v.detach()) for k, v in parts.items()}, "psnr": psnr}


MOUTH_RUN = 8
"""Consecutive frames per run of the mouth read-out batch: 8 neighbours share 15 encoded audio
windows instead of 64 when smoothing over 8 frames, a quarter of the encoder's work."""


def mouth_batch_picks(n: int, batch: int, generator: torch.Generator) -> Tensor:
    """``batch`` positions in ``[0, n)``: runs of :data:`MOUTH_RUN` consecutive positions from
    random starts (fewer at the end of the range, where a run is cut short)."""
    run = min(MOUTH_RUN, n, batch)
    starts = torch.randint(n - run + 1, (-(-batch // run),), generator=generator)  # ceil(batch / run) runs
    return (starts[:, None] + torch.arange(run)).reshape(-1)[:batch]


def distortion_loss(weights: Tensor, ts: Tensor, deltas: Tensor, offsets: Tensor) -> Tensor:
    """mip-NeRF 360's distortion loss of packed ray samples, summed per ray and averaged over rays.

    ``sum_ij w_i w_j |t_i - t_j| + 1/3 sum_i w_i^2 delta_i`` pulls each ray's weights together
    into one short interval: a surface rather than fog. On a CPU that is speed as much as quality,
    since a ray stops (early termination) a few samples after it meets a surface, and wanders
    through fog to its end.

    The pairwise term is computed in O(S) with prefix sums within each ray (samples are sorted by
    ``t`` along their ray): ``2 sum_i w_i (t_i W_<i - (wt)_<i)``.

    Args:
        weights: compositing weights (:func:`avatar.render.raymarch.composite_weights`). [S]
        ts, deltas: sample centres and lengths along their rays. [S]
        offsets: samples of ray r are ``offsets[r]:offsets[r + 1]``. [R + 1]
    """
    n_rays = offsets.shape[0] - 1
    if weights.numel() == 0 or n_rays == 0:
        return weights.sum() * 0.0
    counts = offsets.diff()
    ray = torch.repeat_interleave(torch.arange(n_rays, device=weights.device), counts)

    def exclusive_in_ray(values: Tensor) -> Tensor:
        total = torch.cumsum(values, dim=0)
        before_ray = torch.cat([total.new_zeros(1), total])[offsets[:-1]]  # sum of earlier rays' samples
        return total - values - before_ray[ray]

    wt = weights * ts
    pairwise = 2.0 * (weights * (ts * exclusive_in_ray(weights) - exclusive_in_ray(wt))).sum()
    own = (weights.square() * deltas).sum() / 3.0
    return (pairwise + own) / n_rays
