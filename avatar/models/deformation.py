"""Deformation networks: per-Gaussian offsets from canonical position and condition.

TalkingGaussian's idea: keep one structure-persistent canonical set of Gaussians and move it,
never re-colour it, so appearance stays consistent across frames. Two branches:

- :class:`FaceDeformation` moves the face Gaussians (position, rotation, scale) from a tri-plane
  encoding of their canonical position and a condition made of an audio code and a motion /
  expression vector, mixed per Gaussian by *region attention*: each Gaussian's spatial feature
  decides how much it listens to audio (lips, jaw) versus the motion condition (eyelids, brows, head rotation).
- :class:`MouthDeformation` translates the mouth-interior Gaussians (teeth, tongue) from their
  own, smaller tri-plane encoding and the audio code.

Both output layers start at zero, so an untrained network is exactly the identity deformation
whatever the condition: training starts from the canonical shape and grows motion from there.

Offsets are applied by :func:`apply_deformation`; their conventions:

- ``d_xyz`` is in world units (the network predicts it in box units, ``[-1, 1]`` across the
  tri-plane's box, and scales by ``half_extent``, so it is independent of the world's scale);
- ``d_rot`` is the residual ``r`` of a delta quaternion ``q_d = (1, 0, 0, 0) + r`` in
  ``(w, x, y, z)`` order, normalised and left-multiplied onto the canonical rotation:
  ``q = normalize(q_d) * q_can``. A composed rotation, unlike an additive delta to ``q_can``,
  rotates every Gaussian by the same amount for the same ``r`` whatever the norm of its
  (unnormalised, trained) ``q_can``, and ``r = 0`` is exactly the identity;
- ``d_scale`` adds to the log-scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from avatar.configs import Config
from avatar.models.encodings import TriPlaneConfig, TriPlaneEncoding


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name}: expected a positive integer, got {value!r}")


def _check_layers(owner: str, n_layers: int) -> None:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
        raise ValueError(f"{owner}.n_layers: expected an integer >= 2, got {n_layers!r}")


@dataclass
class FaceDeformationConfig(Config):
    """Options of :class:`FaceDeformation`."""

    encoding: TriPlaneConfig = field(default_factory=TriPlaneConfig)
    """Tri-plane encoding of canonical positions. Its ``center``/``half_extent`` must enclose the
    face Gaussians (with a margin): the trainer sets them from the canonical set."""

    audio_dim: int = 32
    """C_a, size of the audio code (:attr:`AudioEncoderConfig.code_dim`)."""

    motion_dim: int = 5
    """C_e, size of the motion condition (non-audio tracks): by default the blink track and four
    expression coefficients."""

    hidden: int = 64
    """Width of the MLP (TalkingGaussian's 64: a 20 k-point forward and backward stays in the
    tens of milliseconds on a CPU core)."""

    n_layers: int = 3
    """Linear layers of the MLP, counting the fusion layer and the output layer (>= 2)."""

    color: bool = False
    """Also predict a colour offset per Gaussian (``d_color``, RGB). Moving Gaussians alone cannot
    draw what appears and fades with an expression (forehead wrinkles, lids closing over the
    eyes, shading as the cheeks lift); off in configs that predate it, whose networks have no
    such outputs."""

    def __post_init__(self) -> None:
        if isinstance(self.encoding, dict):
            self.encoding = TriPlaneConfig.from_dict(self.encoding)
        if not isinstance(self.encoding, TriPlaneConfig):
            raise ValueError(
                f"FaceDeformationConfig.encoding: expected a TriPlaneConfig, got "
                f"{type(self.encoding).__name__}"
            )
        _check_positive(
            "FaceDeformationConfig", audio_dim=self.audio_dim, motion_dim=self.motion_dim, hidden=self.hidden
        )
        _check_layers("FaceDeformationConfig", self.n_layers)

    def setup(self) -> "FaceDeformation":
        return FaceDeformation(self)


@dataclass
class MouthDeformationConfig(Config):
    """Options of :class:`MouthDeformation`.

    Smaller than the face branch: the mouth interior is a few hundred to a few thousand
    Gaussians whose motion is close to rigid per part (upper teeth still, lower teeth and
    tongue following the jaw), so a coarser, smaller grid and a narrower MLP suffice.
    """

    encoding: TriPlaneConfig = field(
        default_factory=lambda: TriPlaneConfig(n_levels=6, log2_hashmap_size=12, max_resolution=128)
    )
    """Tri-plane encoding of canonical mouth positions; its box must enclose the mouth
    Gaussians (the trainer sets ``center``/``half_extent``). 6 levels of 16..128 cells."""

    audio_dim: int = 32
    """C_a, size of the audio code."""

    hidden: int = 32
    """Width of the MLP."""

    n_layers: int = 3
    """Linear layers of the MLP, counting the fusion layer and the output layer (>= 2)."""

    def __post_init__(self) -> None:
        if isinstance(self.encoding, dict):
            self.encoding = TriPlaneConfig.from_dict(self.encoding)
        if not isinstance(self.encoding, TriPlaneConfig):
            raise ValueError(
                f"MouthDeformationConfig.encoding: expected a TriPlaneConfig, got "
                f"{type(self.encoding).__name__}"
            )
        _check_positive("MouthDeformationConfig", audio_dim=self.audio_dim, hidden=self.hidden)
        _check_layers("MouthDeformationConfig", self.n_layers)

    def setup(self) -> "MouthDeformation":
        return MouthDeformation(self)


class FaceDeformationOutput(NamedTuple):
    """What :class:`FaceDeformation` returns; ``...`` is the condition's batch dims (none or B)."""

    d_xyz: Tensor
    """Position offsets in world units. [..., N, 3]"""

    d_rot: Tensor
    """Residual ``r`` of the delta quaternion ``(1, 0, 0, 0) + r``, (w, x, y, z). [..., N, 4]"""

    d_scale: Tensor
    """Log-scale offsets. [..., N, 3]"""

    attention: Tensor
    """Region attention weights (audio, motion) per Gaussian, rows summing to 1. [N, 2]"""

    d_color: Optional[Tensor] = None
    """RGB offsets, with :attr:`FaceDeformationConfig.color` (else None). [..., N, 3]"""


