"""compute_audio_features: one entry point for every kind, in preprocessing and rendering alike."""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from avatar.audio.config import AudioFeatureConfig, check_config, loudness_on, window_of
from avatar.audio.loudness import loudness_gain
from avatar.audio.mel import MelExtractor, mel_geometry
from avatar.audio.signal import Extractor, window_starts
from avatar.audio.transformers_encoders import HFExtractor, conv_geometry, load_hf
from avatar.audio.whisper import HOP as WHISPER_HOP
from avatar.audio.whisper import N_FFT as WHISPER_FRAME
from avatar.audio.whisper import WhisperExtractor, model_dir, model_geometry
from avatar.media import AUDIO_RATE
from avatar.progress import Progress

log = logging.getLogger(__name__)


def feature_shape(config: AudioFeatureConfig) -> tuple[int, int]:
    """``(W, D)`` of the per-frame windows :func:`compute_audio_features` returns for ``config``.

    For ``hubert``/``wav2vec2``, ``D`` is the model's hidden size, read from its ``config.json``;
    for ``whisper``, the encoder width (384 for tiny.en), read from the header of its
    ``model.bin`` (no weights are loaded).

    Raises:
        ValueError: the config is invalid.
        AvatarError: transformers, ctranslate2 or the model's files are not available.
    """
    check_config(config)
    window = window_of(config)
    if config.kind == "mel":
        return window, config.n_mels
    if config.kind == "whisper":
        return window, model_geometry(model_dir(config))[0]
    hf_config = load_hf(config, weights=False)
    return window, int(hf_config.hidden_size)


def compute_audio_features(
    samples: np.ndarray,  # [N]
    n_frames: int,
    fps: float,
    config: Optional[AudioFeatureConfig] = None,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
) -> np.ndarray:  # [T, W, D]
    """Audio features for each of ``n_frames`` video frames at ``fps``.

    Window ``t`` holds the ``W`` feature frames whose centres lie closest around
    ``(t + 0.5) / fps`` seconds. Audio outside ``samples`` counts as silence, so the result always
    has ``n_frames`` windows whatever the length of the audio.

    Args:
        samples: ``[N]`` mono float audio at :data:`avatar.media.AUDIO_RATE` (16 kHz) in [-1, 1],
            as :func:`avatar.media.load_audio` returns.
        n_frames: ``T``, the number of video frames (>= 0).
        fps: video frame rate (> 0).
        config: which features; ``None`` means the default (``mel``).
        device: torch device for the computation; the result is always a numpy array.
        progress: called as ``progress("audio features", done, total)`` per chunk.

    Returns:
        ``[T, W, D]`` float32 features; see the module docstring and :func:`feature_shape`.

    Raises:
        ValueError: bad ``samples`` shape or values, ``n_frames`` or ``fps``, or an invalid config.
        AvatarError: ``hubert``/``wav2vec2`` without transformers or without local weights;
            ``whisper`` without ctranslate2 or its model.

    Examples:
        >>> feats = compute_audio_features(np.zeros(16000, np.float32), n_frames=25, fps=25.0)
        >>> feats.shape
        (25, 16, 80)
    """
    config = config or AudioFeatureConfig()
    check_config(config)
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"Expected mono audio samples of shape [N], got shape {samples.shape}.")
    samples = samples.astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):
        raise ValueError("Audio samples contain NaN or infinite values.")
    if int(n_frames) != n_frames or n_frames < 0:
        raise ValueError(f"Expected n_frames to be a non-negative integer, got {n_frames!r}.")
    n_frames = int(n_frames)
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"Expected fps to be a number > 0, got {fps!r}.") from None
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"Expected fps > 0, got {fps!r}.")
    device = torch.device(device)
    window = window_of(config)
    gain = loudness_gain(samples) if loudness_on(config) else 1.0

    if config.kind == "mel":
        hop, frame_len, centre = mel_geometry(config)
        extractor: Extractor = MelExtractor(config, device, gain)
    elif config.kind == "whisper":
        # Output frame k is centred on mel frame 2k, which reads samples [320 k, 320 k + 400).
        hop, frame_len, centre = WHISPER_HOP, WHISPER_FRAME, WHISPER_FRAME / 2.0
        extractor = WhisperExtractor(config, gain, device)
    else:
        model = load_hf(config, weights=True).to(device)
        hop, frame_len = conv_geometry(model.config)
        centre = (frame_len - 1) / 2.0
        extractor = HFExtractor(model, config, samples, device)
    log.info(
        "Computing %s audio features for %d frames at %g fps (%.1f s of audio) on %s",
        config.kind, n_frames, fps, samples.shape[0] / AUDIO_RATE, device,
    )

    starts, pad_left = window_starts(n_frames, fps, window, hop, centre)
    if n_frames == 0:
        return np.zeros((0, window, extractor.dim), np.float32)
    first, last = int(starts[0]), int(starts[-1]) + window - 1  # feature frames needed
    # The padded signal is ``pad_left`` zeros, the audio, then zeros up to the last frame needed.
    n_padded = max(pad_left + samples.shape[0], last * hop + frame_len)
    frames = extractor(samples, pad_left, n_padded, first, last + 1, progress)  # [last-first+1, D]
    index = starts[:, None] - first + np.arange(window)[None, :]  # [T, W]
    return np.ascontiguousarray(frames[index], dtype=np.float32)
