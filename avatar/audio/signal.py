"""Aligning feature frames with video frames, and reading the zero-padded signal in segments.

Shared by every feature kind: a kind computes feature frames at its own hop over the padded
signal; these functions decide which frames make each video frame's window.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from avatar.media import AUDIO_RATE
from avatar.progress import Progress

PROGRESS_STEP = "audio features"


def window_starts(
    n_frames: int, fps: float, window: int, hop: int, centre: float
) -> tuple[np.ndarray, int]:
    """First feature frame of each video frame's window, and the zeros to put before the audio.

    Feature frame ``k`` of the padded signal covers samples ``[k*hop, k*hop + frame_len)`` and is
    centred at ``k*hop + centre``. Returns ``(starts [T] int64, pad_left)`` with ``pad_left`` a
    multiple of ``hop`` just large enough that ``starts[0] >= 0``. ``pad_left`` depends only on
    fps and the geometry, never on ``n_frames``, so frame ``t`` gets the same window for any ``T``.
    """
    def starts_for(t: np.ndarray, pad: int) -> np.ndarray:
        centre_sample = (t + 0.5) * (AUDIO_RATE / fps) + pad  # video frame centre, padded samples
        # floor(x + 0.5) rather than np.round: banker's rounding would break the exact shift by
        # pad // hop below.
        return np.floor((centre_sample - centre) / hop - (window - 1) / 2.0 + 0.5).astype(np.int64)

    first = int(starts_for(np.zeros(1), 0)[0])
    pad_left = max(0, -first) * hop
    return starts_for(np.arange(n_frames, dtype=np.float64), pad_left), pad_left


def padded_segment(
    samples: np.ndarray,  # [N]
    pad_left: int,
    n_padded: int,
    start: int,
    stop: int,
    offset: float = 0.0,
    scale: float = 1.0,
) -> np.ndarray:  # [stop - start]
    """Samples ``[start, stop)`` of ``pad_left`` zeros + ``(samples - offset) * scale`` + zeros up
    to ``n_padded``.

    Built per segment so that an hour of audio is never copied whole.
    """
    assert 0 <= start <= stop <= n_padded, (start, stop, n_padded)
    out = np.zeros(stop - start, np.float32)
    lo, hi = max(start, pad_left), min(stop, pad_left + samples.shape[0])
    if hi > lo:
        out[lo - start : hi - start] = samples[lo - pad_left : hi - pad_left]
        if offset != 0.0 or scale != 1.0:
            out[lo - start : hi - start] = (out[lo - start : hi - start] - offset) * scale
    return out


# Extractor(samples, pad_left, n_padded, first, stop, progress) -> [stop - first, D] features of
# frames first..stop-1 of the padded signal.
Extractor = Callable[[np.ndarray, int, int, int, int, Optional[Progress]], np.ndarray]
