"""Named blendshape tracks (jaw open, blinks, brows, ...) measured on the fitted face model.

Each track is a geometric measure on the pose-free landmark shapes of the per-subject face model
(``face_mean + expression @ face_basis``, so head pose does not leak in), scaled to 0..1 for this
subject from robust percentiles of the video and clipped. Eyelids are measured on the tracked
landmarks themselves, as the gap between the lids over the eye width: blinks are brief, and the
raw landmarks follow them more faithfully than a low-rank expression basis must.

"Left" and "right" are the subject's own sides (mediapipe's "left eye" 263/362/386/374 is the
subject's left eye, on the image right of a frontal face).

Lengths are measured in units of the outer-eye-corner distance of the mean shape, which the face
model keeps fixed (it is part of the rigid landmark set), so the measures do not depend on the
world scale.
"""

from __future__ import annotations

import logging

import numpy as np

from avatar.preprocess.face_model import N_LANDMARKS, FaceModelFit

log = logging.getLogger(__name__)

BLENDSHAPE_NAMES: tuple[str, ...] = (
    "jaw_open",
    "lips_apart",
    "mouth_stretch",
    "mouth_pucker",
    "eye_blink_left",
    "eye_blink_right",
    "brow_raise_left",
    "brow_raise_right",
)
"""Order of the columns of :func:`compute_blendshapes`.

* ``jaw_open``: vertical gap of the inner lips at the centre (13 upper, 14 lower), from the
  subject's closed mouth (2nd percentile) to their widest opening (98th percentile).
* ``lips_apart``: the same gap on a fixed anatomical scale: 0 with the lips together, 1 once
  they are about 4.5 mm (0.05 eye distances) apart; a near-binary "mouth is open" track.
* ``mouth_stretch``: width between the mouth corners (61, 291) above its neutral (median)
  width, up to the 98th percentile.
* ``mouth_pucker``: the same width below neutral, down to the 2nd percentile (pursed lips).
* ``eye_blink_left`` / ``eye_blink_right``: 1 - (lid gap / eye width) / (its median), scaled so
  that lids at 30 % of their usual opening read 1. Subject's left: lids 386/374, corners
  362/263; right: lids 159/145, corners 33/133.
* ``brow_raise_left`` / ``brow_raise_right``: height of the brow (left 334, 296, 295, 282;
  right 105, 66, 65, 52) above the eye corners along the face's vertical axis, above its
  median, up to the 98th percentile.
"""

# mediapipe face-mesh indices
_LIP_UPPER_INNER, _LIP_LOWER_INNER = 13, 14
_MOUTH_CORNERS = (61, 291)
_EYES = {  # subject's side: (upper lid, lower lid, corner, corner)
    "left": (386, 374, 362, 263),
    "right": (159, 145, 33, 133),
}
_BROWS = {"left": (334, 296, 295, 282), "right": (105, 66, 65, 52)}
_EYE_OUTER = (33, 263)

_LIPS_APART_SCALE = 0.05
"""Inner-lip gap (eye distances) at which ``lips_apart`` reads 1."""
_BLINK_CLOSED_FRACTION = 0.3
"""Lid opening, as a fraction of the subject's median, at which a blink reads 1."""
_MIN_SPAN = {"jaw_open": 0.05, "mouth_stretch": 0.04, "mouth_pucker": 0.04, "brow_raise": 0.02}
"""Smallest range (eye distances) a track is scaled to, so that a subject who never opens the
mouth wide or raises the brows gets small values rather than amplified noise."""


def _scale_range(values: np.ndarray, lo: float, hi: float, min_span: float) -> np.ndarray:
    """(values - lo) / span clipped to 0..1, with span = max(hi - lo, min_span)."""
    span = max(hi - lo, min_span)
    return np.clip((values - lo) / span, 0.0, 1.0)


