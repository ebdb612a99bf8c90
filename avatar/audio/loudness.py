"""Per-utterance loudness normalisation: one gain for the whole waveform, from its voiced part.

A quiet and a loud recording of the same speech should give the same features. The gain scales
the waveform so that the RMS of its active (voiced) part is :data:`LOUDNESS_TARGET_DBFS`; pauses
and leading or trailing silence do not count, so a clip that is mostly silence is not amplified
more than one that is all speech.

The active part is the set of 20 ms blocks whose power lies within :data:`ACTIVE_RANGE_DB` of the
loud blocks (the 95th percentile of block power). Both the threshold and the level scale with
the signal, so multiplying the waveform by any factor (down to the :data:`MAX_GAIN_DB` limit)
gives the same normalised waveform up to float rounding.
"""

from __future__ import annotations

import numpy as np

from avatar.media import AUDIO_RATE

LOUDNESS_TARGET_DBFS = -20.0
"""RMS of the active part after normalisation, dB relative to full scale (0.1 in [-1, 1])."""

ACTIVE_RANGE_DB = 30.0
"""Blocks quieter than the loud blocks by more than this are pauses and do not count."""

MAX_GAIN_DB = 40.0
"""Largest amplification; near-silent input (room tone, dither) is not blown up to speech level."""

SILENCE_DBFS = -100.0
"""Input whose active part is below this is silence and is left as it is (gain 1)."""

_BLOCK = AUDIO_RATE // 50  # 20 ms
_CHUNK_BLOCKS = 50 * 600  # block powers computed 10 minutes of audio at a time


def active_rms(samples: np.ndarray) -> float:
    """RMS of the active part of ``samples`` ``[N]`` (0.0 for digital silence).

    Audio shorter than one block counts as a single block.
    """
    samples = np.asarray(samples, np.float32)
    if samples.size == 0:
        return 0.0
    n_blocks = max(1, samples.size // _BLOCK)
    power = np.empty(n_blocks, np.float64)
    for a in range(0, n_blocks, _CHUNK_BLOCKS):
        b = min(a + _CHUNK_BLOCKS, n_blocks)
        if n_blocks == 1:
            block = samples.astype(np.float64)[None, :]
        else:
            block = samples[a * _BLOCK : b * _BLOCK].astype(np.float64).reshape(b - a, _BLOCK)
        power[a:b] = np.mean(np.square(block), axis=1)
    loud = float(np.percentile(power, 95.0))
    if loud <= 0.0:
        return 0.0
    active = power[power >= loud * 10.0 ** (-ACTIVE_RANGE_DB / 10.0)]
    return float(np.sqrt(np.mean(active)))


def loudness_gain(samples: np.ndarray) -> float:
    """The factor that brings the active part of ``samples`` to :data:`LOUDNESS_TARGET_DBFS`.

    1.0 for silence (below :data:`SILENCE_DBFS`); never more than :data:`MAX_GAIN_DB`.
    """
    rms = active_rms(samples)
    if rms <= 10.0 ** (SILENCE_DBFS / 20.0):
        return 1.0
    gain = 10.0 ** (LOUDNESS_TARGET_DBFS / 20.0) / rms
    return float(min(gain, 10.0 ** (MAX_GAIN_DB / 20.0)))
