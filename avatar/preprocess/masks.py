"""Semantic label maps from a person segmentation and the face landmarks.

mediapipe's selfie segmentation separates the person from the background; landmark polygons
split the person into face skin, mouth interior, the rest of the head (hair, ears) and
torso + neck. The split between head and torso follows the jaw line: below the face oval is
neck, to the sides of the face the boundary sits a little below ear level.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from avatar import topology
from avatar.subject import LABEL


def label_map(person: np.ndarray, landmarks: Optional[np.ndarray], ear_margin: float = 0.12) -> np.ndarray:
    """Build a uint8 label map (legend ``avatar.subject.MASK_LEGEND``).

    Args:
        person: bool [H, W], the person (not background).
        landmarks: [478, 2+] in the same pixels, or None where the face was not tracked
            (then every person pixel is labelled torso_neck, to be redrawn once landmarks
            are interpolated).
        ear_margin: how far below the face oval's widest point the head still extends at the
            sides (ears, hair), in face heights.

    Returns:
        uint8 [H, W].
    """
    h, w = person.shape
    labels = np.zeros((h, w), np.uint8)
    labels[person] = LABEL["torso_neck"]
    if landmarks is None:
        return labels
    face = np.zeros((h, w), np.uint8)
    cv2.fillPoly(face, [topology.polygon(landmarks, topology.FACE_OVAL)], 1)
    face_bool = face.astype(bool)
    cols = np.flatnonzero(face_bool.any(axis=0))
    if cols.size:
        # Lowest face pixel per column inside the face's columns; ear level outside them.
        rows = np.arange(h)[:, None]
        lowest = np.where(face_bool, rows, -1).max(axis=0).astype(np.float64)
        inside = lowest >= 0
        face_h = float(np.ptp(landmarks[list(topology.FACE_OVAL), 1]))
        xs = np.arange(w)
        boundary = np.interp(xs, xs[inside], lowest[inside])
        boundary[~inside] += ear_margin * face_h
        head = (rows < boundary[None, :]) & person
        labels[head] = LABEL["hair"]
    labels[face_bool] = LABEL["face"]
    mouth = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mouth, [topology.polygon(landmarks, topology.LIPS_INNER)], 1)
    labels[mouth.astype(bool)] = LABEL["mouth_interior"]
    return labels