def _interp_invalid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill invalid entries of [T] by linear interpolation between valid ones."""
    if valid.all():
        return values
    t = np.arange(len(values))
    out = values.copy()
    out[~valid] = np.interp(t[~valid], t[valid], values[valid])
    return out


def compute_blendshapes(fit: FaceModelFit, landmarks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Blendshape tracks [T, B] in 0..1, columns in the order of :data:`BLENDSHAPE_NAMES`.

    Args:
        fit: the subject's face model fit (T frames).
        landmarks: [T, 478, 3] the tracked landmarks the model was fitted to (pixels, mediapipe z);
            only the eyelids are read from them.
        valid: [T] bool, frames where the face was tracked. Percentiles are taken over these;
            other frames get eyelid measures interpolated from their neighbours (mouth and brows
            come from the model's interpolated expressions).

    Returns:
        float32 array [T, len(BLENDSHAPE_NAMES)].

    Raises:
        ValueError: shapes that do not match the fit, or no valid frame.
    """
    landmarks = np.asarray(landmarks)
    valid = np.asarray(valid)
    n = fit.expression.shape[0]
    if landmarks.shape != (n, N_LANDMARKS, 3):
        raise ValueError(f"landmarks must be [T, {N_LANDMARKS}, 3] with T = {n} frames of the "
                         f"fit, got {landmarks.shape}")
    if valid.shape != (n,):
        raise ValueError(f"valid must be [T] = [{n}], got {valid.shape}")
    valid = valid.astype(bool)
    if not valid.any():
        raise ValueError("need at least one valid frame, got none")

    shapes = fit.shapes().astype(np.float64)  # [T, 478, 3], pose-free
    mean = fit.face_mean.astype(np.float64)
    unit = float(np.linalg.norm(mean[_EYE_OUTER[1]] - mean[_EYE_OUTER[0]]))
    if not unit > 0:
        raise ValueError(f"the fit's mean shape has coincident eye corners, got distance {unit}")
    out = {}

    # mouth
    gap = np.linalg.norm(shapes[:, _LIP_UPPER_INNER] - shapes[:, _LIP_LOWER_INNER], axis=-1) / unit
    g_lo, g_hi = np.percentile(gap[valid], [2, 98])
    out["jaw_open"] = _scale_range(gap, g_lo, g_hi, _MIN_SPAN["jaw_open"])
    out["lips_apart"] = np.clip((gap - g_lo) / _LIPS_APART_SCALE, 0.0, 1.0)
    width = np.linalg.norm(shapes[:, _MOUTH_CORNERS[0]] - shapes[:, _MOUTH_CORNERS[1]],
                           axis=-1) / unit
    w_lo, w_mid, w_hi = np.percentile(width[valid], [2, 50, 98])
    out["mouth_stretch"] = _scale_range(width, w_mid, w_hi, _MIN_SPAN["mouth_stretch"])
    out["mouth_pucker"] = _scale_range(-width, -w_mid, -w_lo, _MIN_SPAN["mouth_pucker"])

    # eyes, on the tracked landmarks (3D distances, so the ratio barely depends on head pose)
    lm = np.nan_to_num(landmarks.astype(np.float64))
    for side, (upper, lower, c0, c1) in _EYES.items():
        ratio = np.zeros(n)
        lid = np.linalg.norm(lm[valid, upper] - lm[valid, lower], axis=-1)
        eye_width = np.linalg.norm(lm[valid, c0] - lm[valid, c1], axis=-1)
        ratio[valid] = lid / np.maximum(eye_width, 1e-6)
        ratio = _interp_invalid(ratio, valid)
        opened = max(float(np.median(ratio[valid])), 1e-6)
        closing = (1.0 - ratio / opened) / (1.0 - _BLINK_CLOSED_FRACTION)
        out[f"eye_blink_{side}"] = np.clip(closing, 0.0, 1.0)

    # brows: height above the eye corners (rigid in the model) along the face's vertical (+y down)
    for side, brow in _BROWS.items():
        corners = _EYES[side][2:]
        height = (shapes[:, list(corners), 1].mean(1) - shapes[:, list(brow), 1].mean(1)) / unit
        h_mid, h_hi = np.percentile(height[valid], [50, 98])
        out[f"brow_raise_{side}"] = _scale_range(height, h_mid, h_hi,
                                                 _MIN_SPAN["brow_raise"])

    return np.stack([out[name] for name in BLENDSHAPE_NAMES], 1).astype(np.float32)
