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

MOUTH = tuple(sorted(set(LIPS_OUTER) | set(LIPS_INNER)))
"""Every lip landmark: the set the mouth-landmark distance (LMD) is measured on."""


def polygon(landmarks: np.ndarray, loop: tuple[int, ...]) -> np.ndarray:
    """The x, y of ``loop`` as an int32 polygon [len(loop), 2] for cv2.fillPoly."""
    return np.round(landmarks[list(loop), :2]).astype(np.int32)
