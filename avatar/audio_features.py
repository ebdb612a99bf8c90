"""Per-video-frame audio features: what the avatar hears while it shows frame ``t``.

Preprocessing stores the features of the subject's own audio as ``audio_features`` ``[T, W, D]``
next to the ``T`` video frames; rendering computes the features of new speech. Both go through
:func:`compute_audio_features` with the same :class:`AudioFeatureConfig`, so a model never sees
features at render time that were made differently from the ones it was trained on.

Every kind first computes a sequence of feature frames at a fixed rate, then cuts one window of
``W`` consecutive feature frames per video frame, centred on that video frame's centre time
``(t + 0.5) / fps``. The audio is treated as if surrounded by silence (zeros), so windows that
reach before the start or past the end of the audio, or audio shorter than the video, still give
``T`` full windows.

Kinds (``W`` is :attr:`AudioFeatureConfig.window`, defaults shown):

- ``mel``: log-mel frames at 100 Hz (25 ms Hann window, 10 ms hop). ``W`` = 16 (160 ms),
  ``D`` = ``n_mels`` = 80. No weights, no extra packages.
- ``hubert``: HuBERT hidden states at 50 Hz (20 ms hop, 25 ms receptive field of the conv
  encoder). ``W`` = 4 (80 ms), ``D`` = hidden size (1024 for the large models, 768 for base).
- ``wav2vec2``: wav2vec 2.0 hidden states, same rate and shape rules as ``hubert``.

``mel`` needs no weights and is the default. ``hubert``/``wav2vec2`` need ``transformers`` and
locally available weights. ER-NeRF and GeneFace feed HuBERT as ``[T, 2, 1024]`` at 25 fps (the
two 20 ms frames inside each 40 ms video frame); ``window=2`` reproduces that at 25 fps, and the
default of 4 adds half a video frame either side so that frame rates other than 25 fps still see
the whole frame.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from avatar.errors import AvatarError
from avatar.media import AUDIO_RATE
from avatar.progress import Progress, null_progress

log = logging.getLogger(__name__)

FEATURE_KINDS = ("mel", "hubert", "wav2vec2")
"""Valid values of :attr:`AudioFeatureConfig.kind`."""

DEFAULT_WINDOW = {"mel": 16, "hubert": 4, "wav2vec2": 4}
"""Feature frames per video-frame window when :attr:`AudioFeatureConfig.window` is ``None``."""

MEL_FLOOR_DB = -100.0
"""Mel band power floor in dB relative to a full-scale sine. It sits above the quantisation noise
of 16-bit audio (about -120 dB per band), so digital and dithered silence read the same."""

_MEL_BLOCK_FRAMES = 6000
"""Mel frames computed per STFT call (60 s at 10 ms hop); bounds memory for hour-long audio."""

_PROGRESS_STEP = "audio features"


@dataclass
class AudioFeatureConfig:
    """Which audio features to compute and how; stored with a subject so rendering matches it."""

    kind: str = "mel"
    """One of ``mel`` (log-mel, no weights), ``hubert`` or ``wav2vec2`` (needs ``model``)."""

    model: Optional[str] = None
    """For ``hubert``/``wav2vec2``: a local directory written by ``save_pretrained`` or a model
    name already in the Hugging Face cache (e.g. ``facebook/hubert-large-ls960-ft``). Nothing is
    downloaded. Unused for ``mel``."""

    window: Optional[int] = None
    """Feature frames per video-frame window ``W``; ``None`` uses :data:`DEFAULT_WINDOW` for the
    kind (mel 16 = 160 ms, hubert/wav2vec2 4 = 80 ms)."""

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
    audio; ``None`` runs the whole utterance at once."""

    context_s: float = 2.0
    """``hubert``/``wav2vec2``: extra audio given to each chunk on both sides and then discarded,
    so chunk borders barely change the features (the convolutional position embedding of the
    released models reaches 1.28 s each way)."""


def parse_audio_feature_spec(spec: str) -> AudioFeatureConfig:
    """Parse the command-line syntax ``mel``, ``hubert:PATH_OR_NAME`` or ``wav2vec2:PATH_OR_NAME``.

    Only the first ``:`` separates kind from model, so Windows paths (``hubert:C:\\m``) work.

    Raises:
        ValueError: unknown kind, a model given to ``mel``, or no model given to the others.
    """
    kind, sep, model = spec.strip().partition(":")
    kind = kind.strip().lower()
    model = model.strip()
    choices = "'mel', 'hubert:PATH_OR_NAME' or 'wav2vec2:PATH_OR_NAME'"
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown audio feature spec {spec!r}; expected {choices}.")
    if kind == "mel":
        if sep:
            raise ValueError(f"Audio feature spec {spec!r}: 'mel' takes no model; use just 'mel'.")
        return AudioFeatureConfig(kind="mel")
    if not model:
        raise ValueError(
            f"Audio feature spec {spec!r} names no model; expected {choices}, where PATH_OR_NAME "
            f"is a local model directory or a cached hub name."
        )
    return AudioFeatureConfig(kind=kind, model=model)


