"""Plates: per-pixel temporal medians of the background, and of what lies behind the head.

The background plate is the median of pixels not covered by the person. The neck plate is the
median of torso + neck pixels, filled upwards by inpainting: it is what the compositor shows
where the rendered head leaves a pixel of the head region uncovered (a jaw that opens less than
in the frame the torso comes from), so such gaps read as neck and shadow instead of the wall
behind the person. Only a bounded, evenly spaced set of frames is kept (memory does not grow
with the video); pixels never sampled are filled by inpainting.
"""

from __future__ import annotations

import cv2
import numpy as np


class BackgroundAccumulator:
    """Collects background samples from selected frames while they stream past."""

    def __init__(self, n_frames: int, max_samples: int = 48, dilate_px: int = 7):
        self.keep = set(np.linspace(0, max(n_frames - 1, 0), num=min(max_samples, max(n_frames, 1)))
                        .round().astype(int).tolist())
        self.dilate_px = dilate_px
        self._frames: list[np.ndarray] = []
        self._bg: list[np.ndarray] = []
        self._torso: list[np.ndarray] = []

    def wants(self, index: int) -> bool:
        return index in self.keep

    def add(self, frame: np.ndarray, person: np.ndarray, torso: np.ndarray | None = None) -> None:
        """frame: uint8 [H, W, 3]; person, torso: bool [H, W] (person grown by ``dilate_px``)."""
        k = 2 * self.dilate_px + 1
        grown = cv2.dilate(person.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        self._frames.append(frame.copy())
        self._bg.append(~grown)
        self._torso.append(torso.copy() if torso is not None else np.zeros_like(person))

    def plate(self) -> np.ndarray:
        """uint8 [H, W, 3]: median of background samples, holes inpainted."""
        return self._median(self._bg)

    def neck_plate(self) -> np.ndarray:
        """uint8 [H, W, 3]: median of torso + neck samples, holes inpainted (behind the head)."""
        return self._median(self._torso)

    def _median(self, masks: list[np.ndarray]) -> np.ndarray:
        if not self._frames:
            raise ValueError("no frames were added to the background accumulator")
        frames = np.stack(self._frames).astype(np.float32)  # [K, H, W, 3]
        bg = np.stack(masks)  # [K, H, W]
        frames[~bg] = np.nan
        seen = bg.any(axis=0)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(frames, axis=0)
        med = np.nan_to_num(med, nan=0.0).clip(0, 255).astype(np.uint8)
        if not seen.all():
            holes = (~seen).astype(np.uint8)
            if seen.any():
                med = cv2.inpaint(med, holes, 5, cv2.INPAINT_TELEA)
            else:
                med[:] = np.median(np.stack(self._frames).reshape(-1, 3), axis=0).astype(np.uint8)
        return med
