"""Tests for avatar.audio: shapes, alignment, padding, and the transformers loading path.

The hubert/wav2vec2 tests build tiny randomly initialised models from a config and save them to a
temporary directory, so the real ``from_pretrained(local_files_only=True)`` code runs without a
download.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from avatar.audio import (
    AudioFeatureConfig,
    compute_audio_features,
    feature_shape,
    parse_audio_feature_spec,
)
from avatar.errors import AvatarError
from avatar.media import AUDIO_RATE

MEL_HOP_S = 0.010


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The inputs here are tiny; one thread avoids oversubscription on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(seconds: float, seed: int = 0, level: float = 0.1) -> np.ndarray:
    n = int(round(seconds * AUDIO_RATE))
    return (np.random.default_rng(seed).standard_normal(n) * level).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# spec parsing and config checks


def test_parse_spec():
    assert parse_audio_feature_spec("mel") == AudioFeatureConfig()
    cfg = parse_audio_feature_spec("hubert:facebook/hubert-large-ls960-ft")
    assert (cfg.kind, cfg.model) == ("hubert", "facebook/hubert-large-ls960-ft")
    cfg = parse_audio_feature_spec("wav2vec2:C:\\models\\w2v")
    assert (cfg.kind, cfg.model) == ("wav2vec2", "C:\\models\\w2v")
    for bad in ("mfcc", "hubert", "hubert:", "mel:x", ""):
        with pytest.raises(ValueError, match="mel"):
            parse_audio_feature_spec(bad)


def test_feature_shape_mel():
    assert feature_shape(AudioFeatureConfig()) == (16, 80)
    assert feature_shape(AudioFeatureConfig(window=8, n_mels=40)) == (8, 40)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="mfcc"), dict(window=0), dict(fmax=9000.0), dict(n_mels=400), dict(kind="hubert")],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        compute_audio_features(noise(0.5), 5, 25.0, AudioFeatureConfig(**kwargs))


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        compute_audio_features(np.zeros((2, 100), np.float32), 5, 25.0)
    with pytest.raises(ValueError, match="fps"):
        compute_audio_features(noise(0.5), 5, 0.0)
    with pytest.raises(ValueError, match="n_frames"):
        compute_audio_features(noise(0.5), -1, 25.0)
    with pytest.raises(ValueError, match="NaN"):
        compute_audio_features(np.full(100, np.nan, np.float32), 5, 25.0)


# ----------------------------------------------------------------------------------------------
# mel


@pytest.mark.parametrize(
    "n_frames, fps", [(0, 25.0), (1, 25.0), (75, 25.0), (90, 30.0), (89, 29.97), (180, 60.0)]
)
def test_mel_shapes(n_frames, fps):
    feats = compute_audio_features(noise(3.0), n_frames, fps)
    assert feats.shape == (n_frames, 16, 80)
    assert feats.dtype == np.float32
    assert np.isfinite(feats).all()


def test_mel_window_option():
    feats = compute_audio_features(noise(1.0), 25, 25.0, AudioFeatureConfig(window=4, n_mels=40))
    assert feats.shape == (25, 4, 40)


def test_silence_is_finite_floor():
    feats = compute_audio_features(np.zeros(AUDIO_RATE, np.float32), 25, 25.0)
    assert np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, -1.0)


def test_full_scale_tone_reads_about_one():
    """The fixed normalisation: a full-scale sine reads ~+1 in its band, silence -1."""
    t = np.arange(AUDIO_RATE) / AUDIO_RATE
    tone = np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    feats = compute_audio_features(tone, 25, 25.0)
    assert 0.9 < feats[12].max() < 1.1


@pytest.mark.parametrize(
    "click_s, fps", [(1.013, 25.0), (0.5, 30.0), (1.2345, 29.97), (0.301, 60.0)]
)
def test_mel_alignment(click_s, fps):
    """A click at ``click_s`` sits in the window of frame round(click_s * fps), at the position
    given by its offset from each frame's centre (t + 0.5) / fps."""
    samples = noise(2.0, level=1e-4)
    samples[int(round(click_s * AUDIO_RATE))] = 1.0
    n_frames = int(2.0 * fps)
    feats = compute_audio_features(samples, n_frames, fps)
    window = feats.shape[1]
    loudness = feats.mean(axis=2)  # [T, W]

    t_click = int(round(click_s * fps))
    assert loudness[t_click].max() > -0.2  # the click is in that window ...
    assert loudness[t_click + window].max() < -0.6  # ... and not in a window far from it
    for t in range(n_frames):
        expected = (click_s - (t + 0.5) / fps) / MEL_HOP_S + (window - 1) / 2
        if 1 <= expected <= window - 2:
            found = int(loudness[t].argmax())
            assert abs(found - expected) <= 1.0, (t, expected, found)


def test_audio_shorter_than_video_is_padded_with_silence():
    feats = compute_audio_features(noise(0.5), 50, 25.0)  # 0.5 s of audio, 2 s of video
    assert feats.shape == (50, 16, 80)
    assert (feats[5] > -1.0).all()
    np.testing.assert_array_equal(feats[20:], -1.0)


