"""Blendshape tracks on synthetic faces whose mouth, eyes and brows we move by hand."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.preprocess.blendshapes import BLENDSHAPE_NAMES, compute_blendshapes
from avatar.preprocess.face_model import FaceModelConfig, FaceModelFit, fit_face_model

COL = {name: i for i, name in enumerate(BLENDSHAPE_NAMES)}
FOCAL, DIST = 1200.0, 0.5

# hand-made deformations (metres per unit coefficient; +y is down the face)
DEFORM = {
    "jaw": {14: (0, 0.012, 0), 17: (0, 0.012, 0)},
    "blink_right": {159: (0, 0.012, 0)},
    "blink_left": {386: (0, 0.012, 0)},
    "brow_right": {i: (0, -0.006, 0) for i in (105, 66, 65, 52)},
    "brow_left": {i: (0, -0.006, 0) for i in (334, 296, 295, 282)},
    "stretch": {61: (-0.006, 0, 0), 291: (0.006, 0, 0)},
}
KEYS = list(DEFORM)


def _fit_from(mean: np.ndarray, expression: np.ndarray) -> tuple[FaceModelFit, np.ndarray]:
    """A face model fit with mean shape ``mean`` [478, 3], the deformations above as basis and
    coefficients ``expression`` [T, K], and its landmarks [T, 478, 3] seen frontally by a camera
    at DIST (the projection of its shapes, mediapipe-like z)."""
    basis = np.zeros((len(KEYS), 478, 3))
    for k, key in enumerate(KEYS):
        for idx, vec in DEFORM[key].items():
            basis[k, idx] = vec
    t = len(expression)
    c2w = np.tile(np.eye(4), (t, 1, 1))
    c2w[:, 2, 3] = -DIST
    intr = np.array([[FOCAL, 0, 256], [0, FOCAL, 256], [0, 0, 1]])
    fit = FaceModelFit(intrinsics=intr.astype(np.float32), cam_to_world=c2w.astype(np.float32),
                       face_mean=mean.astype(np.float32), face_basis=basis.astype(np.float32),
                       expression=expression.astype(np.float32), valid=np.ones(t, bool),
                       reprojection_error_px=0.0, per_frame_error_px=np.zeros(t, np.float32),
                       image_size=(512, 512))
    cam = fit.shapes().astype(np.float64) + [0, 0, DIST]
    uv = FOCAL * cam[..., :2] / cam[..., 2:] + 256
    z = FOCAL / DIST * (cam[..., 2] - cam[..., 2].mean(1, keepdims=True))
    return fit, np.concatenate([uv, z[..., None]], -1).astype(np.float32)


def _ramp(t: int, key: str, lo: float = 0.0, hi: float = 1.0, base: int = 0) -> np.ndarray:
    """Coefficients [t, K]: ``key`` ramps from lo to hi over the last t - base frames."""
    e = np.zeros((t, len(KEYS)))
    e[base:, KEYS.index(key)] = np.linspace(lo, hi, t - base)
    return e


def test_names():
    required = {"jaw_open", "mouth_stretch", "mouth_pucker", "lips_apart", "eye_blink_left",
                "eye_blink_right", "brow_raise_left", "brow_raise_right"}
    assert required <= set(BLENDSHAPE_NAMES)
    assert len(set(BLENDSHAPE_NAMES)) == len(BLENDSHAPE_NAMES)


def test_shape_dtype_range(neutral_face):
    rng = np.random.default_rng(1)
    fit, lm = _fit_from(neutral_face, rng.uniform(0, 1, size=(60, len(KEYS))))
    b = compute_blendshapes(fit, lm, np.ones(60, bool))
    assert b.shape == (60, len(BLENDSHAPE_NAMES)) and b.dtype == np.float32
    assert np.isfinite(b).all() and b.min() >= 0 and b.max() <= 1


def test_jaw_open_tracks_inner_lip_opening(neutral_face):
    # 40 frames with the mouth closed, then the jaw opens steadily
    fit, lm = _fit_from(neutral_face, _ramp(100, "jaw", base=40))
    b = compute_blendshapes(fit, lm, np.ones(100, bool))
    jaw = b[:, COL["jaw_open"]]
    assert np.all(np.diff(jaw) >= -1e-6)
    assert jaw[:40].max() < 0.02 and jaw[-1] > 0.97
    apart = b[:, COL["lips_apart"]]
    assert np.all(np.diff(apart) >= -1e-6) and apart[:40].max() < 0.02 and apart[-1] == 1.0
    for name in ("eye_blink_left", "eye_blink_right", "brow_raise_left", "brow_raise_right"):
        assert b[:, COL[name]].max() < 0.05, name


@pytest.mark.parametrize("side", ["left", "right"])
def test_blink_sides_not_swapped(neutral_face, side):
    fit, lm = _fit_from(neutral_face, np.zeros((60, len(KEYS))))
    # the subject's right eye (159) is on the image left of a frontal face
    assert (lm[0, 159, 0] < 256) and (lm[0, 386, 0] > 256)
    e = np.zeros((60, len(KEYS)))
    e[40:50, KEYS.index(f"blink_{side}")] = np.linspace(0.2, 1.0, 10)
    fit, lm = _fit_from(neutral_face, e)
    b = compute_blendshapes(fit, lm, np.ones(60, bool))
    other = "left" if side == "right" else "right"
    blink = b[:, COL[f"eye_blink_{side}"]]
    assert blink[:40].max() < 0.05
    assert np.all(np.diff(blink[40:50]) >= -1e-6) and blink[49] > 0.9
    assert b[:, COL[f"eye_blink_{other}"]].max() < 0.05


@pytest.mark.parametrize("side", ["left", "right"])
def test_brow_raise_sides_not_swapped(neutral_face, side):
    e = np.zeros((80, len(KEYS)))
    e[50:, KEYS.index(f"brow_{side}")] = np.linspace(0.0, 1.0, 30)
    fit, lm = _fit_from(neutral_face, e)
    b = compute_blendshapes(fit, lm, np.ones(80, bool))
    other = "left" if side == "right" else "right"
    brow = b[:, COL[f"brow_raise_{side}"]]
    assert np.all(np.diff(brow[50:]) >= -1e-6) and brow[-1] > 0.9 and brow[:50].max() < 0.02
    assert b[:, COL[f"brow_raise_{other}"]].max() < 0.02


def test_stretch_and_pucker_are_one_sided(neutral_face):
    fit, lm = _fit_from(neutral_face, _ramp(101, "stretch", lo=-1.0, hi=1.0))
    b = compute_blendshapes(fit, lm, np.ones(101, bool))
    stretch, pucker = b[:, COL["mouth_stretch"]], b[:, COL["mouth_pucker"]]
    assert np.all(np.diff(stretch) >= -1e-6) and np.all(np.diff(pucker) <= 1e-6)
    assert stretch[:50].max() < 0.02 and stretch[-1] > 0.97
    assert pucker[51:].max() < 0.02 and pucker[0] > 0.97


def test_invalid_frames_are_interpolated(neutral_face):
    e = np.zeros((60, len(KEYS)))
    e[30:40, KEYS.index("blink_right")] = 1.0
    fit, lm = _fit_from(neutral_face, e)
    valid = np.ones(60, bool)
    valid[33:37] = False
    lm[~valid] = np.nan
    b = compute_blendshapes(fit, lm, valid)
    assert np.isfinite(b).all()
    assert b[33:37, COL["eye_blink_right"]].min() > 0.9  # inside the blink


def test_tiny_expressions_are_not_amplified(neutral_face):
    # a subject who barely moves the brows: a 0.2 mm wobble must not read as a full raise
    e = np.zeros((50, len(KEYS)))
    e[:, KEYS.index("brow_left")] = 0.03 * np.sin(np.arange(50))
    fit, lm = _fit_from(neutral_face, e)
    b = compute_blendshapes(fit, lm, np.ones(50, bool))
    assert b[:, COL["brow_raise_left"]].max() < 0.2


def test_on_a_fitted_model(make_clip):
    c = make_clip(n_frames=40, seed=11)
    fit = fit_face_model(c["landmarks"], c["valid"], (512, 512),
                         FaceModelConfig(n_expression=8, iterations=3))
    b = compute_blendshapes(fit, c["landmarks"], c["valid"])
    assert b.shape == (40, len(BLENDSHAPE_NAMES)) and np.isfinite(b).all()
    assert b.min() >= 0 and b.max() <= 1


@pytest.mark.parametrize("case", ["landmarks", "valid", "none_valid"])
def test_bad_input_raises(neutral_face, case):
    fit, lm = _fit_from(neutral_face, np.zeros((10, len(KEYS))))
    valid = np.ones(10, bool)
    if case == "landmarks":
        lm = lm[:9]
    elif case == "valid":
        valid = valid[:5]
    else:
        valid[:] = False
    with pytest.raises(ValueError):
        compute_blendshapes(fit, lm, valid)