def _mlp_tail(hidden: int, n_layers: int, out_dim: int) -> tuple[nn.Sequential, nn.Linear]:
    """Hidden layers after the fusion layer, and the zero-initialised output layer."""
    layers: list[nn.Module] = [nn.ReLU()]
    for _ in range(n_layers - 2):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    out = nn.Linear(hidden, out_dim)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers), out


def _check_condition(owner: str, name: str, value: Tensor, dim: int) -> None:
    if value.ndim not in (1, 2) or value.shape[-1] != dim:
        raise ValueError(
            f"{owner}: expected {name} of shape [{dim}] or [B, {dim}], got {tuple(value.shape)}"
        )


def _check_positions(owner: str, positions: Tensor) -> None:
    if not positions.is_floating_point() or positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(
            f"{owner}: expected floating positions of shape [N, 3], got {tuple(positions.shape)} "
            f"{positions.dtype}"
        )


class FaceDeformation(nn.Module):
    """Face branch: ``(positions [N, 3], audio [C_a], motion [C_e]) -> offsets of N Gaussians``.

    Per Gaussian, with ``f`` its tri-plane feature:

    - region attention ``a = softmax(Linear(f))`` ``[N, 2]``: how much it follows audio vs the motion tracks
      (a linear read-out suffices because ``f`` itself is learned per region);
    - fusion ``h = relu(W_f f + a_0 P_a(audio) + a_1 P_e(motion) + b)``: this is a linear layer on
      ``concat(f, a_0 P_a(audio), a_1 P_e(motion))`` with the condition's share computed once per
      frame instead of once per Gaussian (the projections are applied to one vector, not N);
    - an MLP to 10 outputs: ``d_xyz`` (3, box units), ``d_rot`` (4), ``d_scale`` (3), and 3 more
      (``d_color``) with :attr:`FaceDeformationConfig.color`.

    A condition with a leading batch dim ``[B, C]`` deforms the same Gaussians for B frames at
    the cost of one encoding: outputs are then ``[B, N, ...]``.
    """

    def __init__(self, config: FaceDeformationConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else FaceDeformationConfig()
        self.encoding = TriPlaneEncoding(config.encoding)
        feat = self.encoding.out_dim
        self.region = nn.Linear(feat, 2)
        nn.init.zeros_(self.region.bias)  # start unbiased between audio and motion tracks
        self.audio_proj = nn.Linear(config.audio_dim, config.hidden)
        self.motion_proj = nn.Linear(config.motion_dim, config.hidden)
        self.fuse = nn.Linear(feat, config.hidden)
        self.mlp, self.out = _mlp_tail(config.hidden, config.n_layers, 13 if config.color else 10)

    def forward(
        self,
        positions: Tensor,  # [N, 3]
        audio: Tensor,  # [C_a] | [B, C_a]
        motion: Tensor,  # [C_e] | [B, C_e]
    ) -> FaceDeformationOutput:
        """Offsets of the face Gaussians for one frame's (or B frames') condition.

        Args:
            positions: canonical Gaussian centres, world units. [N, 3]
            audio: audio code of the frame. [C_a] or [B, C_a]
            motion: non-audio condition of the frame (blinks, brows, head rotation), same batch dims as ``audio``.
                [C_e] or [B, C_e]

        Returns:
            :class:`FaceDeformationOutput`: ``d_xyz`` [..., N, 3], ``d_rot`` [..., N, 4],
            ``d_scale`` [..., N, 3], ``attention`` [N, 2], ``d_color`` [..., N, 3] or None; all
            offsets zero at initialisation.

        Raises:
            ValueError: a shape does not match the config or the batch dims differ.
        """
        name, c = type(self).__name__, self.config
        _check_positions(name, positions)
        _check_condition(name, "audio", audio, c.audio_dim)
        _check_condition(name, "motion", motion, c.motion_dim)
        if audio.shape[:-1] != motion.shape[:-1]:
            raise ValueError(
                f"{name}: expected audio and motion with the same batch dims, got {tuple(audio.shape)} "
                f"and {tuple(motion.shape)}"
            )
        feat = self.encoding(positions)  # [N, E]
        attention = torch.softmax(self.region(feat), dim=-1)  # [N, 2]
        audio_h = self.audio_proj(audio)[..., None, :]  # [..., 1, H]
        motion_h = self.motion_proj(motion)[..., None, :]  # [..., 1, H]
        h = self.fuse(feat) + attention[:, 0:1] * audio_h + attention[:, 1:2] * motion_h  # [..., N, H]
        out = self.out(self.mlp(h))  # [..., N, 10 or 13]
        d_xyz = out[..., 0:3] * self.encoding.box(out)[1]
        d_color = out[..., 10:13] if c.color else None
        return FaceDeformationOutput(d_xyz, out[..., 3:7], out[..., 7:10], attention, d_color)


class MouthDeformation(nn.Module):
    """Mouth branch: ``(positions [N, 3], audio [C_a]) -> d_xyz [N, 3]``, translation only.

    ``h = relu(W_f f + P_a(audio) + b)`` on the tri-plane feature ``f``, then an MLP to a
    translation in box units scaled to world units. Translation is enough inside the mouth: the
    teeth and tongue move rigidly with the jaw and are seen through the lips, so their rotation
    and scale barely show.
    """

    def __init__(self, config: MouthDeformationConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else MouthDeformationConfig()
        self.encoding = TriPlaneEncoding(config.encoding)
        self.audio_proj = nn.Linear(config.audio_dim, config.hidden)
        self.fuse = nn.Linear(self.encoding.out_dim, config.hidden)
        self.mlp, self.out = _mlp_tail(config.hidden, config.n_layers, 3)

    def forward(
        self,
        positions: Tensor,  # [N, 3]
        audio: Tensor,  # [C_a] | [B, C_a]
    ) -> Tensor:  # [..., N, 3]
        """Translations of the mouth Gaussians for one frame's (or B frames') audio code.

        Args:
            positions: canonical Gaussian centres, world units. [N, 3]
            audio: audio code of the frame. [C_a] or [B, C_a]

        Returns:
            Position offsets in world units, zero at initialisation. [..., N, 3]

        Raises:
            ValueError: a shape does not match the config.
        """
        name = type(self).__name__
        _check_positions(name, positions)
        _check_condition(name, "audio", audio, self.config.audio_dim)
        h = self.fuse(self.encoding(positions)) + self.audio_proj(audio)[..., None, :]  # [..., N, H]
        out = self.out(self.mlp(h))  # [..., N, 3]
        return out * self.encoding.box(out)[1]


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` of quaternions in (w, x, y, z) order (rotation b, then a).

    Args:
        a: [..., 4]
        b: [..., 4], broadcastable with ``a``.

    Returns:
        [..., 4]
    """
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def apply_deformation(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    log_scales: Tensor,  # [N, 3]
    d_xyz: Tensor | None = None,  # [..., N, 3]
    d_rot: Tensor | None = None,  # [..., N, 4]
    d_scale: Tensor | None = None,  # [..., N, 3]
) -> tuple[Tensor, Tensor, Tensor]:
    """Deformed Gaussians from canonical ones and offsets (the conventions of this module).

    ``means + d_xyz``, ``normalize((1, 0, 0, 0) + d_rot) * quats`` and ``log_scales + d_scale``;
    an offset that is None leaves its quantity unchanged. Zero offsets give back the inputs
    exactly (up to broadcasting).

    Args:
        means: canonical centres. [N, 3]
        quats: canonical rotations (w, x, y, z), any norm; the result keeps each norm. [N, 4]
        log_scales: canonical log-scales. [N, 3]
        d_xyz: position offsets. [..., N, 3]
        d_rot: delta-quaternion residuals. [..., N, 4]
        d_scale: log-scale offsets. [..., N, 3]

    Returns:
        means [..., N, 3], quats [..., N, 4], log_scales [..., N, 3].
    """
    if d_xyz is not None:
        means = means + d_xyz
    if d_rot is not None:
        identity = torch.zeros(4, dtype=d_rot.dtype, device=d_rot.device)
        identity[0] = 1.0
        delta = d_rot + identity
        delta = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        quats = quaternion_multiply(delta, quats)
    if d_scale is not None:
        log_scales = log_scales + d_scale
    return means, quats, log_scales
