"""The talking Gaussian head: canonical face and mouth Gaussians, their deformations, and the
layered rendering that composites them over the subject's torso and background.

Per frame, a condition (audio code of the frames around t, motion tracks: blinks, brows, head rotation) deforms two canonical
sets: the face branch (position, rotation, scale offsets) and the inside of the mouth
(translation only). They are rendered as separate layers and composited front to back: face over
mouth, so lips and cheeks hide the teeth unless the face layer opens; the head over the frame's
torso and background, which come from the subject (ground-truth torso pixels, background plate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from avatar.configs import Config
from avatar.models.audio import AudioEncoderConfig
from avatar.models.conditioning import SpeechConditioned
from avatar.models.deformation import (
    FaceDeformationConfig,
    MouthDeformationConfig,
    apply_deformation,
)
from avatar.models.gaussians import GaussianInitConfig, GaussianSet, HeadInit, gaussian_set_from_points
from avatar.models.interface import FrameCondition
from avatar.render import rasterize
from avatar.topology import FACE_OVAL

SH_C0 = 0.28209479177387814

BLINK_NAMES = ("eye_blink_left", "eye_blink_right")
"""The blink tracks: what training oversamples (``blink_share``) and ``avatar render --blink`` drives."""

EYE_FEATURES = ("eye_blink_left", "eye_blink_right", "brow_raise_left", "brow_raise_right")
"""Blendshape tracks that condition the face branch besides audio (none of them is mouth motion,
so a new utterance's lips come from its audio alone)."""

POSE_FEATURES = ("head_rot_x", "head_rot_y", "head_rot_z")
"""Head rotation relative to the camera (so to gravity), as condition tracks: hair hangs and
swings with it. Derived from the pose track, not from the image (see
:func:`avatar.subject_data.head_rotation_features`)."""

LAG_FEATURES = ("head_lag_x", "head_lag_y", "head_lag_z")
"""How far the head has turned ahead of its recent average (:func:`avatar.subject_data.head_lag_features`):
hair swings behind a turn, which the rotation at one frame cannot tell. Not in the default
condition (see benchmarks/RESULTS.md); add them with ``--set model.motion_features=[...]``."""

GAZE_FEATURES = ("gaze_x", "gaze_y")
"""Where the eyes look (the iris against the eye corners, :func:`avatar.topology.iris_offset`), as
condition tracks derived from the landmarks. Not in the default condition: on the two clips
measured (people who look at the camera) they changed nothing (benchmarks/RESULTS.md); for
someone who looks around, add them with ``--set model.motion_features=[...]``."""

MOUTH_TARGETS = ("lip_gap", "jaw_open", "lips_apart", "mouth_stretch", "mouth_pucker")
"""Tracked mouth shape the audio code learns to predict (the inner-lip gap and the mouth
blendshapes of preprocessing). Taught by the image loss alone, the code learned whatever told
this one voice's frames apart: a linear read-out of a trained macron avatar's code followed
another speaker's lips at r = 0.41 and 0.17; an encoder taught the mouth directly reached 0.57
(benchmarks/RESULTS.md, Lip sync)."""

MOTION_FEATURES = EYE_FEATURES + POSE_FEATURES
"""The default non-audio condition of the face branch. The head rotation raised katie's val PSNR
by 0.7 and 0.4 dB in two seeds (benchmarks/RESULTS.md, Training): the hair's deformation follows it."""


@dataclass
class TalkingHeadConfig(Config):
    """Everything needed to rebuild a :class:`TalkingHead` (saved in RUN/config.json)."""

    init: GaussianInitConfig = field(default_factory=GaussianInitConfig)
    sh_degree: int = 0
    """Spherical-harmonics degree of the colours (0: view-independent, the CPU choice)."""
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    face: FaceDeformationConfig = field(default_factory=FaceDeformationConfig)
    mouth: MouthDeformationConfig = field(default_factory=MouthDeformationConfig)
    motion_features: tuple[str, ...] = MOTION_FEATURES
    """Names of the non-audio condition tracks: blendshapes of the subject, ``POSE_FEATURES``, ``GAZE_FEATURES``
    or ``LAG_FEATURES``."""
    box_margin: float = 0.25
    """Margin around the canonical points of the deformation fields' bounding boxes (share of the extent)."""
    mouth_targets: tuple[str, ...] = MOUTH_TARGETS
    """Tracks a linear read-out of the audio code predicts during training (``loss.audio_mouth``);
    empty for no read-out. See :data:`MOUTH_TARGETS`."""

    def setup(self) -> "TalkingHead":
        return TalkingHead(self, n_face=1, n_mouth=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TalkingHeadConfig":
        """As :meth:`Config.from_dict`; runs trained before the motion condition had its name
        (``eye_features``, ``face.eye_dim``) keep loading."""
        data = dict(data)
        data.setdefault("mouth_targets", ())  # runs from before the read-out have none
        if "eye_features" in data:
            data["motion_features"] = data.pop("eye_features")
        if isinstance(data.get("face"), Mapping) and "eye_dim" in data["face"]:
            face = dict(data["face"])
            face["motion_dim"] = face.pop("eye_dim")
            data["face"] = face
        return super().from_dict(data)


def fit_boxes(config: TalkingHeadConfig, init: HeadInit) -> TalkingHeadConfig:
    """Set the encodings' bounding boxes around the initial face and mouth points."""

    def box(points: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        lo, hi = points.min(axis=0), points.max(axis=0)
        centre = (lo + hi) / 2
        half = (hi - lo) / 2 * (1 + config.box_margin) + 1e-3
        return tuple(float(v) for v in centre), tuple(float(v) for v in half)

    fc, fh = box(init.face_points)
    mc, mh = box(init.mouth_points)
    face = dataclasses.replace(config.face, encoding=dataclasses.replace(config.face.encoding, center=fc, half_extent=fh),
                               motion_dim=len(config.motion_features), audio_dim=config.audio.code_dim)
    mouth = dataclasses.replace(config.mouth, encoding=dataclasses.replace(config.mouth.encoding, center=mc, half_extent=mh),
                                audio_dim=config.audio.code_dim)
    return dataclasses.replace(config, face=face, mouth=mouth)


def face_region_gate(points: Tensor, region: Tensor) -> Tensor:
    """1.0 for the canonical ``points`` [N] on the face, else 0.0: inside the face oval seen from
    the front, and in front of the oval's plane (so not the back of the head).

    Colour offsets are confined to it: on the skin they draw lids and wrinkles; on the hair they
    let every strand's colour follow the condition, which fits the training frames' strands and
    made unseen frames worse (benchmarks/RESULTS.md).

    Args:
        points: [N, 3] in the canonical head frame.
        region: [M + 1, 3], the oval's M landmarks in order, then the nose tip.
    """
    oval, nose = region[:-1].to(points), region[-1].to(points)
    centre = oval.mean(dim=0)
    _, _, vt = torch.linalg.svd(oval - centre, full_matrices=False)
    u, v, normal = vt[0], vt[1], vt[2]
    if torch.dot(nose - centre, normal) < 0:
        normal = -normal
    rel = points - centre
    xy, poly = torch.stack([rel @ u, rel @ v], dim=-1), torch.stack([(oval - centre) @ u, (oval - centre) @ v], dim=-1)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = poly.roll(-1, dims=0)[:, 0], poly.roll(-1, dims=0)[:, 1]
    px, py = xy[:, 0:1], xy[:, 1:2]
    spans = (y0 > py) != (y1 > py)
    x_cross = x0 + (py - y0) * (x1 - x0) / torch.where((y1 - y0).abs() > 1e-12, y1 - y0, torch.ones_like(y1))
    inside = (spans & (px < x_cross)).sum(dim=1) % 2 == 1
    return (inside & (rel @ normal > 0)).to(points.dtype)


@dataclass
class LayerGaussians:
    """Deformed Gaussians of one layer, ready for :func:`avatar.render.rasterize`."""

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor
    """[N, 3] RGB, or SH coefficients [N, K, 3] when ``sh_degree`` > 0; with a leading B when the
    deformation changes colours per frame (``colors_per_frame``)."""
    colors_per_frame: bool = False

    def frame(self, b: int) -> "LayerGaussians":
        """Frame ``b`` of a layer deformed by B conditions (per-frame tensors have a leading B)."""
        def pick(t: Tensor, rank: int) -> Tensor:
            return t[b] if t.dim() > rank else t

        colors = self.colors[b] if self.colors_per_frame and self.means.dim() > 2 else self.colors
        return LayerGaussians(pick(self.means, 2), pick(self.quats, 2), pick(self.scales, 2),
                              pick(self.opacities, 1), colors)


class TalkingHead(SpeechConditioned):
    """Canonical Gaussians + audio conditioning + face and mouth deformation networks.

    Implements :class:`avatar.models.interface.AvatarModel` (kind ``gaussian``).
    """

    kind = "gaussian"
    layers = ("mouth", "face")

    def __init__(self, config: TalkingHeadConfig, n_face: int, n_mouth: int):
        super().__init__(config.audio, config.mouth_targets)
        self.config = config
        self.face = GaussianSet.empty(n_face, config.sh_degree)
        self.mouth = GaussianSet.empty(n_mouth, config.sh_degree)
        self.face_deform = config.face.setup()
        self.mouth_deform = config.mouth.setup()
        if config.face.color:
            self.register_buffer("face_region", torch.zeros(len(FACE_OVAL) + 1, 3))
            """Face oval landmarks and nose tip of the mean shape: where colours may change."""

    @classmethod
    def from_init(cls, config: TalkingHeadConfig, init: HeadInit) -> "TalkingHead":
        config = fit_boxes(config, init)
        model = cls(config, n_face=len(init.face_points), n_mouth=len(init.mouth_points))
        model.face = gaussian_set_from_points(init.face_points, init.face_colors, config.init, config.sh_degree)
        model.mouth = gaussian_set_from_points(init.mouth_points, init.mouth_colors, config.init, config.sh_degree)
        # The mouth interior starts darker and more transparent than the skin around it.
        with torch.no_grad():
            model.mouth.opacity_logits.fill_(0.0)
            if config.face.color:
                if init.face_region is None:
                    raise ValueError("colour offsets (config.face.color) need the init's face_region")
                model.face_region.copy_(torch.from_numpy(np.asarray(init.face_region)).float())
        return model

    @classmethod
    def from_state_dict(cls, config: TalkingHeadConfig, state: dict[str, Tensor]) -> "TalkingHead":
        """Rebuild from a checkpoint: Gaussian counts are read off the tensors' shapes."""
        state = {k.replace("face_deform.eye_proj.", "face_deform.motion_proj."): v for k, v in state.items()}
        model = cls(config, n_face=state["face.means"].shape[0], n_mouth=state["mouth.means"].shape[0])
        model.load_state_dict(state)
        return model

    def head_center(self) -> Tensor:
        return self.face.means.detach().mean(dim=0)

    def layer_points(self, cond: FrameCondition) -> dict[str, Tensor]:
        face, mouth = self.deform(cond)
        return {"face": face.means, "mouth": mouth.means}

    def summary(self) -> dict[str, Any]:
        return {"n_gaussians": {"face": len(self.face), "mouth": len(self.mouth)}}

    def canonical_gaussians(self) -> dict[str, np.ndarray]:
        """Face and mouth-interior Gaussians together, undeformed (the neutral head)."""
        sets = (self.face, self.mouth)
        with torch.no_grad():
            return {
                "means": torch.cat([g.means for g in sets]).cpu().numpy(),
                "sh": torch.cat([g.sh for g in sets]).cpu().numpy(),
                "opacity_logits": torch.cat([g.opacity_logits for g in sets]).cpu().numpy(),
                "log_scales": torch.cat([g.log_scales for g in sets]).cpu().numpy(),
                "quats": torch.nn.functional.normalize(torch.cat([g.quats for g in sets]), dim=-1).cpu().numpy(),
            }

    def network_parameters(self) -> list[nn.Parameter]:
        readout = [] if self.mouth_readout is None else list(self.mouth_readout.parameters())
        return [*self.audio.parameters(), *readout, *self.face_deform.parameters(), *self.mouth_deform.parameters()]

    def _colors(self, gaussians: GaussianSet, d_color: Optional[Tensor] = None) -> Tensor:
        """The rasterizer's colours; ``d_color`` [..., N, 3] shifts each Gaussian's base (DC) colour in RGB."""
        if self.config.sh_degree == 0:
            base = gaussians.sh[:, 0] * SH_C0 + 0.5
            return (base if d_color is None else base + d_color).clamp_min(0.0)
        if d_color is None:
            return gaussians.sh
        sh = gaussians.sh.expand(*d_color.shape[:-2], *gaussians.sh.shape)
        return torch.cat([sh[..., :1, :] + (d_color / SH_C0)[..., None, :], sh[..., 1:, :]], dim=-2)

    def deform(self, cond: Optional[FrameCondition]) -> tuple[LayerGaussians, LayerGaussians]:
        """Face and mouth layers for one frame (``cond=None``: the canonical, undeformed head)."""
        face, mouth = self.face, self.mouth
        d_color = None
        if cond is None:
            f_means, f_quats, f_logs = face.means, face.quats, face.log_scales
            m_means = mouth.means
        else:
            out = self.face_deform(face.means, cond.audio, cond.motion)
            f_means, f_quats, f_logs = apply_deformation(face.means, face.quats, face.log_scales,
                                                         out.d_xyz, out.d_rot, out.d_scale)
            m_means = mouth.means + self.mouth_deform(mouth.means, cond.audio)
            if out.d_color is not None:
                d_color = out.d_color * face_region_gate(face.means.detach(), self.face_region)[:, None]
        face_layer = LayerGaussians(f_means, f_quats, torch.exp(f_logs), face.opacities, self._colors(face, d_color),
                                    colors_per_frame=d_color is not None)
        mouth_layer = LayerGaussians(m_means, mouth.quats, mouth.scales, mouth.opacities, self._colors(mouth))
        return face_layer, mouth_layer

    def render_many(
        self,
        cond: FrameCondition,  # audio [B, C_a], motion [B, C_e]
        viewmats: Tensor,  # [B, 4, 4]
        K: Tensor,  # [3, 3]
        width: int,
        height: int,
        backgrounds: Tensor,  # [B, H, W, 3]
        backend: str = "auto",
    ) -> Tensor:  # [B, H, W, 3]
        """Render B frames: one batched deformation, then the layers of each frame.

        The deformation networks evaluate the tri-plane encoding once for all B conditions; this
        is what batching buys (most on a GPU). Returns composited RGB.
        """
        face_layer, mouth_layer = self.deform(cond)
        images = []
        for b in range(viewmats.shape[0]):
            out = self._composite(face_layer.frame(b), mouth_layer.frame(b), viewmats[b], K, width, height,
                                  backgrounds[b], backend, ("face", "mouth"))
            images.append(out["rgb"])
        return torch.stack(images)

    def render(
        self,
        cond: Optional[FrameCondition],
        viewmat: Tensor,  # [4, 4]
        K: Tensor,  # [3, 3]
        width: int,
        height: int,
        background: Optional[Tensor] = None,  # [H, W, 3]
        backend: str = "auto",
        layers: Optional[tuple[str, ...]] = None,
    ) -> dict[str, Any]:
        """Render one frame.

        Returns a dict with ``rgb`` [H, W, 3] (head over ``background``, or over black),
        ``head_alpha`` [H, W, 1], ``face_alpha``, ``mouth_alpha`` [H, W, 1], and ``meta`` per layer
        (the rasterizer's, for densification).
        """
        face_layer, mouth_layer = self.deform(cond)
        return self.render_layers(face_layer, mouth_layer, viewmat, K, width, height, background, backend, layers)

    def render_layers(self, face_layer: "LayerGaussians", mouth_layer: "LayerGaussians", viewmat: Tensor, K: Tensor,
                      width: int, height: int, background: Optional[Tensor] = None, backend: str = "auto",
                      layers: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """Render layers already deformed by :meth:`deform` (what :meth:`render` returns): many
        views of one frame's head, such as a pose fit's steps, deform it once."""
        return self._composite(face_layer, mouth_layer, viewmat, K, width, height, background, backend,
                               self.layers if layers is None else layers)

    def _composite(self, face_layer: "LayerGaussians", mouth_layer: "LayerGaussians", viewmat: Tensor, K: Tensor,
                   width: int, height: int, background: Optional[Tensor], backend: str,
                   layers: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"meta": {}}
        premult = torch.zeros(height, width, 3, device=viewmat.device)
        alpha = torch.zeros(height, width, 1, device=viewmat.device)
        # Back to front: mouth interior first, then the face layer over it.
        for name, layer in (("mouth", mouth_layer), ("face", face_layer)):
            if name not in layers:
                out[f"{name}_alpha"] = torch.zeros_like(alpha)
                continue
            rgb, a, meta = rasterize(
                layer.means, layer.quats, layer.scales, layer.opacities, layer.colors,
                viewmat[None], K[None], width, height,
                sh_degree=self.config.sh_degree if self.config.sh_degree > 0 else None, backend=backend,
            )
            rgb, a = rgb[0], a[0]
            premult = rgb + (1 - a) * premult
            alpha = a + (1 - a) * alpha
            out[f"{name}_alpha"] = a
            out["meta"][name] = meta
        out["head_rgb"] = premult
        out["head_alpha"] = alpha
        out["rgb"] = premult if background is None else premult + (1 - alpha) * background
        return out
