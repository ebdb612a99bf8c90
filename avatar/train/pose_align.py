"""Aligning the held-out frames' head poses to the trained avatar, for whole-head composites.

The landmark tracker fits the face; the hair and the top of the head sit a little differently
on the face from frame to frame (they swing), so a whole head rendered at the tracked pose lies
a degree or so off the frame's own head. On a 50 s clip (``m_base``, seed 0) that was most of
the validation head error: hair 28.4 dB at the tracked poses, 30.8 with each held-out pose
refined, psnr_head 29.6 against 30.2, with the face 0.2 dB lower.

So, once the avatar is trained, each held-out frame's pose is refined by analysis by synthesis:
a small rotation about the head's origin and a translation, fitted with the avatar frozen to the
frame's head pixels **outside the mouth box** (the face weighted ``face_weight`` times the hair),
starting from the previous frame's correction. The mouth is what the audio drives and what
evaluation judges the audio path on; only the rigid pose, which the tracker took from the same
frame, is refined. The corrections serve the composites that put the whole rendered head into a
frame (``frame``, ``plate``); the ``face`` composite, which pastes the face alone among the
frame's own hair, keeps the tracked pose, where the face is. ``avatar eval`` reports
``psnr_head`` at the refined poses and ``psnr_head_tracked`` at the tracked ones.
"""

from __future__ import annotations

import logging
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
    downsample: int = 2
    """The fit renders at the training resolution divided by this: a pose is six numbers, which a
    quarter of the pixels still pin down (at 256 px, half the resolution took 1.1 s a frame
    against 1.8 s, 12 steps, this CPU)."""


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
            rot = (previous[:3].clone() if previous is not None else torch.zeros(3, device=data.device)).requires_grad_(True)
            shift = (previous[3:].clone() / scene_scale if previous is not None
                     else torch.zeros(3, device=data.device)).requires_grad_(True)
            opt = torch.optim.Adam([rot, shift], lr=config.lr)
            for _ in range(config.steps):
                delta = torch.cat([rot, shift * scene_scale])
                viewmat = frame.viewmat @ pose_correction_matrices(delta[None])[0]
                rendered = model.render_layers(face, mouth, viewmat, K, size, size, backdrop)["rgb"]
                loss = ((rendered - image).abs().sum(-1) * weight).sum() / weight.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            delta = torch.cat([rot, shift * scene_scale]).detach()
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
