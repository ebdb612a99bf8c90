"""Index sets of mediapipe's 478-point face mesh that the pipeline draws with.

Each contour is an ordered loop of landmark indices (mediapipe's published topology), so it can
be filled as a polygon. "Left" and "right" are the subject's own sides.
"""

from __future__ import annotations

import numpy as np

N_LANDMARKS = 478

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
LIPS_OUTER = (0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146, 61, 185, 40, 39, 37)
LIPS_INNER = (13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78, 191, 80, 81, 82)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_IRIS = (473, 474, 475, 476, 477)
RIGHT_IRIS = (468, 469, 470, 471, 472)

NOSE_TIP = 1
"""The tip of the nose: which side of the face oval is the front."""

MOUTH = tuple(sorted(set(LIPS_OUTER) | set(LIPS_INNER)))
"""Every lip landmark: the set the mouth-landmark distance (LMD) is measured on."""
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
"""Middle of the inner upper and lower lip: their distance is the mouth opening."""
EYE_OUTER_RIGHT, EYE_OUTER_LEFT = 33, 263
"""Outer eye corners: their distance normalises the opening for face size and distance."""


def _image_xy(landmarks: np.ndarray) -> np.ndarray:
    """The x, y of [T, 478, D] or [478, D] landmarks (D >= 2) as float64 [T, 478, 2]."""
    a = np.asarray(landmarks, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != N_LANDMARKS or a.shape[2] < 2:
        raise ValueError(f"landmarks must be [T, {N_LANDMARKS}, 2] (or 3), got shape {a.shape}")
    return a[..., :2]


def inner_lip_opening(landmarks: np.ndarray) -> np.ndarray:
    """Mouth opening per frame: inner-lip gap (13-14) over the outer-eye-corner distance (33-263).

    Dividing by the eye distance makes the figure independent of face size, crop and resolution,
    so the same number describes a subject's tracked mouth, a rendered one and another person's.

    Args:
        landmarks: [T, 478, D] or [478, D] with D >= 2 (only x, y are used).

    Returns:
        float64 [T]; NaN where the face is missing (NaN landmarks or coincident eye corners).
    """
    a = _image_xy(landmarks)
    gap = np.linalg.norm(a[:, UPPER_LIP_INNER] - a[:, LOWER_LIP_INNER], axis=-1)
    eyes = np.linalg.norm(a[:, EYE_OUTER_RIGHT] - a[:, EYE_OUTER_LEFT], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(eyes > 0, gap / eyes, np.nan)


def polygon(landmarks: np.ndarray, loop: tuple[int, ...]) -> np.ndarray:
    """The x, y of ``loop`` as an int32 polygon [len(loop), 2] for cv2.fillPoly."""
    return np.round(landmarks[list(loop), :2]).astype(np.int32)


EYE_CORNERS = {"left": (362, 263), "right": (33, 133)}
"""Each eye's corners, image-left first for a frontal face (inner then outer for the subject's left eye)."""
IRIS_CENTRES = {"left": 473, "right": 468}
"""The centre landmark of each iris (the first of :data:`LEFT_IRIS` / :data:`RIGHT_IRIS`)."""


def iris_offset(landmarks: np.ndarray) -> np.ndarray:
    """Where the eyes look, per frame: the iris centre's offset from the midpoint of its eye's
    corners, in the eye's own axes (x along the corners, image-left to image-right; y across,
    image-down), in eye widths, averaged over both eyes.

    Measured against the eye corners rather than the image, so the head's own motion barely
    moves it; the pair of numbers is what tells a look to the side or down from a look ahead.

    Args:
        landmarks: [T, 478, D] or [478, D] with D >= 2 (only x, y are used).

    Returns:
        float64 [T, 2]; NaN where the face is missing (NaN landmarks or coincident corners).
    """
    a = _image_xy(landmarks)
    per_eye = []
    for side, (c0, c1) in EYE_CORNERS.items():
        axis = a[:, c1] - a[:, c0]
        width = np.linalg.norm(axis, axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(width > 0, axis / width, np.nan)
            offset = (a[:, IRIS_CENTRES[side]] - 0.5 * (a[:, c0] + a[:, c1])) / width
        v = np.stack([-u[:, 1], u[:, 0]], axis=-1)
        per_eye.append(np.stack([(offset * u).sum(-1), (offset * v).sum(-1)], axis=-1))
    return 0.5 * (per_eye[0] + per_eye[1])
