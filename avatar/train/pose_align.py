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
    max_frames: int = 60
    """At most this many held-out frames are fitted (0: all); a longer split has that many fitted,
    evenly spread, and the frames between them take the correction interpolated between their
    fitted neighbours where it beats the tracked pose (two renders each). The fit costs 1-1.5 s a
    frame at 256 px on a 2-core CPU, so without a bound a 5-minute clip's 680 held-out frames would
    add 10-17 minutes to training. On a 50 s clip (115 held-out frames) fitting every other frame
    gave psnr_head 31.11 dB as fitting all of them did (60 s against 107 s); every fourth 30.96."""


def _shrink(image: Tensor, factor: int) -> Tensor:
    """[H, W, C] averaged over ``factor`` x ``factor`` blocks."""
    if factor <= 1:
        return image
    return torch.nn.functional.avg_pool2d(image.permute(2, 0, 1)[None], factor)[0].permute(1, 2, 0)


def _keyframes(n: int, max_frames: int) -> np.ndarray:
    """Positions (of ``n``) fitted when at most ``max_frames`` may be: all, or that many evenly
    spread with the first and the last among them."""
    if max_frames <= 0 or n <= max_frames:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max(2, max_frames))).astype(np.int64))


def _interpolated(corrections: Tensor, keys: np.ndarray) -> Tensor:
    """[n, 6]: each frame's correction interpolated linearly in time between the fitted ``keys``
    around it (the hair's swing changes over a fraction of a second, the tracker's error with it)."""
    n = corrections.shape[0]
    positions = np.arange(n, dtype=np.float64)
    table = corrections[torch.as_tensor(keys, device=corrections.device)].cpu().numpy()
    columns = [np.interp(positions, keys.astype(np.float64), table[:, c]) for c in range(table.shape[1])]
    return torch.as_tensor(np.stack(columns, 1), dtype=corrections.dtype, device=corrections.device)


class _FrameFit:
    """One held-out frame's fit: the frozen avatar's mouth and face for it and the weighted
    photometric error of a pose correction."""

    def __init__(self, model: TalkingHead, data: SubjectData, index: int, config: PoseAlignConfig,
                 background: str, scene_scale: float) -> None:
        factor = max(1, int(config.downsample))
        self.model, self.scene_scale = model, scene_scale
        self.size = data.resolution // factor
        self.K = data.K.clone()
        self.K[:2] /= factor
        self.frame = frame = data.frame(index)
        with torch.no_grad():
            cond = model.conditions(data.audio_features, torch.tensor([index], device=data.device),
                                    frame.motion[None], smooth=True)[0]
            self.face, self.mouth = model.deform(cond)
        weight = frame.head_mask + (config.face_weight - 1.0) * frame.skin_mask
        x0, y0, x1, y1 = frame.mouth_box
        weight[y0:y1, x0:x1] = 0.0
        self.weight = _shrink(weight, factor)[..., 0]
        self.backdrop, self.image = _shrink(frame.over(background), factor), _shrink(frame.image, factor)

    @property
    def usable(self) -> bool:
        return float(self.weight.sum()) >= 1.0

    def loss(self, correction: Tensor) -> Tensor:
        viewmat = self.frame.viewmat @ pose_correction_matrices(correction[None])[0]
        rendered = self.model.render_layers(self.face, self.mouth, viewmat, self.K, self.size, self.size,
                                            self.backdrop)["rgb"]
        return ((rendered - self.image).abs().sum(-1) * self.weight).sum() / self.weight.sum()

    def fit(self, start: Tensor, config: PoseAlignConfig) -> Tensor:
        """The best iterate of ``config.steps`` Adam steps from ``start``, ``start`` included."""
        rot = start[:3].clone().requires_grad_(True)
        shift = (start[3:] / self.scene_scale).requires_grad_(True)
        opt = torch.optim.Adam([rot, shift], lr=config.lr)
        best_loss, delta = math.inf, start
        for step in range(config.steps + 1):
            current = torch.cat([rot, shift * self.scene_scale])
            loss = self.loss(current)
            if float(loss.detach()) < best_loss:  # Adam's last step need not be its best
                best_loss, delta = float(loss.detach()), current.detach().clone()
            if step == config.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return delta


def align_poses(model: TalkingHead, data: SubjectData, indices: np.ndarray, config: PoseAlignConfig,
                background: str, scene_scale: float, progress: Optional[Progress] = None) -> Tensor:
    """Pose corrections [len(indices), 6] (axis-angle, translation; see
    :func:`avatar.subject_data.pose_correction_matrices`) that fit ``model`` to frames ``indices``
    outside their mouth boxes. ``indices`` are consecutive frames when ``config.max_frames`` applies
    (the val split is). The model's parameters are left untouched."""
    report = progress or null_progress
    indices = np.asarray(indices, np.int64)
    out = torch.zeros(len(indices), 6, device=data.device)
    if config.steps <= 0 or len(indices) == 0:
        return out
    keys = _keyframes(len(indices), config.max_frames)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    previous: Optional[Tensor] = None
    try:
        for n, position in enumerate(keys):
            report("align poses", n, len(keys))
            index = int(indices[position])
            fit = _FrameFit(model, data, index, config, background, scene_scale)
            if not fit.usable:
                previous = None
                continue
            start = previous if previous is not None and config.warm_start else torch.zeros(6, device=data.device)
            delta = fit.fit(start, config)
            if float(delta[:3].norm()) > np.radians(config.max_degrees):
                log.info("Frame %d: the pose fit moved %.1f degrees; keeping its tracked pose.",
                         index, float(np.degrees(float(delta[:3].norm()))))
                previous = None
                continue
            out[position] = delta
            previous = delta
        report("align poses", len(keys), len(keys))
        if len(keys) < len(indices):
            out = _between_keys(model, data, indices, keys, out, config, background, scene_scale, report)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return out


def _between_keys(model: TalkingHead, data: SubjectData, indices: np.ndarray, keys: np.ndarray, fitted: Tensor,
                  config: PoseAlignConfig, background: str, scene_scale: float, report: Progress) -> Tensor:
    """The frames between fitted keys take the correction interpolated from their keys where it
    fits them better than the tracked pose (two renders each, against a fit's dozen steps)."""
    out = fitted.clone()
    guess = _interpolated(fitted, keys)
    between = np.setdiff1d(np.arange(len(indices)), keys)
    zero = torch.zeros(6, device=data.device)
    for n, position in enumerate(between):
        report("align poses: between", n, len(between))
        fit = _FrameFit(model, data, int(indices[position]), config, background, scene_scale)
        if not fit.usable:
            continue
        with torch.no_grad():
            if float(fit.loss(guess[position])) < float(fit.loss(zero)):
                out[position] = guess[position]
    report("align poses: between", len(between), len(between))
    return out
