"""The background plate: a per-pixel temporal median of pixels never covered by the person.

Only a bounded, evenly spaced set of frames is kept (memory does not grow with the video);
pixels the person covers in every kept frame are filled by inpainting.
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

    def wants(self, index: int) -> bool:
        return index in self.keep

    def add(self, frame: np.ndarray, person: np.ndarray) -> None:
        """frame: uint8 [H, W, 3]; person: bool [H, W] (grown by ``dilate_px`` to avoid halos)."""
        k = 2 * self.dilate_px + 1
        grown = cv2.dilate(person.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        self._frames.append(frame.copy())
        self._bg.append(~grown)

    def plate(self) -> np.ndarray:
        """uint8 [H, W, 3]: median of background samples, holes inpainted."""
        if not self._frames:
            raise ValueError("no frames were added to the background accumulator")
        frames = np.stack(self._frames).astype(np.float32)  # [K, H, W, 3]
        bg = np.stack(self._bg)  # [K, H, W]
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
