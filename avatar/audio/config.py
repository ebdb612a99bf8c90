"""Which speech features a subject was made with: the config stored in subject.json, and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from avatar.media import AUDIO_RATE

FEATURE_KINDS = ("mel", "hubert", "wav2vec2", "whisper")
"""Valid values of :attr:`AudioFeatureConfig.kind`."""

DEFAULT_WINDOW = {"mel": 16, "hubert": 4, "wav2vec2": 4, "whisper": 4}
"""Feature frames per video-frame window when :attr:`AudioFeatureConfig.window` is ``None``."""

@dataclass
class AudioFeatureConfig:
    """Which audio features to compute and how; stored with a subject so rendering matches it."""

    kind: str = "mel"
    """One of ``mel`` (log-mel, no weights), ``hubert`` or ``wav2vec2`` (needs ``model``), or
    ``whisper`` (Whisper encoder; the tiny.en weights are installed with the package)."""

    model: Optional[str] = None
    """For ``hubert``/``wav2vec2``: a local directory written by ``save_pretrained`` or a model
    name already in the Hugging Face cache (e.g. ``facebook/hubert-large-ls960-ft``). Nothing is
    downloaded. For ``whisper``: a CTranslate2 Whisper directory, or ``None`` for the bundled
    tiny.en. Unused for ``mel``."""

    window: Optional[int] = None
    """Feature frames per video-frame window ``W``; ``None`` uses :data:`DEFAULT_WINDOW` for the
    kind (mel 16 = 160 ms, hubert/wav2vec2/whisper 4 = 80 ms)."""

    n_mels: int = 80
    """``mel``: number of mel bands ``D``."""

    win_ms: float = 25.0
    """``mel``: STFT analysis window length (Hann), milliseconds."""

    hop_ms: float = 10.0
    """``mel``: STFT hop, milliseconds; the mel frame rate is ``1000 / hop_ms`` Hz."""

    n_fft: int = 512
    """``mel``: FFT size; the window is zero-padded to it. 512 at 16 kHz keeps every one of the
    80 default bands non-empty."""

    fmin: float = 55.0
    """``mel``: lowest band edge, Hz (below the lowest voice fundamentals)."""

    fmax: float = 7600.0
    """``mel``: highest band edge, Hz (at most half of 16 kHz)."""

    layer: int = -1
    """``hubert``/``wav2vec2``: which hidden state to use; ``-1`` is the last hidden state,
    ``0`` the input to the first transformer layer, ``i`` the output of layer ``i``."""

    normalize_waveform: bool = True
    """``hubert``/``wav2vec2``: scale the waveform to zero mean and unit variance over the whole
    utterance first, as the fine-tuned checkpoints (e.g. ``hubert-large-ls960-ft``) expect."""

    chunk_s: Optional[float] = 20.0
    """``hubert``/``wav2vec2``: seconds of output per model call, so memory stays bounded for long
    audio; ``None`` runs the whole utterance at once. ``whisper``: seconds of output kept from
    each 30 s window (at most 30; ``None`` means 30), the rest being context split evenly on both
    sides."""

    context_s: float = 2.0
    """``hubert``/``wav2vec2``: extra audio given to each chunk on both sides and then discarded,
    so chunk borders barely change the features (the convolutional position embedding of the
    released models reaches 1.28 s each way). Unused for ``whisper``, whose context is what
    its 30 s window holds beyond ``chunk_s``."""

    subtract_silence: bool = True
    """``whisper``: subtract what the encoder outputs for silence at the same position of its 30 s
    window. The encoder adds an absolute position code that survives to its output (about half
    of the feature variance on speech); without it, the same audio gives clearly different
    features at different places in a window, so the features would carry a clock that repeats
    every ``chunk_s``. Silence then reads exactly 0. ``False`` gives the raw encoder output."""

    loudness: Optional[bool] = None
    """``mel``/``whisper``: scale the waveform so that its voiced part has a fixed RMS
    (:mod:`avatar.audio.loudness`) before computing features, so quiet and loud recordings of the
    same speech give close features. ``None`` is the kind's default: on for ``whisper``, off for
    ``mel`` (which keeps the features of subjects made before this option the same)."""


def parse_audio_feature_spec(spec: str) -> AudioFeatureConfig:
    """Parse the command-line syntax ``mel``, ``hubert:PATH_OR_NAME``, ``wav2vec2:PATH_OR_NAME``,
    ``whisper`` (the bundled tiny.en) or ``whisper:PATH`` (a CTranslate2 Whisper directory).

    Only the first ``:`` separates kind from model, so Windows paths (``hubert:C:\\m``) work.

    Raises:
        ValueError: unknown kind, a model given to ``mel``, or no model given to hubert/wav2vec2.
    """
    kind, sep, model = spec.strip().partition(":")
    kind = kind.strip().lower()
    model = model.strip()
    choices = "'mel', 'whisper', 'whisper:PATH', 'hubert:PATH_OR_NAME' or 'wav2vec2:PATH_OR_NAME'"
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown audio feature spec {spec!r}; expected {choices}.")
    if kind == "mel":
        if sep:
            raise ValueError(f"Audio feature spec {spec!r}: 'mel' takes no model; use just 'mel'.")
        return AudioFeatureConfig(kind="mel")
    if kind == "whisper":
        if sep and not model:
            raise ValueError(f"Audio feature spec {spec!r} names no model; use 'whisper' for the bundled one.")
        return AudioFeatureConfig(kind="whisper", model=model or None)
    if not model:
        raise ValueError(
            f"Audio feature spec {spec!r} names no model; expected {choices}, where PATH_OR_NAME "
            f"is a local model directory or a cached hub name."
        )
    return AudioFeatureConfig(kind=kind, model=model)


def feature_config_from_manifest(stored: dict[str, Any]) -> AudioFeatureConfig:
    """The config a subject's features were computed with, from its ``subject.json`` entry
    (which also holds derived values such as ``dim``, not options of the config)."""
    names = {f.name for f in dataclasses.fields(AudioFeatureConfig)}
    return AudioFeatureConfig(**{k: v for k, v in stored.items() if k in names})


def loudness_on(config: AudioFeatureConfig) -> bool:
    """Whether the waveform is loudness-normalised first (:attr:`AudioFeatureConfig.loudness`)."""
    return config.kind == "whisper" if config.loudness is None else bool(config.loudness)


def window_of(config: AudioFeatureConfig) -> int:
    return DEFAULT_WINDOW[config.kind] if config.window is None else int(config.window)


def check_config(config: AudioFeatureConfig) -> None:
    """Raise ValueError naming the bad field and the expected values."""
    if config.kind not in FEATURE_KINDS:
        raise ValueError(
            f"Unknown audio feature kind {config.kind!r}; "
            f"expected one of {', '.join(FEATURE_KINDS)}."
        )
    if config.window is not None and (int(config.window) != config.window or config.window < 1):
        raise ValueError(f"Expected audio feature window >= 1 (or None), got {config.window!r}.")
    if config.kind == "mel":
        win_length = round(config.win_ms * AUDIO_RATE / 1000.0)
        hop = round(config.hop_ms * AUDIO_RATE / 1000.0)
        if not 1 <= win_length <= config.n_fft:
            raise ValueError(
                f"Expected a mel window of 1..n_fft={config.n_fft} samples, got "
                f"win_ms={config.win_ms} ({win_length} samples at {AUDIO_RATE} Hz)."
            )
        if hop < 1:
            raise ValueError(f"Expected hop_ms of at least one sample, got {config.hop_ms}.")
        if config.n_mels < 1:
            raise ValueError(f"Expected n_mels >= 1, got {config.n_mels}.")
        if not 0.0 <= config.fmin < config.fmax <= AUDIO_RATE / 2:
            raise ValueError(
                f"Expected 0 <= fmin < fmax <= {AUDIO_RATE // 2} Hz, got fmin={config.fmin}, "
                f"fmax={config.fmax}."
            )
        return
    if config.kind == "whisper":
        if config.chunk_s is not None and not 0 < config.chunk_s <= 30.0:
            raise ValueError(f"Expected whisper chunk_s in (0, 30] s (or None), got {config.chunk_s}.")
        return
    if config.loudness:
        raise ValueError(
            f"loudness applies to 'mel' and 'whisper'; {config.kind!r} normalises the waveform with "
            f"normalize_waveform instead."
        )
    if not config.model:
        raise ValueError(
            f"Audio features {config.kind!r} need a model (a local directory or a cached hub "
            f"name), got none."
        )
    if config.chunk_s is not None and config.chunk_s <= 0:
        raise ValueError(f"Expected chunk_s > 0 or None, got {config.chunk_s}.")
    if config.context_s < 0:
        raise ValueError(f"Expected context_s >= 0, got {config.context_s}.")
