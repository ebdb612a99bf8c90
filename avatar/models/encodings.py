"""Multi-resolution hash-grid tri-plane encoding of 3D positions.

A position inside a bounding box is projected onto the three axis-aligned planes xy, yz and xz;
each plane holds a multi-resolution 2D grid of learned feature vectors (instant-ngp's hash
encoding, in 2D), read by bilinear interpolation. Why planes and not one 3D hash grid: a talking
head's deformation field is smooth along most directions and sharp only across a few surfaces
(lips, eyelids); three 2D tables hold fine resolution at a fraction of the memory and with far
fewer hash collisions than a 3D table of the same size (ER-NeRF, TalkingGaussian).

Per level ``l`` a plane is a grid of ``R_l`` x ``R_l`` cells (``(R_l + 1)^2`` vertices) over the
unit square, with ``R_l`` growing geometrically from ``base_resolution`` to ``max_resolution``.
A level whose vertices fit in its table (``(R_l + 1)^2 <= 2**log2_hashmap_size``) indexes them
densely (``x + y (R_l + 1)``, no collisions); finer levels hash the vertex coordinates into a
table of ``2**log2_hashmap_size`` entries (``x XOR y * 2654435761``, the instant-ngp prime) and
let training resolve the collisions.

:func:`avatar.render.triplane.triplane_encode` computes the encoding: a C++ kernel on the CPU, a
CUDA kernel on the GPU, or its PyTorch twin ``_triplane_encode`` (re-exported here with
``PLANE_AXES``); this module owns the tables, their layout and the box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from avatar.configs import Config
from avatar.render.triplane import (
    IMPLEMENTATIONS,
    PLANE_AXES,
    Implementation,
    _triplane_encode,
    triplane_encode,
)

__all__ = ["COMBINE_MODES", "PLANE_AXES", "TriPlaneConfig", "TriPlaneEncoding", "_triplane_encode"]

COMBINE_MODES = ("concat", "sum")
"""Valid values of :attr:`TriPlaneConfig.combine`."""


@dataclass
class TriPlaneConfig(Config):
    """Options of :class:`TriPlaneEncoding`.

    The defaults are sized for the CPU: 8 levels x 2 features x 3 planes = 48 output channels and
    ~0.35 M parameters (1.4 MB), with the finest cell of a 0.25 m head box about 1 mm, finer than
    a pixel of a <= 512 px face crop. Six of the eight levels fit their table and are exact; the
    two finest are hashed into 2-4x fewer entries than they have vertices.
    """

    n_levels: int = 8
    """Number of resolution levels L. Each adds ``features_per_level`` channels per plane and
    one gather of four corners per point and plane; 8 covers 16..256 at a ~1.5x step."""

    features_per_level: int = 2
    """Feature channels F stored per grid vertex (instant-ngp's default; 1 loses expressiveness,
    4 doubles memory traffic for little gain at these sizes)."""

    log2_hashmap_size: int = 14
    """Entries per level and plane are at most ``2**log2_hashmap_size``. 14 (16384) keeps levels
    up to 127 x 127 cells dense; instant-ngp's 19 is for 3D scenes and far too big for 2D planes
    on a CPU."""

    base_resolution: int = 16
    """Cells per side of the coarsest level: about 1.5 cm over a head-sized box, coarse enough
    that every Gaussian's neighbourhood shares features early in training."""

    max_resolution: int = 256
    """Cells per side of the finest level. 256 resolves lips and eyelids at CPU training
    resolutions; 512 helps only at >= 512 px and doubles the hashed levels' collisions."""

    combine: str = "concat"
    """How the planes' features are joined: ``concat`` (out_dim = 3 L F; keeps which plane a
    feature came from, the usual choice) or ``sum`` (out_dim = L F; cheaper downstream)."""

    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Centre of the bounding box in input (world) units. Set from the data (e.g. the canonical
    Gaussians' extent) before building the model; the config then rebuilds it exactly."""

    half_extent: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Half side lengths of the box per axis, in input units; positions map to ``[-1, 1]^3``
    by ``(x - center) / half_extent``. Positions outside are clamped to the box surface (their
    features stop changing and their position gradient is zero), so give the box a margin."""

    init_scale: float = 1e-4
    """Table entries start uniform in ``[-init_scale, init_scale]`` (instant-ngp): near-zero
    features, so the network on top starts from its biases, yet not exactly zero so that
    gradients differ between entries from the first step."""

    def __post_init__(self) -> None:
        for name in ("n_levels", "features_per_level", "base_resolution", "max_resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TriPlaneConfig.{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.log2_hashmap_size, int) or not 4 <= self.log2_hashmap_size <= 30:
            raise ValueError(
                f"TriPlaneConfig.log2_hashmap_size: expected an integer in 4..30, got "
                f"{self.log2_hashmap_size!r}"
            )
        if self.max_resolution < self.base_resolution:
            raise ValueError(
                f"TriPlaneConfig: expected max_resolution >= base_resolution, got "
                f"{self.max_resolution} < {self.base_resolution}"
            )
        if self.combine not in COMBINE_MODES:
            raise ValueError(
                f"TriPlaneConfig.combine: expected one of {COMBINE_MODES}, got {self.combine!r}"
            )
        self.center = _float_triple("center", self.center)
        self.half_extent = _float_triple("half_extent", self.half_extent)
        if min(self.half_extent) <= 0:
            raise ValueError(
                f"TriPlaneConfig.half_extent: expected positive values, got {self.half_extent}"
            )
        if not self.init_scale >= 0:
            raise ValueError(f"TriPlaneConfig.init_scale: expected >= 0, got {self.init_scale!r}")

    def resolutions(self) -> list[int]:
        """Cells per side of each level, geometric from base to max resolution (rounded)."""
        if self.n_levels == 1:
            return [self.base_resolution]
        growth = math.exp(math.log(self.max_resolution / self.base_resolution) / (self.n_levels - 1))
        return [int(round(self.base_resolution * growth**level)) for level in range(self.n_levels)]

    @property
    def out_dim(self) -> int:
        """Output channels: ``3 L F`` for ``concat``, ``L F`` for ``sum``."""
        planes = 3 if self.combine == "concat" else 1
        return planes * self.n_levels * self.features_per_level

    def setup(self) -> "TriPlaneEncoding":
        return TriPlaneEncoding(self)


def _float_triple(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"TriPlaneConfig.{name}: expected 3 numbers, got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"TriPlaneConfig.{name}: expected 3 finite numbers, got {value!r}")
    return triple  # type: ignore[return-value]


class TriPlaneEncoding(nn.Module):
    """Learned tri-plane hash-grid features of 3D positions: ``[..., 3] -> [..., out_dim]``.

    All tables live in one flat ``embeddings`` parameter ``[E, F]`` (one optimizer group, one
    gather per call); the per-level layout is kept in non-persistent buffers derived from the
    config, so the config alone rebuilds the module and a checkpoint holds just the tables.

    Examples:
        >>> import torch
        >>> from avatar.models.encodings import TriPlaneConfig, TriPlaneEncoding
        >>> enc = TriPlaneEncoding(TriPlaneConfig(center=(0.0, 0.0, 0.1), half_extent=(0.15,) * 3))
        >>> enc(torch.zeros(5, 7, 3)).shape
        torch.Size([5, 7, 48])

    Args:
        config: the encoding's options (the default config when None).
        implementation: which code computes it, see :func:`avatar.render.triplane.triplane_encode`
            ("auto": the C++ or CUDA kernel when it builds, else PyTorch). A runtime choice, not
            part of the config: every implementation computes the same function, so a saved
            model loads and runs under any of them. Change it with the attribute of that name.

    Raises:
        ValueError: ``implementation`` is not one of "auto", "torch", "cpp", "cuda".
    """

    def __init__(self, config: TriPlaneConfig | None = None, implementation: Implementation = "auto") -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"TriPlaneEncoding: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.implementation: Implementation = implementation
        self.config = config = config if config is not None else TriPlaneConfig()
        table = 1 << config.log2_hashmap_size
        resolutions = config.resolutions()
        sizes = [min((r + 1) ** 2, table) for r in resolutions]
        self.n_dense = sum((r + 1) ** 2 <= table for r in resolutions)
        starts = [0]
        for _ in PLANE_AXES:
            for size in sizes:
                starts.append(starts[-1] + size)
        n_rows = starts.pop()
        self.register_buffer(
            "resolutions", torch.tensor(resolutions, dtype=torch.long), persistent=False
        )  # [L]
        self.register_buffer(
            "offsets", torch.tensor(starts, dtype=torch.long).reshape(3, len(sizes)).T.contiguous(),
            persistent=False,
        )  # [L, 3]
        # float64 so that float64 inputs are normalised exactly (float32 would round 0.1)
        self.register_buffer(
            "center", torch.tensor(config.center, dtype=torch.float64), persistent=False
        )
        self.register_buffer(
            "half_extent", torch.tensor(config.half_extent, dtype=torch.float64), persistent=False
        )
        self.embeddings = nn.Parameter(torch.empty(n_rows, config.features_per_level))
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        """Output channels per position (see :attr:`TriPlaneConfig.out_dim`)."""
        return self.config.out_dim

    def reset_parameters(self) -> None:
        """Re-draw the tables uniformly in ``[-init_scale, init_scale]``."""
        with torch.no_grad():
            self.embeddings.uniform_(-self.config.init_scale, self.config.init_scale)

    def box(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``center`` and ``half_extent`` in ``like``'s dtype (and on its device). [3], [3]"""
        return self.center.to(like.dtype), self.half_extent.to(like.dtype)

    def normalize(self, positions: Tensor) -> Tensor:
        """Box coordinates ``(x - center) / half_extent``, ``[-1, 1]`` inside the box. [..., 3]"""
        center, half_extent = self.box(positions)
        return (positions - center) / half_extent

    def forward(self, positions: Tensor) -> Tensor:
        """Encode positions.

        Args:
            positions: points in input (world) units, any leading dims; gradients flow back to
                them (through the bilinear weights) when they require grad. [..., 3]

        Returns:
            Features: per plane (xy, yz, xz), per level (coarse to fine), F channels each,
            concatenated in that order, or summed over planes. [..., out_dim]

        Raises:
            ValueError: ``positions`` is not a floating tensor with a last dimension of 3.
        """
        if not positions.is_floating_point() or positions.ndim < 1 or positions.shape[-1] != 3:
            raise ValueError(
                f"TriPlaneEncoding: expected floating positions of shape [..., 3], got "
                f"{tuple(positions.shape)} {positions.dtype}"
            )
        lead = positions.shape[:-1]
        coords = ((self.normalize(positions.reshape(-1, 3)) + 1.0) * 0.5).clamp(0.0, 1.0)  # [M, 3]
        feats = triplane_encode(
            coords, self.embeddings, self.resolutions, self.offsets, self.n_dense,
            self.config.log2_hashmap_size, implementation=self.implementation,
        )  # [M, 3, L, F]
        if self.config.combine == "sum":
            feats = feats.sum(dim=1)
        return feats.reshape(*lead, self.out_dim)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"levels={c.n_levels}, features={c.features_per_level}, resolutions={c.resolutions()}, "
            f"dense_levels={self.n_dense}, log2_hashmap_size={c.log2_hashmap_size}, "
            f"combine={c.combine}, rows={self.embeddings.shape[0]}, implementation={self.implementation}"
        )
