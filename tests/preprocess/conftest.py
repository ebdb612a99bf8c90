"""Synthetic landmark tracks with known face shape, expressions, head poses and focal length."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.preprocess.face_model import RIGID_LANDMARKS

N_LANDMARKS = 478

# Mediapipe indices placed at plausible positions (metres; +x image right, +y down, +z away
# from the camera): the face model uses them to fix its world frame, the blendshapes to measure.
NAMED_POINTS = {
    33: (-0.045, -0.02), 133: (-0.015, -0.02), 263: (0.045, -0.02), 362: (0.015, -0.02),
    159: (-0.03, -0.027), 145: (-0.03, -0.013), 386: (0.03, -0.027), 374: (0.03, -0.013),
    10: (0.0, -0.09), 152: (0.0, 0.095), 13: (0.0, 0.045), 14: (0.0, 0.05),
    61: (-0.025, 0.048), 291: (0.025, 0.048), 0: (0.0, 0.035), 17: (0.0, 0.065),
    105: (-0.03, -0.045), 334: (0.03, -0.045),
}


def rotation_matrices(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] from axis-angle vectors [..., 3]."""
    theta = np.linalg.norm(rotvec, axis=-1)[..., None, None]
    axis = rotvec / np.maximum(np.linalg.norm(rotvec, axis=-1, keepdims=True), 1e-12)
    k = np.zeros(rotvec.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2] = -axis[..., 2], axis[..., 1]
    k[..., 1, 0], k[..., 1, 2] = axis[..., 2], -axis[..., 0]
    k[..., 2, 0], k[..., 2, 1] = -axis[..., 1], axis[..., 0]
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def face_points(rng: np.random.Generator) -> np.ndarray:
    """A face-like point cloud [478, 3]: the front of an ellipsoid, named points placed."""
    a, b, c = 0.075, 0.1, 0.06
    xy = rng.uniform(-1, 1, size=(N_LANDMARKS * 3, 2))
    xy = xy[(xy ** 2).sum(1) < 0.95][:N_LANDMARKS]
    for i, (x, y) in NAMED_POINTS.items():
        xy[i] = (x / a, y / b)
    z = -c * np.sqrt(1 - np.minimum((xy ** 2).sum(1), 0.95))
    return np.stack([xy[:, 0] * a, xy[:, 1] * b, z], 1)


def smooth_signal(rng: np.random.Generator, n_frames: int, n: int, max_hz: float,
                  fps: float = 25.0) -> np.ndarray:
    """Sums of random sinusoids [n_frames, n], amplitude about 1."""
    t = np.arange(n_frames) / fps
    out = np.zeros((n_frames, n))
    for j in range(n):
        for _ in range(4):
            out[:, j] += np.sin(2 * np.pi * rng.uniform(0.1, max_hz) * t + rng.uniform(0, 7)) / 2
    return out


def make_clip(n_frames: int = 120, n_expr: int = 6, focal: float = 1200.0, size: int = 512,
              noise_px: float = 0.5, seed: int = 0) -> dict:
    """Landmark tracks of a synthetic talking head.

    Expressions are smooth bumps that leave the rigid landmark set still (as real expressions
    leave the nose bridge and forehead); head poses are smooth (+-20 deg yaw) at about 0.55 m.
    Returns a dict with ``landmarks`` [T, 478, 3] (pixels, mediapipe-like z), ``valid`` [T],
    the truth ``shapes`` [T, 478, 3], ``expr`` [T, E], ``rot`` [T, 3, 3] and ``trans`` [T, 3]
    (world to camera), ``focal`` and ``size``.
    """
    rng = np.random.default_rng(seed)
    mean = face_points(rng)
    basis = []
    for _ in range(n_expr):
        centre = mean[rng.integers(N_LANDMARKS)]
        bump = np.exp(-((mean - centre) ** 2).sum(1) / (2 * 0.03 ** 2))
        basis.append(bump[:, None] * rng.normal(size=3)[None] * 0.004)
    basis = np.stack(basis)
    basis[:, list(RIGID_LANDMARKS)] = 0
    expr = smooth_signal(rng, n_frames, n_expr, 3.0) * 1.5
    shapes = mean + np.einsum("tk,kvc->tvc", expr, basis)
    rot = rotation_matrices(smooth_signal(rng, n_frames, 3, 1.0) * np.radians([10, 20, 5]))
    trans = np.stack([smooth_signal(rng, n_frames, 1, 1.0)[:, 0] * 0.02,
                      smooth_signal(rng, n_frames, 1, 1.0)[:, 0] * 0.02,
                      0.55 + smooth_signal(rng, n_frames, 1, 1.0)[:, 0] * 0.05], 1)
    cam = shapes @ rot.transpose(0, 2, 1) + trans[:, None]
    uv = focal * cam[..., :2] / cam[..., 2:] + size / 2
    depth = cam[..., 2].mean(1, keepdims=True)
    z = focal / depth * (cam[..., 2] - depth)
    landmarks = np.concatenate([uv, z[..., None]], -1)
    landmarks[..., :2] += rng.normal(size=uv.shape) * noise_px
    landmarks[..., 2] += rng.normal(size=z.shape) * 2 * noise_px
    return dict(landmarks=landmarks.astype(np.float32), valid=np.ones(n_frames, bool),
                shapes=shapes, expr=expr, rot=rot, trans=trans, focal=focal, size=size)


@pytest.fixture(scope="session")
def synthetic_clip() -> dict:
    """The default clip: 120 frames, 6 expressions, focal 1200 px at 512 x 512, 0.5 px noise."""
    return make_clip()


@pytest.fixture(name="make_clip")
def make_clip_fixture():
    """:func:`make_clip` itself, for tests that need other clips."""
    return make_clip


@pytest.fixture
def neutral_face() -> np.ndarray:
    """A face-like point cloud [478, 3] in the face model's world frame (metres)."""
    return face_points(np.random.default_rng(0))
