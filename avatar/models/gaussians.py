"""Canonical 3D Gaussians of a head: parameters, and their initialisation from a subject.

The canonical set lives in the head's world frame (the face model's frame: +x toward the
subject's left, +y down, +z into the face; metres-ish). It is *structure persistent*: the
deformation networks move, rotate and scale it per frame, they never re-colour it.

Initialisation uses what preprocessing already knows, so training starts from a head-shaped
cloud instead of noise:

* face: points sampled over the face-mesh triangles of the subject's mean shape;
* head: points on an ellipsoid shell around the face, kept where they project inside the head
  silhouette (face, hair, ears) in several training frames;
* mouth: a slab of points behind the lips, for the teeth, tongue and cavity.

Colours start from the pixels the points project to in reference frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from avatar import topology


@dataclass
class GaussianInitConfig:
    """How many Gaussians of each kind to start with, and their initial look."""

    n_face: int = 3000
    """Points sampled over the face-mesh triangles."""
    n_head: int = 3000
    """Candidate points on the head shell before silhouette carving (about half survive)."""
    n_mouth: int = 600
    """Points of the mouth interior."""
    init_opacity: float = 0.6
    """Opacity every Gaussian starts with."""
    scale_multiplier: float = 0.7
    """Initial scale as a multiple of the mean distance to the 3 nearest neighbours."""
    reference_frames: int = 12
    """Training frames (evenly spread) used for silhouette carving and colour initialisation."""
    keep_share: float = 0.6
    """A head point is kept when it lands inside the head mask in this share of the frames that see it."""


def face_mesh_triangles() -> np.ndarray:
    """Triangles [F, 3] of mediapipe's face mesh, recovered from its edge list (3-cliques)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    neighbours: dict[int, set[int]] = {}
    for a, b in FACEMESH_TESSELATION:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    tris = set()
    for a, nb in neighbours.items():
        for b in nb:
            if b <= a:
                continue
            for c in nb & neighbours[b]:
                if c > b:
                    tris.add((a, b, c))
    return np.array(sorted(tris), dtype=np.int64)


