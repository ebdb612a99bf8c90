"""Aligning the held-out frames' head poses to the trained avatar, for whole-head composites.

The landmark tracker fits the face; the hair and the top of the head sit a little differently
on the face from frame to frame (they swing), so a whole head rendered at the tracked pose lies
a degree or so off the frame's own head. On a 50 s clip that was much of the validation head
error: psnr_head 29.33 dB at the tracked poses, 30.81 with each held-out pose refined (mean of
three seeds; hair 28.4 -> 31.6 dB, face 30.2 -> 30.7 on seed 0).

So, once the avatar is trained, each held-out frame's pose is refined by analysis by synthesis:
a small rotation about the head's origin and a translation, fitted with the avatar frozen to the
frame's head pixels **outside the mouth box** (the face weighted ``face_weight`` times the hair).
The mouth is what the audio drives and what evaluation judges the audio path on; only the rigid
pose, which the tracker took from the same frame, is refined. The best iterate is kept, the
tracked pose included, so no frame is fitted worse than the tracker fitted it. The corrections
serve the composites that put the whole rendered head into a frame (``frame``, ``plate``); the
``face`` composite, which pastes the face alone among the frame's own hair, keeps the tracked
pose. ``avatar eval`` reports ``psnr_head`` at the refined poses and ``psnr_head_tracked`` at the
tracked ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from avatar.configs import Config
from avatar.models import TalkingHead
from avatar.progress import Progress, null_progress
from avatar.subject_data import SubjectData, pose_correction_matrices

log = logging.getLogger(__name__)


@dataclass
class PoseAlignConfig(Config):
    """Options of the held-out pose alignment that ends a Gaussian run."""

    steps: int = 12
    """Adam steps per frame (0: keep the tracked poses)."""
    lr: float = 3e-3
    """Adam's rate on the rotation (radians) and on the translation in head sizes."""
    max_degrees: float = 6.0
    """Corrections larger than this (a fit gone wrong: an occluded or cut-off head) are dropped."""
    face_weight: float = 3.0
    """Weight of the face's pixels (the skin label) against the rest of the head's (hair, ears,
    mouth interior) in the fit, outside the mouth box."""
    warm_start: bool = False
    """Start each frame from the previous frame's correction rather than from the tracked pose."""
    downsample: int = 1
    """The fit renders at the training resolution divided by this. 2 took 1.1 s a frame against
    1.8 s (256 px, 12 steps, this CPU), but on the sharp synthetic sample it moved the head by a
    fraction of a pixel: psnr_head 33.3 against 34.3 at the tracked poses and 34.6 at full
    resolution; so the default is the full resolution."""


def _shrink(image: Tensor, factor: int) -> Tensor:
    """[H, W, C] averaged over ``factor`` x ``factor`` blocks."""
    if factor <= 1:
        return image
    return torch.nn.functional.avg_pool2d(image.permute(2, 0, 1)[None], factor)[0].permute(1, 2, 0)


def align_poses(model: TalkingHead, data: SubjectData, indices: np.ndarray, config: PoseAlignConfig,
                background: str, scene_scale: float, progress: Optional[Progress] = None) -> Tensor:
    """Pose corrections [len(indices), 6] (axis-angle, translation; see
    :func:`avatar.subject_data.pose_correction_matrices`) that fit ``model`` to frames ``indices``
    outside their mouth boxes. The model's parameters are left untouched."""
    report = progress or null_progress
    out = torch.zeros(len(indices), 6, device=data.device)
    if config.steps <= 0 or len(indices) == 0:
        return out
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    factor = max(1, int(config.downsample))
    size = data.resolution // factor
    K = data.K.clone()
    K[:2] /= factor
    previous: Optional[Tensor] = None
    try:
        for n, index in enumerate(np.asarray(indices, np.int64)):
            report("align poses", n, len(indices))
            frame = data.frame(int(index))
            with torch.no_grad():
                cond = model.conditions(data.audio_features, torch.tensor([int(index)], device=data.device),
                                        frame.motion[None], smooth=True)[0]
                face, mouth = model.deform(cond)
            weight = frame.head_mask + (config.face_weight - 1.0) * frame.skin_mask
            x0, y0, x1, y1 = frame.mouth_box
            weight[y0:y1, x0:x1] = 0.0
            weight = _shrink(weight, factor)[..., 0]
            if float(weight.sum()) < 1.0:
                previous = None
                continue
            backdrop, image = _shrink(frame.over(background), factor), _shrink(frame.image, factor)
            start = previous if previous is not None and config.warm_start else torch.zeros(6, device=data.device)
            rot = start[:3].clone().requires_grad_(True)
            shift = (start[3:] / scene_scale).requires_grad_(True)
            opt = torch.optim.Adam([rot, shift], lr=config.lr)
            best_loss, delta = math.inf, start
            for step in range(config.steps + 1):
                current = torch.cat([rot, shift * scene_scale])
                viewmat = frame.viewmat @ pose_correction_matrices(current[None])[0]
                rendered = model.render_layers(face, mouth, viewmat, K, size, size, backdrop)["rgb"]
                loss = ((rendered - image).abs().sum(-1) * weight).sum() / weight.sum()
                if float(loss.detach()) < best_loss:  # Adam's last step need not be its best
                    best_loss, delta = float(loss.detach()), current.detach().clone()
                if step == config.steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if float(delta[:3].norm()) > np.radians(config.max_degrees):
                log.info("Frame %d: the pose fit moved %.1f degrees; keeping its tracked pose.",
                         index, float(np.degrees(float(delta[:3].norm()))))
                previous = None
                continue
            out[n] = delta
            previous = delta
        report("align poses", len(indices), len(indices))
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return out
