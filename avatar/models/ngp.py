"""The NGP talking head: a dynamic radiance field in the head's canonical frame (ER-NeRF, RAD-NeRF).

Where the Gaussian kind moves points, this kind conditions a field: at a position ``x`` of the
canonical head, tri-plane hash features ``f(x)`` gate the frame's audio code and motion tracks by
region attention (ER-NeRF: lips listen to the audio, eyelids to the blink tracks, the forehead to
neither), and small MLPs turn ``[f, gated audio, gated motion]`` into a density and a colour.

The inside of the mouth is a second, smaller field over a box around the lips, driven by audio
alone. Both are evaluated along each ray and mixed by density (``sigma = sigma_face +
sigma_mouth``, colours weighted by their densities), so teeth and tongue are not painted on the
lips: where the lips close, the face field's density hides the mouth field.

Rendering marches rays through an instant-NGP occupancy grid (a density bitfield over the head's
box, refreshed during training) with empty-space skipping and early termination, and composites
front to back (:mod:`avatar.render.raymarch`, torch twin, C++ CPU and CUDA kernels). The head is
then composited over the caller's background exactly like the Gaussian kind's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from avatar.configs import Config
from avatar.models.audio import AudioEncoderConfig
from avatar.models.conditioning import SpeechConditioned
from avatar.models.encodings import TriPlaneConfig, TriPlaneEncoding
from avatar.models.interface import FrameCondition
from avatar.models.talking_head import MOTION_FEATURES, MOUTH_TARGETS
from avatar.render.raymarch import RaySamples, composite_rays, march_rays, ray_aabb

Box = tuple[tuple[float, float, float], tuple[float, float, float]]
"""(centre, half extent) of an axis-aligned box in world units."""


def _face_encoding() -> TriPlaneConfig:
    return TriPlaneConfig(n_levels=8, base_resolution=16, max_resolution=256, log2_hashmap_size=15)


def _mouth_encoding() -> TriPlaneConfig:
    return TriPlaneConfig(n_levels=6, base_resolution=16, max_resolution=128, log2_hashmap_size=13)


@dataclass
class NGPHeadConfig(Config):
    """Everything needed to rebuild an :class:`NGPHead` (saved in RUN/config.json)."""

    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    face_encoding: TriPlaneConfig = field(default_factory=_face_encoding)
    """Tri-plane of the face field; its box (``center``, ``half_extent``) is the head's, fitted to
    the initial head points, and is also the occupancy grid's box."""
    mouth_encoding: TriPlaneConfig = field(default_factory=_mouth_encoding)
    """Tri-plane of the mouth-interior field, over a box around the mouth's initial points."""
    hidden: int = 64
    """Width of the density and colour MLPs (ER-NeRF: 64)."""
    geo_features: int = 15
    """Features the density MLP hands to the colour MLP."""
    view_dependent: bool = False
    """Give the colour MLP the view direction (in the head's frame). Off on the CPU presets."""
    motion_features: tuple[str, ...] = MOTION_FEATURES
    """Non-audio condition tracks of the face field (blinks, brows, head rotation)."""
    mouth_targets: tuple[str, ...] = MOUTH_TARGETS
    """Tracks a linear read-out of the audio code predicts in training (as the Gaussian kind)."""
    box_margin: float = 0.15
    """Margin of the boxes around the initial points (share of their extent)."""
    grid_resolution: int = 64
    """Cells per side of the occupancy grid."""
    steps_per_box: int = 192
    """Ray-marching steps across the box's diagonal: the step is ``diagonal / steps_per_box``."""
    max_samples: int = 256
    """At most this many samples per ray (after empty-space skipping)."""
    round_samples: int = 16
    """Samples per ray and round when rendering (rays that became opaque drop out between rounds)."""
    stop_transmittance: float = 1e-3
    """A ray stops once less than this much light gets through (early termination): 1e-3 leaves
    at most a quarter of a grey level of the image behind the head unseen."""
    density_bias: float = -1.0
    """Added to the raw density before the exponential: at the start a ray through the whole box
    is about half transparent, so every cell gets gradients."""

    def __post_init__(self) -> None:
        for name in ("hidden", "geo_features", "grid_resolution", "steps_per_box", "max_samples", "round_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NGPHeadConfig.{name}: expected a positive integer, got {value!r}")

    def setup(self) -> "NGPHead":
        return NGPHead(self)

    @property
    def step_size(self) -> float:
        """Ray-marching step in world units."""
        half = np.asarray(self.face_encoding.half_extent)
        return float(2 * np.linalg.norm(half) / self.steps_per_box)