def sample_triangles(vertices: np.ndarray, triangles: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Area-weighted uniform samples [n, 3] over a triangle mesh ([V, 3] vertices, [F, 3] faces)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    face = rng.choice(len(triangles), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    return a[face] + u[:, None] * (b[face] - a[face]) + v[:, None] * (c[face] - a[face])


def head_shell(face_mean: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Points [n, 3] on (and just inside) an ellipsoid enclosing the head behind the face.

    The ellipsoid is sized from the face: wider than the cheeks (ears, hair), taller than the
    face oval (skull, hair on top) and deep enough to reach the back of the head.
    """
    oval = face_mean[list(topology.FACE_OVAL)]
    lo, hi = oval.min(axis=0), oval.max(axis=0)
    width, height = hi[0] - lo[0], hi[1] - lo[1]
    centre = np.array([(lo[0] + hi[0]) / 2, lo[1] + 0.42 * height, face_mean[:, 2].mean() + 0.45 * width])
    axes = np.array([0.68 * width, 0.72 * height, 0.62 * width])
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    radius = rng.uniform(0.9, 1.02, size=(n, 1))
    return centre + d * axes * radius


def mouth_slab(face_mean: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Points [n, 3] filling the space just behind the lips (teeth, tongue, dark cavity)."""
    inner = face_mean[list(topology.LIPS_INNER)]
    outer = face_mean[list(topology.LIPS_OUTER)]
    x0, x1 = inner[:, 0].min(), inner[:, 0].max()
    width = x1 - x0
    y_mid = inner[:, 1].mean()
    height = max(outer[:, 1].max() - outer[:, 1].min(), 0.3 * width)
    z_lip = inner[:, 2].mean()
    x = rng.uniform(x0 + 0.05 * width, x1 - 0.05 * width, n)
    y = rng.uniform(y_mid - 0.6 * height, y_mid + 0.6 * height, n)
    z = z_lip + rng.uniform(0.05, 0.45, n) * width
    return np.stack([x, y, z], axis=1)


def project(points: np.ndarray, world_to_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions [C, N, 2] and depths [C, N] of world points [N, 3] in C cameras."""
    cam = np.einsum("cij,nj->cni", world_to_cam[:, :3, :3], points) + world_to_cam[:, None, :3, 3]
    z = cam[..., 2]
    uv = cam[..., :2] / np.maximum(z[..., None], 1e-6) * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    return uv, z


def sample_colours(points: np.ndarray, world_to_cam: np.ndarray, K: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Mean colour in [0, 1] of each point [N, 3] over the frames [C, H, W, 3] it projects into."""
    uv, z = project(points, world_to_cam, K)
    c, h, w = frames.shape[:3]
    ij = np.floor(uv).astype(np.int64)
    inside = (z > 0) & (ij[..., 0] >= 0) & (ij[..., 0] < w) & (ij[..., 1] >= 0) & (ij[..., 1] < h)
    total = np.zeros((len(points), 3))
    count = np.zeros(len(points))
    for k in range(c):
        sel = inside[k]
        total[sel] += frames[k, ij[k, sel, 1], ij[k, sel, 0]] / 255.0
        count[sel] += 1
    return np.where(count[:, None] > 0, total / np.maximum(count[:, None], 1), 0.5)


def knn_scale(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean distance [N] of each point to its k nearest neighbours (isotropic initial scale)."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(points).query(points, k=k + 1)
    return np.maximum(dist[:, 1:].mean(axis=1), 1e-5)


def inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x / (1 - x))


class GaussianSet(nn.Module):
    """Learnable Gaussians in canonical space, stored unconstrained for the optimiser.

    Parameters (all [N, ...]): ``means`` [N, 3], ``quats`` [N, 4] (w, x, y, z, unnormalised),
    ``log_scales`` [N, 3], ``opacity_logits`` [N], ``sh`` [N, K, 3] with K = (degree + 1)^2
    (``sh[:, 0]`` is the DC colour term).
    """

    PARAM_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh")

    def __init__(self, means: Tensor, colors: Tensor, scales: Tensor, opacity: float, sh_degree: int = 0):
        super().__init__()
        n = means.shape[0]
        if colors.shape != (n, 3) or scales.shape != (n,):
            raise ValueError(f"expected colors [N, 3] and scales [N] for N={n}, got "
                             f"{tuple(colors.shape)} and {tuple(scales.shape)}")
        sh = torch.zeros(n, (sh_degree + 1) ** 2, 3)
        sh[:, 0] = (colors.clamp(0.02, 0.98) - 0.5) / 0.28209479177387814
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        self.sh_degree = sh_degree
        self.means = nn.Parameter(means.float().clone())
        self.quats = nn.Parameter(quats)
        self.log_scales = nn.Parameter(torch.log(scales.float())[:, None].repeat(1, 3))
        self.opacity_logits = nn.Parameter(inverse_sigmoid(torch.full((n,), float(opacity))))
        self.sh = nn.Parameter(sh)

    @classmethod
    def empty(cls, n: int, sh_degree: int) -> "GaussianSet":
        """A set of ``n`` default Gaussians whose values a checkpoint then overwrites."""
        return cls(torch.zeros(n, 3), torch.full((n, 3), 0.5), torch.full((n,), 0.01), 0.5, sh_degree)

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    def replace_parameters(self, tensors: dict[str, Tensor]) -> None:
        """Swap in new tensors (after densification or when loading a checkpoint of another size)."""
        for name in self.PARAM_NAMES:
            setattr(self, name, nn.Parameter(tensors[name].detach().clone()))


@dataclass
class HeadInit:
    """Initial canonical Gaussians of the face (face + head shell) and of the mouth interior."""

    face_points: np.ndarray
    face_colors: np.ndarray
    mouth_points: np.ndarray
    mouth_colors: np.ndarray
    face_region: Optional[np.ndarray] = None
    """The face oval's landmarks and the nose tip of the mean shape [37, 3]: where the face
    deformation may change colours (:func:`avatar.models.talking_head.face_region_gate`)."""


def init_head(
    face_mean: np.ndarray,
    world_to_cam: np.ndarray,
    K: np.ndarray,
    frames: np.ndarray,
    head_masks: np.ndarray,
    mouth_frame: Optional[int],
    config: GaussianInitConfig,
    seed: int = 0,
) -> HeadInit:
    """Place the initial Gaussians from the face model and a few reference frames.

    Args:
        face_mean: the subject's mean landmark shape in world coordinates. [478, 3]
        world_to_cam: cameras of the reference frames. [C, 4, 4]
        K: intrinsics at the frames' resolution. [3, 3]
        frames: reference frames, RGB uint8. [C, H, W, 3]
        head_masks: bool, face + hair + mouth labels of those frames. [C, H, W]
        mouth_frame: index into the reference frames where the mouth is most open (colours
            the mouth interior), or None to use them all.
    """
    rng = np.random.default_rng(seed)
    face_pts = sample_triangles(face_mean, face_mesh_triangles(), config.n_face, rng)
    shell = head_shell(face_mean, config.n_head, rng)
    uv, z = project(shell, world_to_cam, K)
    c, h, w = head_masks.shape
    ij = np.floor(uv).astype(np.int64)
    seen = (z > 0) & (ij[..., 0] >= 0) & (ij[..., 0] < w) & (ij[..., 1] >= 0) & (ij[..., 1] < h)
    inside = np.zeros_like(seen)
    for k in range(c):
        sel = seen[k]
        inside[k, sel] = head_masks[k, ij[k, sel, 1], ij[k, sel, 0]]
    share = inside.sum(0) / np.maximum(seen.sum(0), 1)
    shell = shell[(share >= config.keep_share) & (seen.sum(0) > 0)]
    face_all = np.concatenate([face_pts, shell])
    face_cols = sample_colours(face_all, world_to_cam, K, frames)
    mouth_pts = mouth_slab(face_mean, config.n_mouth, rng)
    if mouth_frame is None:
        mouth_cols = sample_colours(mouth_pts, world_to_cam, K, frames)
    else:
        sel = slice(mouth_frame, mouth_frame + 1)
        mouth_cols = sample_colours(mouth_pts, world_to_cam[sel], K, frames[sel])
    region = np.asarray(face_mean, np.float64)[list(topology.FACE_OVAL) + [topology.NOSE_TIP]]
    return HeadInit(face_all, face_cols, mouth_pts, mouth_cols, region)


def gaussian_set_from_points(points: np.ndarray, colors: np.ndarray, config: GaussianInitConfig,
                             sh_degree: int) -> GaussianSet:
    """A :class:`GaussianSet` with scales from nearest-neighbour spacing."""
    scales = knn_scale(points) * config.scale_multiplier
    return GaussianSet(torch.from_numpy(points).float(), torch.from_numpy(colors).float(),
                       torch.from_numpy(scales).float(), config.init_opacity, sh_degree)
