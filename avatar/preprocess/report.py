"""Quality-control images of a subject, so a person can judge the tracking at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from avatar import topology

PALETTE = np.array(
    [[0, 0, 0], [40, 90, 230], [60, 200, 80], [230, 40, 40], [240, 210, 40], [200, 80, 200]], np.uint8
)
"""RGB colour of each mask label (background, torso, face, mouth, hair, spare)."""


def overlay(frame: np.ndarray, labels: np.ndarray, landmarks: np.ndarray | None, valid: bool) -> np.ndarray:
    """The frame with its label map blended in and the landmarks and lip contours drawn (RGB)."""
    img = (0.6 * frame + 0.4 * PALETTE[np.minimum(labels, len(PALETTE) - 1)]).astype(np.uint8)
    if landmarks is not None and np.isfinite(landmarks).all():
        colour = (255, 255, 255) if valid else (255, 120, 0)
        for x, y in np.round(landmarks[:, :2]).astype(int):
            cv2.circle(img, (int(x), int(y)), 1, colour, -1, lineType=cv2.LINE_AA)
        for loop in (topology.LIPS_INNER, topology.LIPS_OUTER, topology.LEFT_EYE, topology.RIGHT_EYE):
            cv2.polylines(img, [topology.polygon(landmarks, loop)], True, (255, 255, 0), 1, cv2.LINE_AA)
    return img


def contact_sheet(tiles: Sequence[np.ndarray], captions: Sequence[str], cols: int = 4,
                  tile: int = 256) -> np.ndarray:
    """Tiles (RGB, any size) resized to ``tile`` and laid out in a grid with captions."""
    rows = (len(tiles) + cols - 1) // cols
    sheet = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    for i, (img, cap) in enumerate(zip(tiles, captions)):
        r, c = divmod(i, cols)
        small = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        cv2.putText(small, cap, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(small, cap, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        sheet[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = small
    return sheet


def rotation_to_euler_deg(rot: np.ndarray) -> np.ndarray:
    """Head yaw, pitch, roll in degrees from world-to-camera rotations [T, 3, 3] (x-y-z order)."""
    pitch = np.degrees(np.arctan2(rot[:, 2, 1], rot[:, 2, 2]))
    yaw = np.degrees(np.arcsin(np.clip(-rot[:, 2, 0], -1, 1)))
    roll = np.degrees(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
    return np.stack([yaw, pitch, roll], axis=1)


def plot_tracks(path: Path, fps: float, cam_to_world: np.ndarray, valid: np.ndarray,
                blendshapes: np.ndarray, names: Sequence[str], frame_error: np.ndarray) -> None:
    """Plots of head pose, eye blinks, jaw and reprojection error over time, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(valid)) / fps
    world_to_cam = np.linalg.inv(cam_to_world)
    euler = rotation_to_euler_deg(world_to_cam[:, :3, :3])
    trans = world_to_cam[:, :3, 3]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    for k, label in enumerate(("yaw", "pitch", "roll")):
        axes[0].plot(t, euler[:, k] - np.median(euler[:, k]), label=label)
    axes[0].set_ylabel("head rotation (deg,\nminus median)")
    ax = axes[0].twinx()
    ax.plot(t, trans[:, 2], "k:", label="distance")
    ax.set_ylabel("camera distance")
    axes[0].legend(loc="upper left", fontsize=8)
    name_list = list(names)
    for key in ("jaw_open", "lips_apart", "mouth_stretch", "mouth_pucker"):
        if key in name_list:
            axes[1].plot(t, blendshapes[:, name_list.index(key)], label=key)
    axes[1].set_ylabel("mouth")
    axes[1].legend(loc="upper left", fontsize=8)
    for key in ("eye_blink_left", "eye_blink_right", "brow_raise_left", "brow_raise_right"):
        if key in name_list:
            axes[2].plot(t, blendshapes[:, name_list.index(key)], label=key)
    axes[2].set_ylabel("eyes, brows")
    axes[2].legend(loc="upper left", fontsize=8)
    axes[3].plot(t, frame_error, label="reprojection error (px)")
    invalid = ~valid.astype(bool)
    if invalid.any():
        axes[3].fill_between(t, 0, np.nanmax(frame_error) if np.isfinite(frame_error).any() else 1,
                             where=invalid, color="red", alpha=0.2, label="not tracked")
    axes[3].set_ylabel("px")
    axes[3].set_xlabel("seconds")
    axes[3].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