def fit_ngp_boxes(config: NGPHeadConfig, face_points: np.ndarray, mouth_points: np.ndarray) -> NGPHeadConfig:
    """The config with its face and mouth boxes around the initial head and mouth points."""

    def box(points: np.ndarray) -> Box:
        lo, hi = points.min(axis=0), points.max(axis=0)
        centre = (lo + hi) / 2
        half = (hi - lo) / 2 * (1 + config.box_margin) + 1e-3
        return tuple(float(v) for v in centre), tuple(float(v) for v in half)  # type: ignore[return-value]

    fc, fh = box(np.concatenate([face_points, mouth_points]))
    mc, mh = box(mouth_points)
    return dataclasses.replace(
        config,
        face_encoding=dataclasses.replace(config.face_encoding, center=fc, half_extent=fh),
        mouth_encoding=dataclasses.replace(config.mouth_encoding, center=mc, half_extent=mh),
    )


class _TruncExp(torch.autograd.Function):
    """``exp`` whose gradient is taken at ``min(x, 15)`` (torch-ngp): densities can grow large
    without their gradients overflowing."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x.clamp(max=30.0))


class RadianceBranch(nn.Module):
    """One conditioned field: tri-plane features -> (raw density, rgb).

    The conditions (one frame's audio code and motion tracks) are gated per position by region
    attention: ``sigmoid(W f(x))`` scales each condition channel, so the field learns where a
    track matters (ER-NeRF). ``motion_dim = 0``: audio only (the mouth interior).
    """

    def __init__(self, encoding: TriPlaneConfig, audio_dim: int, motion_dim: int, hidden: int, geo_features: int,
                 view_dependent: bool):
        super().__init__()
        self.encoding = TriPlaneEncoding(encoding)
        f = self.encoding.out_dim
        self.audio_dim, self.motion_dim = audio_dim, motion_dim
        self.attention = nn.Linear(f, audio_dim + motion_dim)
        # One hidden layer for density and one for colour (instant-NGP's sizes): on a CPU the MLPs
        # are most of a step, and the hash features carry the detail.
        self.density = nn.Sequential(
            nn.Linear(f + audio_dim + motion_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 1 + geo_features),
        )
        self.view_dependent = view_dependent
        self.color = nn.Sequential(
            nn.Linear(geo_features + (3 if view_dependent else 0), hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 3),
        )

    def forward(self, x: Tensor, audio: Tensor, motion: Optional[Tensor], dirs: Optional[Tensor] = None,
                density_only: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Raw density [S] and colour [S, 3] (None with ``density_only``) at positions ``x`` [S, 3]
        under one frame's condition (``audio`` [C_a], ``motion`` [C_e] or None)."""
        feats = self.encoding(x)  # [S, F]
        gates = torch.sigmoid(self.attention(feats))  # [S, C_a + C_e]
        conds = audio if motion is None or self.motion_dim == 0 else torch.cat([audio, motion])
        # The first layer of [f, gates * conds]: one frame's conds fold into the weights
        # (W_c diag(conds)), so no [S, F + C] input is built.
        first, n_feats = self.density[0], feats.shape[1]
        h = nn.functional.linear(feats, first.weight[:, :n_feats], first.bias)
        h = h + nn.functional.linear(gates, first.weight[:, n_feats:] * conds[None])
        h = self.density[2](torch.relu_(h))
        raw_sigma, geo = h[:, 0], h[:, 1:]
        if density_only:
            return raw_sigma, None
        if self.view_dependent:
            geo = torch.cat([geo, dirs if dirs is not None else torch.zeros_like(x)], dim=-1)
        return raw_sigma, torch.sigmoid(self.color(geo))


def camera_rays(viewmat: Tensor, K: Tensor, xy: Tensor) -> tuple[Tensor, Tensor]:
    """World-space rays through pixel centres ``xy`` [R, 2] (column, row) of a camera
    (``viewmat`` [4, 4] world-to-camera, ``K`` [3, 3]): origins [R, 3] and unit directions [R, 3]."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    centre = -rot.T @ trans
    pix = torch.cat([xy.to(K) + 0.5, torch.ones_like(xy[:, :1], dtype=K.dtype)], dim=-1)  # [R, 3]
    cam = torch.linalg.solve(K, pix.T).T  # [R, 3] camera-space directions (z = 1)
    dirs = torch.nn.functional.normalize(cam @ rot, dim=-1)  # R^T d for each row
    return centre.expand_as(dirs), dirs


class NGPHead(SpeechConditioned):
    """Audio conditioning + face and mouth-interior radiance fields + an occupancy grid.

    Implements :class:`avatar.models.interface.AvatarModel` (kind ``ngp``).
    """

    kind = "ngp"
    layers = ("mouth", "face")

    def __init__(self, config: NGPHeadConfig):
        super().__init__(config.audio, config.mouth_targets)
        self.config = config
        c_a, c_e = config.audio.code_dim, len(config.motion_features)
        self.face = RadianceBranch(config.face_encoding, c_a, c_e, config.hidden, config.geo_features,
                                   config.view_dependent)
        self.mouth = RadianceBranch(config.mouth_encoding, c_a, 0, config.hidden // 2, config.geo_features,
                                    config.view_dependent)
        g = config.grid_resolution
        self.register_buffer("density_grid", torch.full((g, g, g), -1.0))
        """[G, G, G] decaying maximum of the density seen in each cell (instant-NGP); -1: never
        measured, counted as occupied until it is."""
        self.register_buffer("aabb", torch.tensor(_box_bounds(config.face_encoding), dtype=torch.float32), persistent=False)
        self.register_buffer("mouth_aabb", torch.tensor(_box_bounds(config.mouth_encoding), dtype=torch.float32),
                             persistent=False)
        self.register_buffer("mouth_cells", self._in_mouth_box(self.cell_centres()).reshape(g, g, g), persistent=False)
        """[G, G, G] bool: cells inside the mouth box, always marched."""
        self._occupied: Optional[tuple[tuple[int, int], Tensor]] = None
        """The bitfield of :meth:`occupancy`, with the grid's storage and version it was made from."""
        self.density_scale = 1.0 / float(np.mean(config.face_encoding.half_extent))
        """Densities are per box half-extent rather than per metre: a head of any size in any
        units starts from the same optical depths."""
        self.chunk = 1 << 14
        """Rays marched at once when rendering an image (bounds memory)."""
        self.implementation = "auto"
        """Kernels used for marching and compositing (``auto``, ``torch``, ``cpp``, ``cuda``)."""

    @classmethod
    def from_state_dict(cls, config: NGPHeadConfig, state: dict[str, Tensor]) -> "NGPHead":
        model = cls(config)
        model.load_state_dict(state)
        return model

    # -- the AvatarModel interface ------------------------------------------------------------

    def head_center(self) -> Tensor:
        return (self.aabb[:3] + self.aabb[3:]) / 2

    def summary(self) -> dict[str, Any]:
        return {
            "parameters": {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in ("face", "mouth")},
            "occupied_cells": round(float(self.occupancy().float().mean()), 4),
        }

    def canonical_gaussians(self) -> None:
        return None

    def layer_points(self, cond: FrameCondition) -> dict[str, Tensor]:
        """Centres of occupied grid cells where each field is dense under ``cond`` (at most 20k)."""
        centres = self.cell_centres()[self.occupancy().reshape(-1)]
        if len(centres) > 20000:
            centres = centres[torch.linspace(0, len(centres) - 1, 20000, device=centres.device).long()]
        out = {}
        with torch.no_grad():
            for name in ("face", "mouth"):
                sigma = self.branch_density(name, centres, cond)
                out[name] = centres[sigma * self.config.step_size * self.density_scale > 0.05]
        return out

    def render(self, cond: Optional[FrameCondition], viewmat: Tensor, K: Tensor, width: int, height: int,
               background: Optional[Tensor] = None, layers: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """One frame: ``rgb`` [H, W, 3] over ``background`` (black when None), ``head_alpha`` [H, W, 1],
        ``head_rgb`` (premultiplied) and ``depth`` [H, W, 1]. Only the pixels the head's box
        projects to are marched."""
        device = viewmat.device
        head = torch.zeros(height * width, 3, device=device)
        alpha = torch.zeros(height * width, device=device)
        depth = torch.zeros(height * width, device=device)
        x0, y0, x1, y1 = self.box_pixels(viewmat, K, width, height)
        if x1 > x0 and y1 > y0:
            ys, xs = torch.meshgrid(torch.arange(y0, y1, device=device), torch.arange(x0, x1, device=device),
                                    indexing="ij")
            xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
            flat = xy[:, 1] * width + xy[:, 0]
            for start in range(0, len(xy), self.chunk):
                part = self.render_pixels(cond, viewmat, K, xy[start:start + self.chunk], layers)
                idx = flat[start:start + self.chunk]
                head[idx], alpha[idx], depth[idx] = part["rgb"], part["alpha"], part["depth"]
        head, alpha = head.reshape(height, width, 3), alpha.reshape(height, width, 1)
        rgb = head if background is None else head + (1 - alpha) * background
        return {"rgb": rgb, "head_rgb": head, "head_alpha": alpha, "depth": depth.reshape(height, width, 1)}

    def render_many(self, cond: FrameCondition, viewmats: Tensor, K: Tensor, width: int, height: int,
                    backgrounds: Tensor) -> Tensor:
        images = []
        for b in range(viewmats.shape[0]):
            one = FrameCondition(cond.audio[b], cond.motion[b])
            images.append(self.render(one, viewmats[b], K, width, height, backgrounds[b])["rgb"])
        return torch.stack(images)

    # -- fields, rays and the occupancy grid ---------------------------------------------------

    def _cond(self, cond: Optional[FrameCondition], like: Tensor) -> tuple[Tensor, Tensor]:
        """Audio code and motion of a condition; zeros for the canonical head (``cond=None``)."""
        if cond is None:
            return (like.new_zeros(self.config.audio.code_dim), like.new_zeros(len(self.config.motion_features)))
        return cond.audio.to(like), cond.motion.to(like)

    def _in_mouth_box(self, x: Tensor) -> Tensor:
        return ((x >= self.mouth_aabb[:3]) & (x <= self.mouth_aabb[3:])).all(dim=-1)

    def fields(self, x: Tensor, cond: Optional[FrameCondition], dirs: Optional[Tensor] = None,
               layers: tuple[str, ...] = ("mouth", "face"), density_only: bool = False
               ) -> tuple[Tensor, Optional[Tensor]]:
        """Density [S] (per world unit) and colour [S, 3] (None with ``density_only``) of both
        fields mixed by density. The mouth field is evaluated only inside its box (elsewhere it
        is empty)."""
        audio, motion = self._cond(cond, x)
        sigma = x.new_zeros(x.shape[0])
        weighted = x.new_zeros(x.shape[0], 3)
        if "face" in layers:
            raw, rgb = self.face(x, audio, motion, dirs, density_only)
            sigma = trunc_exp(raw + self.config.density_bias) * self.density_scale
            if rgb is not None:
                weighted = sigma[:, None] * rgb
        if "mouth" in layers:
            inside = torch.nonzero(self._in_mouth_box(x)).squeeze(1)
            if len(inside):
                raw_m, rgb_m = self.mouth(x[inside], audio, None, None if dirs is None else dirs[inside], density_only)
                sigma_m = trunc_exp(raw_m + self.config.density_bias) * self.density_scale
                sigma = sigma.index_add(0, inside, sigma_m)
                if rgb_m is not None:
                    weighted = weighted.index_add(0, inside, sigma_m[:, None] * rgb_m)
        if density_only:
            return sigma, None
        return sigma, weighted / sigma.clamp_min(1e-8)[:, None]

    def branch_density(self, name: str, x: Tensor, cond: Optional[FrameCondition]) -> Tensor:
        """Density [S] of one field alone (``face`` or ``mouth``), per world unit."""
        return self.fields(x, cond, layers=(name,), density_only=True)[0]

    def render_pixels(self, cond: Optional[FrameCondition], viewmat: Tensor, K: Tensor, xy: Tensor,
                      layers: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """March the rays of pixels ``xy`` [R, 2]: premultiplied ``rgb`` [R, 3], ``alpha`` [R],
        ``depth`` [R] (expected distance along the ray, not normalised) and ``samples`` (count).

        With gradients (training), every sample is marched at once and the ones behind each
        ray's termination are dropped before the fields run (:meth:`_visible_samples`); the
        samples (``ray_samples``) and their densities (``sigma`` [S]) come back for losses on the
        weights. Without (rendering), rays are marched a few samples at a time and dropped as they
        become opaque (:meth:`_march_in_rounds`), which differs from the one-pass result by less
        than ``stop_transmittance``.
        """
        origins, dirs = camera_rays(viewmat, K, xy)
        near, far = ray_aabb(origins, dirs, self.aabb)
        layers = self.layers if layers is None else layers
        if not torch.is_grad_enabled():
            return self._march_in_rounds(cond, origins, dirs, near, far, layers)
        with torch.no_grad():
            samples = march_rays(origins, dirs, near, far, self.occupancy(), self.aabb, self.config.step_size,
                                 self.config.max_samples, implementation=self.implementation)
            n = len(xy)
            if samples.ts.numel():
                samples = self._visible_samples(samples, cond, n, layers)
        if samples.ts.numel() == 0:
            zeros = origins.new_zeros(n)
            return {"rgb": origins.new_zeros(n, 3), "alpha": zeros, "depth": zeros, "samples": 0}
        view = dirs[samples.ray_ids] if self.config.view_dependent else None
        sigma, rgb = self.fields(samples.positions, cond, view, layers)
        color, opacity, depth = composite_rays(sigma, rgb, samples.deltas, samples.ts, samples.offsets,
                                               self.config.stop_transmittance, implementation=self.implementation)
        return {"rgb": color, "alpha": opacity, "depth": depth, "samples": int(samples.ts.numel()),
                "sigma": sigma, "ray_samples": samples}

    @torch.no_grad()
    def _march_in_rounds(self, cond: Optional[FrameCondition], origins: Tensor, dirs: Tensor, near: Tensor,
                         far: Tensor, layers: tuple[str, ...]) -> dict[str, Any]:
        """Render rays ``round_samples`` samples at a time, keeping only the rays still
        transparent (instant-NGP's inference loop): a ray that meets the face stops a few samples
        later instead of being marched through the whole head. Each round continues a ray on the
        same lattice of ``t`` (``near`` moves to half a step after its last sample)."""
        n = origins.shape[0]
        color, depth = origins.new_zeros(n, 3), origins.new_zeros(n)
        transmittance = origins.new_ones(n)
        start = near.clone()
        alive = torch.nonzero(far > near).squeeze(1)
        occupancy, step, per_round = self.occupancy(), self.config.step_size, self.config.round_samples
        total = 0
        for _ in range(-(-self.config.max_samples // per_round)):
            if alive.numel() == 0:
                break
            samples = march_rays(origins[alive], dirs[alive], start[alive], far[alive], occupancy, self.aabb, step,
                                 per_round, implementation=self.implementation)
            if samples.ts.numel() == 0:
                break
            view = dirs[alive][samples.ray_ids] if self.config.view_dependent else None
            sigma, rgb = self.fields(samples.positions, cond, view, layers)
            c, a, d = composite_rays(sigma, rgb, samples.deltas, samples.ts, samples.offsets, 0.0,
                                     implementation=self.implementation)
            t_alive = transmittance[alive]
            color[alive] += t_alive[:, None] * c
            depth[alive] += t_alive * d
            transmittance[alive] = t_alive * (1 - a)
            total += samples.ts.numel()
            counts = samples.offsets.diff()
            last = samples.ts[(samples.offsets[1:] - 1).clamp_min(0)]
            start[alive] = torch.where(counts > 0, last + step / 2, start[alive])
            alive = alive[(counts == per_round) & (transmittance[alive] >= self.config.stop_transmittance)]
        return {"rgb": color, "alpha": 1 - transmittance, "depth": depth, "samples": total}

    @torch.no_grad()
    def _visible_samples(self, samples: RaySamples, cond: Optional[FrameCondition], n_rays: int,
                         layers: tuple[str, ...]) -> RaySamples:
        """The samples compositing would not skip: those before each ray's early termination.

        Why: the marcher cannot know where a ray will become opaque, so it hands over every sample
        up to the box's far side (through the inside of the head). A density-only pass without
        gradients costs a fifth of a training pass per sample, and after it the training pass
        (forward and backward of both MLPs and the encodings) runs on the 30-50 % of samples
        that count. The result is the same: compositing stops at the same sample.
        """
        sigma = self.fields(samples.positions, cond, None, layers, density_only=True)[0]
        optical = (sigma * samples.deltas).double()
        total = torch.cumsum(optical, dim=0)
        before = torch.cat([total.new_zeros(1), total])[samples.offsets[:-1]]  # depth of earlier rays
        transmittance = torch.exp(-(total - optical - before[samples.ray_ids]))
        keep = transmittance >= self.config.stop_transmittance
        counts = torch.bincount(samples.ray_ids[keep], minlength=n_rays)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])
        return RaySamples(ts=samples.ts[keep], deltas=samples.deltas[keep], ray_ids=samples.ray_ids[keep],
                          offsets=offsets, positions=samples.positions[keep])

    def occupancy(self) -> Tensor:
        """[G, G, G] bool: cells the marcher samples. A cell is occupied while never measured, when
        its density is above ``min(mean, threshold)`` (instant-NGP), and always inside the mouth
        box (the mouth opens under conditions the grid may not have seen yet)."""
        grid = self.density_grid
        key = (grid.data_ptr(), grid._version)  # any in-place change (an update, load_state_dict) bumps it
        if self._occupied is not None and self._occupied[0] == key:
            return self._occupied[1]
        measured = grid >= 0
        if not bool(measured.any()):
            occupied = torch.ones_like(grid, dtype=torch.bool)
        else:
            threshold = min(float(grid[measured].mean()), self.occupancy_threshold())
            occupied = (grid > threshold) | ~measured | self.mouth_cells
        self._occupied = (key, occupied)
        return occupied

    def occupancy_threshold(self) -> float:
        """Density (per world unit) below which a cell's step is > 99 % transparent."""
        return 0.01 / self.config.step_size

    def cell_centres(self) -> Tensor:
        """[G^3, 3] world positions of the grid's cell centres, indexed [ix, iy, iz] flattened."""
        g = self.config.grid_resolution
        lo, hi = self.aabb[:3], self.aabb[3:]
        axis = (torch.arange(g, device=lo.device, dtype=lo.dtype) + 0.5) / g
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        return lo + grid * (hi - lo)

    @torch.no_grad()
    def update_density_grid(self, conds: list[FrameCondition], cells: Tensor, decay: float = 0.95,
                            generator: Optional[torch.Generator] = None) -> None:
        """Refresh cells (flat indices [N]) with the largest density over ``conds`` at a jittered
        point of each cell: ``grid = max(grid * decay, new)`` (instant-NGP)."""
        g = self.config.grid_resolution
        lo, hi = self.aabb[:3], self.aabb[3:]
        ix = torch.stack([cells // (g * g), (cells // g) % g, cells % g], dim=-1).to(lo.dtype)
        jitter = torch.rand(len(cells), 3, generator=generator).to(lo)
        x = lo + (ix + jitter) / g * (hi - lo)
        new = torch.zeros(len(cells), device=lo.device)
        for cond in conds:
            sigma, _ = self.fields(x, cond, density_only=True)
            new = torch.maximum(new, sigma)
        flat = self.density_grid.view(-1)
        old = flat[cells]
        flat[cells] = torch.where(old < 0, new, torch.maximum(old * decay, new))

    def box_pixels(self, viewmat: Tensor, K: Tensor, width: int, height: int) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1: the pixel rectangle the head's box projects to (clipped to the image)."""
        lo, hi = self.aabb[:3], self.aabb[3:]
        corners = torch.stack([torch.where(torch.tensor([(i >> k) & 1 for k in range(3)], device=lo.device).bool(),
                                           hi, lo) for i in range(8)])  # [8, 3]
        cam = corners @ viewmat[:3, :3].T + viewmat[:3, 3]
        if bool((cam[:, 2] <= 1e-6).any()):  # the camera is inside or behind the box: march everything
            return 0, 0, width, height
        uv = (cam @ K.T)[:, :2] / cam[:, 2:3]
        x0, y0 = (int(math.floor(float(v))) for v in uv.min(dim=0).values)
        x1, y1 = (int(math.ceil(float(v))) + 1 for v in uv.max(dim=0).values)
        return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def _box_bounds(encoding: TriPlaneConfig) -> tuple[float, ...]:
    c, h = np.asarray(encoding.center), np.asarray(encoding.half_extent)
    return tuple(float(v) for v in np.concatenate([c - h, c + h]))