def test_windows_before_start_are_padded():
    feats = compute_audio_features(noise(1.0), 25, 25.0)
    np.testing.assert_array_equal(feats[0, 0], -1.0)  # 55 ms before the audio starts
    assert (feats[0, -1] > -1.0).all()


def test_mel_deterministic_and_independent_of_frame_count():
    samples = noise(3.0, seed=3)
    a = compute_audio_features(samples, 75, 25.0)
    b = compute_audio_features(samples, 75, 25.0)
    c = compute_audio_features(samples, 40, 25.0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:40], c)


def test_progress_reported():
    calls = []
    compute_audio_features(noise(1.0), 25, 25.0, progress=lambda *args: calls.append(args))
    assert calls[0] == ("audio features", 0, 1) and calls[-1] == ("audio features", 1, 1)


# ----------------------------------------------------------------------------------------------
# hubert / wav2vec2 through transformers


def _tiny_model_dir(tmp_path_factory, kind: str, layers: int = 2) -> str:
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
    }[kind]
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
    )
    path = tmp_path_factory.mktemp(f"{kind}{layers}")
    model_cls(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory, "hubert")


@pytest.fixture(scope="module")
def wav2vec2_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory, "wav2vec2")


@pytest.fixture(scope="module")
def local_hubert_dir(tmp_path_factory):
    """No transformer layers and per-frame layer norm: every output frame depends only on nearby
    audio, so chunked and whole-utterance results must agree to float precision."""
    return _tiny_model_dir(tmp_path_factory, "hubert", layers=0)


@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
@pytest.mark.parametrize("n_frames, fps", [(0, 25.0), (1, 25.0), (50, 25.0), (59, 29.97)])
def test_hf_shapes(kind, n_frames, fps, hubert_dir, wav2vec2_dir):
    path = hubert_dir if kind == "hubert" else wav2vec2_dir
    config = parse_audio_feature_spec(f"{kind}:{path}")
    assert feature_shape(config) == (4, 32)
    feats = compute_audio_features(noise(2.0), n_frames, fps, config)
    assert feats.shape == (n_frames, 4, 32)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()


def test_hf_audio_shorter_than_video(hubert_dir):
    config = AudioFeatureConfig(kind="hubert", model=hubert_dir, window=2)
    feats = compute_audio_features(noise(0.3), 25, 25.0, config)
    assert feats.shape == (25, 2, 32) and np.isfinite(feats).all()


def test_hf_layer_choice(hubert_dir):
    samples = noise(1.0)

    def features(layer: int) -> np.ndarray:
        config = AudioFeatureConfig(kind="hubert", model=hubert_dir, layer=layer)
        return compute_audio_features(samples, 10, 25.0, config)

    last, layer2, layer0 = features(-1), features(2), features(0)
    np.testing.assert_allclose(last, layer2, atol=1e-5)
    assert not np.allclose(last, layer0)
    with pytest.raises(ValueError, match="layer"):
        features(3)


def test_hf_chunked_matches_whole(local_hubert_dir):
    """Chunking with enough context reproduces the whole-utterance features of a model whose
    frames see only nearby audio (here: conv encoder + 16-frame position conv, 0.16 s each way).

    Real checkpoints add global self-attention (and base models a group norm over the whole
    input), so there the match is only approximate; a randomly initialised attention layer
    attends almost uniformly to every frame, which would make a tolerance meaningless here.
    """
    samples = noise(3.0, seed=1)
    chunked = AudioFeatureConfig(kind="hubert", model=local_hubert_dir, chunk_s=0.5, context_s=0.4)
    whole = AudioFeatureConfig(kind="hubert", model=local_hubert_dir, chunk_s=None)
    calls = []
    a = compute_audio_features(samples, 75, 25.0, chunked, progress=lambda *a: calls.append(a))
    b = compute_audio_features(samples, 75, 25.0, whole)
    assert calls[-1][1] == calls[-1][2] >= 6  # several chunks ran
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_hf_frames_independent_of_frame_count(hubert_dir):
    """The chunk grid is fixed, so frame t's features do not depend on how many frames are
    requested."""
    config = AudioFeatureConfig(kind="hubert", model=hubert_dir, chunk_s=0.5, context_s=0.2)
    samples = noise(2.0, seed=2)
    a = compute_audio_features(samples, 50, 25.0, config)
    b = compute_audio_features(samples, 30, 25.0, config)
    np.testing.assert_allclose(a[:30], b, atol=1e-6)


def test_hf_missing_weights(tmp_path):
    pytest.importorskip("transformers")
    for model in (str(tmp_path / "nothing-here"), "nobody/no-such-model"):
        config = AudioFeatureConfig(kind="hubert", model=model)
        with pytest.raises(AvatarError, match="mel"):
            compute_audio_features(noise(0.5), 5, 25.0, config)
        with pytest.raises(AvatarError, match="mel"):
            feature_shape(config)


def test_hf_wrong_kind(hubert_dir):
    with pytest.raises(AvatarError, match="hubert:"):
        config = AudioFeatureConfig(kind="wav2vec2", model=hubert_dir)
        compute_audio_features(noise(0.5), 5, 25.0, config)


def test_missing_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(AvatarError, match="transformers"):
        compute_audio_features(noise(0.5), 5, 25.0, AudioFeatureConfig(kind="hubert", model="x/y"))