def feature_shape(config: AudioFeatureConfig) -> tuple[int, int]:
    """``(W, D)`` of the per-frame windows :func:`compute_audio_features` returns for ``config``.

    For ``hubert``/``wav2vec2``, ``D`` is the model's hidden size, read from its ``config.json``
    (no weights are loaded).

    Raises:
        ValueError: the config is invalid.
        AvatarError: transformers or the model's files are not available.
    """
    _check_config(config)
    window = _window(config)
    if config.kind == "mel":
        return window, config.n_mels
    hf_config = _load_hf(config, weights=False)
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
        AvatarError: ``hubert``/``wav2vec2`` without transformers or without local weights.

    Examples:
        >>> feats = compute_audio_features(np.zeros(16000, np.float32), n_frames=25, fps=25.0)
        >>> feats.shape
        (25, 16, 80)
    """
    config = config or AudioFeatureConfig()
    _check_config(config)
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
    window = _window(config)

    if config.kind == "mel":
        hop, frame_len, centre = _mel_geometry(config)
        extractor: _Extractor = _MelExtractor(config, device)
    else:
        model = _load_hf(config, weights=True).to(device)
        hop, frame_len = _conv_geometry(model.config)
        centre = (frame_len - 1) / 2.0
        extractor = _HFExtractor(model, config, samples, device)
    log.info(
        "Computing %s audio features for %d frames at %g fps (%.1f s of audio) on %s",
        config.kind, n_frames, fps, samples.shape[0] / AUDIO_RATE, device,
    )

    starts, pad_left = _window_starts(n_frames, fps, window, hop, centre)
    if n_frames == 0:
        return np.zeros((0, window, extractor.dim), np.float32)
    first, last = int(starts[0]), int(starts[-1]) + window - 1  # feature frames needed
    # The padded signal is ``pad_left`` zeros, the audio, then zeros up to the last frame needed.
    n_padded = max(pad_left + samples.shape[0], last * hop + frame_len)
    frames = extractor(samples, pad_left, n_padded, first, last + 1, progress)  # [last-first+1, D]
    index = starts[:, None] - first + np.arange(window)[None, :]  # [T, W]
    return np.ascontiguousarray(frames[index], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Alignment


def _window(config: AudioFeatureConfig) -> int:
    return DEFAULT_WINDOW[config.kind] if config.window is None else int(config.window)


def _window_starts(
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


def _padded_segment(
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
_Extractor = Callable[[np.ndarray, int, int, int, int, Optional[Progress]], np.ndarray]


# ----------------------------------------------------------------------------------------------
# mel


def _mel_geometry(config: AudioFeatureConfig) -> tuple[int, int, float]:
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


class _MelExtractor:
    """Log-mel frames with a fixed normalisation: ``dB / 50 + 1`` where dB is band power relative
    to a full-scale sine, floored at :data:`MEL_FLOOR_DB`.

    Silence reads -1 and a full-scale tone about +1 in its band. The scaling is fixed, not
    estimated per utterance, so new speech at render time lands on the training statistics; any
    learned normalisation belongs to the model.
    """

    def __init__(self, config: AudioFeatureConfig, device: torch.device):
        self.hop, self.n_fft, _ = _mel_geometry(config)
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
        report(_PROGRESS_STEP, 0, len(blocks))
        for i, a in enumerate(blocks):
            b = min(a + _MEL_BLOCK_FRAMES, stop)
            segment = _padded_segment(
                samples, pad_left, n_padded, a * self.hop, (b - 1) * self.hop + self.n_fft
            )
            mel = self._log_mel(torch.from_numpy(segment).to(self.device))  # [b - a, n_mels]
            out[a - first : b - first] = mel.cpu().numpy()
            report(_PROGRESS_STEP, i + 1, len(blocks))
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


# ----------------------------------------------------------------------------------------------
# hubert / wav2vec2


def _transformers(kind: str) -> Any:
    """The transformers module, imported here so that ``mel`` never needs it."""
    try:
        import transformers
    except ImportError as e:
        raise AvatarError(
            f"Audio features '{kind}' need the transformers package: install avatar[hubert] "
            f"(or pip install transformers), or use the 'mel' features, which need no weights."
        ) from e
    return transformers


def _load_hf(config: AudioFeatureConfig, weights: bool) -> Any:
    """The model (``weights=True``; eval mode, float32) or only its transformers config.

    Raises:
        AvatarError: transformers is missing, the files are not available locally, or the
            checkpoint is not of ``config.kind``.
        ValueError: ``config.layer`` does not exist in the model.
    """
    transformers = _transformers(config.kind)
    model_cls = transformers.HubertModel if config.kind == "hubert" else transformers.Wav2Vec2Model
    name = str(config.model)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        if weights and hf_config.model_type == config.kind:
            log.info("Loading %s model from %s", config.kind, name)
            model = model_cls.from_pretrained(name, config=hf_config, local_files_only=True)
    except (OSError, ValueError) as e:
        if "/" in name and not name.startswith((".", "/", "~")):
            where = f"run 'hf download {name}' once while online"
        else:
            where = "check the directory path, which must hold a save_pretrained model"
        raise AvatarError(
            f"No local {config.kind} {'weights' if weights else 'config'} found for {name!r}: "
            f"{where}, or use the 'mel' features, which need no weights."
        ) from e
    if hf_config.model_type != config.kind:
        other = hf_config.model_type
        hint = f"use '{other}:{name}'" if other in FEATURE_KINDS else "pick a hubert/wav2vec2 model"
        raise AvatarError(f"{name} holds a {other!r} model, not {config.kind!r}: {hint}.")
    n_layers = int(hf_config.num_hidden_layers)
    if not -(n_layers + 1) <= config.layer <= n_layers:
        raise ValueError(
            f"Audio feature layer {config.layer} does not exist in {name}, which has {n_layers} "
            f"layers; expected {-(n_layers + 1)}..{n_layers}."
        )
    return model.float().eval() if weights else hf_config


def _conv_geometry(hf_config: Any) -> tuple[int, int]:
    """``(hop, receptive_field)`` in samples of the convolutional feature encoder (320, 400)."""
    hop, field = 1, 1
    for kernel, stride in zip(hf_config.conv_kernel, hf_config.conv_stride):
        field += (kernel - 1) * hop
        hop *= stride
    return hop, field


class _HFExtractor:
    """Hidden states of a HuBERT/wav2vec 2.0 model, computed in overlapping chunks.

    Chunks are cut on a fixed grid of ``chunk_s`` of output frames in padded-signal coordinates;
    each is run with ``context_s`` of extra audio on both sides, which is then dropped. The
    features of a frame therefore do not depend on how many video frames are requested. They do
    differ slightly from running the whole utterance at once, because self-attention is global
    and checkpoints with ``feat_extract_norm="group"`` (the *base* models) normalise the first
    convolution over the whole input; ``chunk_s=None`` gives the unchunked result.
    """

    def __init__(
        self, model: Any, config: AudioFeatureConfig, samples: np.ndarray, device: torch.device
    ):
        self.model = model
        self.config = config
        self.device = device
        self.dim = int(model.config.hidden_size)
        self.hop, self.field = _conv_geometry(model.config)
        if config.normalize_waveform and samples.size:
            # Statistics of the real audio only; the zero padding then reads as the mean.
            self.mean = float(samples.mean(dtype=np.float64))
            self.inv_std = 1.0 / math.sqrt(float(samples.var(dtype=np.float64)) + 1e-7)
        else:
            self.mean, self.inv_std = 0.0, 1.0

    def __call__(
        self, samples: np.ndarray, pad_left: int, n_padded: int, first: int, stop: int,
        progress: Optional[Progress],
    ) -> np.ndarray:  # [stop - first, hidden]
        report = progress or null_progress
        hop, field = self.hop, self.field
        total = (n_padded - field) // hop + 1  # frames of the whole padded signal
        assert stop <= total, (stop, total)
        rate = AUDIO_RATE / hop
        if self.config.chunk_s is None:
            core, context = total, 0
        else:
            core = max(1, int(round(self.config.chunk_s * rate)))
            context = max(0, int(round(self.config.context_s * rate)))
        grid = range((first // core) * core, stop, core)
        out = np.empty((stop - first, self.dim), np.float32)
        report(_PROGRESS_STEP, 0, len(grid))
        for i, a in enumerate(grid):
            b = min(a + core, total)
            a_in, b_in = max(0, a - context), min(total, b + context)  # frames the model computes
            segment = _padded_segment(
                samples, pad_left, n_padded, a_in * hop, (b_in - 1) * hop + field,
                offset=self.mean, scale=self.inv_std,
            )
            hidden = self._hidden(torch.from_numpy(segment).to(self.device))  # [b_in - a_in, D]
            assert hidden.shape[0] == b_in - a_in, (hidden.shape, a_in, b_in)
            lo, hi = max(a, first), min(b, stop)
            out[lo - first : hi - first] = hidden[lo - a_in : hi - a_in].cpu().numpy()
            report(_PROGRESS_STEP, i + 1, len(grid))
        return out

    @torch.inference_mode()
    def _hidden(self, segment: torch.Tensor) -> torch.Tensor:  # [S] -> [K, D]
        if self.config.layer == -1:
            return self.model(segment[None]).last_hidden_state[0].float()
        result = self.model(segment[None], output_hidden_states=True)
        return result.hidden_states[self.config.layer][0].float()


def _check_config(config: AudioFeatureConfig) -> None:
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
    if not config.model:
        raise ValueError(
            f"Audio features {config.kind!r} need a model (a local directory or a cached hub "
            f"name), got none."
        )
    if config.chunk_s is not None and config.chunk_s <= 0:
        raise ValueError(f"Expected chunk_s > 0 or None, got {config.chunk_s}.")
    if config.context_s < 0:
        raise ValueError(f"Expected context_s >= 0, got {config.context_s}.")
