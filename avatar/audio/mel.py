"""Log-mel features: no weights, the fallback kind."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from avatar.audio.config import AudioFeatureConfig
from avatar.audio.signal import PROGRESS_STEP, padded_segment
from avatar.media import AUDIO_RATE
from avatar.progress import Progress, null_progress

MEL_FLOOR_DB = -100.0
"""Mel band power floor in dB relative to a full-scale sine. It sits above the quantisation noise
of 16-bit audio (about -120 dB per band), so digital and dithered silence read the same."""

_MEL_BLOCK_FRAMES = 6000
"""Mel frames computed per STFT call (60 s at 10 ms hop); bounds memory for hour-long audio."""

def mel_geometry(config: AudioFeatureConfig) -> tuple[int, int, float]:
    """``(hop, frame_len, centre)`` in samples of the STFT frames (``frame_len`` = ``n_fft``)."""
    win_length = int(round(config.win_ms * AUDIO_RATE / 1000.0))
    hop = int(round(config.hop_ms * AUDIO_RATE / 1000.0))
    # torch.stft centres the window inside the n_fft frame; a periodic Hann peaks at win_length/2.
    centre = (config.n_fft - win_length) // 2 + win_length / 2.0
    return hop, config.n_fft, centre


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_filterbank(n_mels: int, n_fft: int, fmin: float, fmax: float, rate: int) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters on the HTK mel scale, each peaking at 1.

    Peak 1 (no area normalisation) means a pure tone at a band's centre frequency reads the
    tone's own power in that band, which keeps the dB values easy to interpret.

    Raises:
        ValueError: a band falls between two FFT bins and would always read silence.
    """
    mel_lo, mel_hi = _hz_to_mel(np.float64(fmin)), _hz_to_mel(np.float64(fmax))
    edges = _mel_to_hz(np.linspace(mel_lo, mel_hi, n_mels + 2))  # [M + 2] Hz
    bins = np.arange(n_fft // 2 + 1, dtype=np.float64) * rate / n_fft  # [F] Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)  # [M, F]
    empty = np.flatnonzero(weights.max(axis=1) <= 0.0)
    if empty.size:
        raise ValueError(
            f"Mel bands {empty.tolist()} contain no FFT bin with n_mels={n_mels}, n_fft={n_fft}, "
            f"fmin={fmin}; increase n_fft or fmin, or reduce n_mels."
        )
    return weights


class MelExtractor:
    """Log-mel frames with a fixed normalisation: ``dB / 50 + 1`` where dB is band power relative
    to a full-scale sine, floored at :data:`MEL_FLOOR_DB`.

    Silence reads -1 and a full-scale tone about +1 in its band. The scaling is fixed, not
    estimated per utterance, so new speech at render time lands on the training statistics; any
    learned normalisation belongs to the model.
    """

    def __init__(self, config: AudioFeatureConfig, device: torch.device, gain: float = 1.0):
        self.gain = float(gain)  # loudness normalisation (avatar.audio.loudness); 1.0 when off
        self.hop, self.n_fft, _ = mel_geometry(config)
        self.win_length = int(round(config.win_ms * AUDIO_RATE / 1000.0))
        self.device = device
        self.dim = config.n_mels
        self.hann = torch.hann_window(
            self.win_length, periodic=True, dtype=torch.float32, device=device
        )
        # A full-scale sine has STFT magnitude sum(window) / 2 at its bin; scale that to 1.
        self.scale = 2.0 / float(self.hann.sum())
        self.fbank = torch.from_numpy(
            _mel_filterbank(config.n_mels, config.n_fft, config.fmin, config.fmax, AUDIO_RATE)
        ).to(device=device, dtype=torch.float32)  # [M, F]

    def __call__(
        self, samples: np.ndarray, pad_left: int, n_padded: int, first: int, stop: int,
        progress: Optional[Progress],
    ) -> np.ndarray:  # [stop - first, n_mels]
        report = progress or null_progress
        blocks = range(first, stop, _MEL_BLOCK_FRAMES)
        out = np.empty((stop - first, self.dim), np.float32)
        report(PROGRESS_STEP, 0, len(blocks))
        for i, a in enumerate(blocks):
            b = min(a + _MEL_BLOCK_FRAMES, stop)
            segment = padded_segment(
                samples, pad_left, n_padded, a * self.hop, (b - 1) * self.hop + self.n_fft, scale=self.gain
            )
            mel = self._log_mel(torch.from_numpy(segment).to(self.device))  # [b - a, n_mels]
            out[a - first : b - first] = mel.cpu().numpy()
            report(PROGRESS_STEP, i + 1, len(blocks))
        return out

    @torch.inference_mode()
    def _log_mel(self, segment: torch.Tensor) -> torch.Tensor:  # [S] -> [K, n_mels]
        spec = torch.stft(
            segment, n_fft=self.n_fft, hop_length=self.hop, win_length=self.win_length,
            window=self.hann, center=False, return_complex=True,
        )  # [F, K]
        power = (spec.abs() * self.scale).square()
        mel = self.fbank @ power  # [M, K]
        db = 10.0 * torch.log10(mel.clamp_min(10.0 ** (MEL_FLOOR_DB / 10.0)))
        return (db / (-MEL_FLOOR_DB / 2.0) + 1.0).T
