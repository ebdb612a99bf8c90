"""Tests of the synthetic sample subject (avatar.sample)."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.media import AUDIO_RATE, iter_frames, probe, read_wav
from avatar.sample import SampleConfig, SamplePaths, make_sample

SIZE = 256
SECONDS = 3.0
FPS = 25
N_FRAMES = int(SECONDS * FPS)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[SamplePaths, list[tuple[str, int, int | None]]]:
    """One short, small sample shared by the tests, with the progress calls it made."""
    calls: list[tuple[str, int, int | None]] = []
    out = tmp_path_factory.mktemp("sample") / "nested" / "dir"  # created by make_sample
    paths = make_sample(out, SampleConfig(seed=0, duration_s=SECONDS, fps=FPS, size=SIZE),
                        progress=lambda step, done, total: calls.append((step, done, total)))
    return paths, calls


@pytest.fixture(scope="module")
def frames(sample) -> np.ndarray:
    paths, _ = sample
    return np.stack(list(iter_frames(paths.video)))


def test_files_and_streams(sample, frames):
    paths, _ = sample
    assert paths.video.name == "sample.mp4" and paths.video.is_file()
    assert paths.audio.name == "sample.wav" and paths.audio.is_file()
    assert paths.truth.name == "sample_truth.npz" and paths.truth.is_file()
    info = probe(paths.video)
    assert info.has_video and info.has_audio
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert (info.width, info.height) == (SIZE, SIZE)
    assert info.fps == pytest.approx(FPS)
    assert info.duration_s == pytest.approx(SECONDS, abs=0.1)
    assert frames.shape == (N_FRAMES, SIZE, SIZE, 3)
    audio, rate = read_wav(paths.audio)
    assert rate == AUDIO_RATE
    assert len(audio) == int(SECONDS * AUDIO_RATE)
    assert 0.3 < np.abs(audio).max() <= 1.0


def test_no_stray_files(sample):
    paths, _ = sample
    assert sorted(p.name for p in paths.video.parent.iterdir()) == [
        "sample.mp4", "sample.wav", "sample_truth.npz"]


def test_progress_reported(sample):
    _, calls = sample
    assert calls[0] == ("sample", 0, N_FRAMES)
    assert calls[-1] == ("sample", N_FRAMES, N_FRAMES)


def test_truth_arrays(sample):
    paths, _ = sample
    truth = np.load(paths.truth)
    for key in ("mouth_open", "mouth_width", "blink", "rotation_deg", "scale", "audio_envelope"):
        assert truth[key].shape == (N_FRAMES,), key
        assert np.isfinite(truth[key]).all(), key
    assert truth["translation_px"].shape == (N_FRAMES, 2)
    for key in ("mouth_open", "blink", "audio_envelope"):
        assert truth[key].min() >= 0.0 and truth[key].max() <= 1.0, key
    assert truth["mouth_open"].max() > 0.5 and truth["mouth_open"].min() < 0.05
    assert -1.0 <= truth["mouth_width"].min() and truth["mouth_width"].max() <= 1.0
    assert np.abs(truth["rotation_deg"]).max() < 6.0
    assert np.abs(truth["translation_px"]).max() < 0.05 * SIZE
    assert np.abs(truth["scale"] - 1.0).max() < 0.05
    assert int(truth["fps"]) == FPS and int(truth["seed"]) == 0
    # Smooth head motion: no jumps between frames.
    assert np.abs(np.diff(truth["rotation_deg"])).max() < 0.5


def test_mouth_follows_audio(sample):
    truth = np.load(sample[0].truth)
    r = np.corrcoef(truth["mouth_open"], truth["audio_envelope"])[0, 1]
    assert r > 0.5, r


def test_video_follows_truth(sample, frames):
    """The rendered mouth darkens (cavity) as it opens, and the backdrop stays still."""
    truth = np.load(sample[0].truth)
    gray = frames.astype(np.float32).mean(axis=3)
    s = SIZE
    mouth = gray[:, int(0.40 * s) : int(0.54 * s), int(0.38 * s) : int(0.62 * s)]
    dark = (mouth < 80).mean(axis=(1, 2))
    r = np.corrcoef(dark, truth["mouth_open"])[0, 1]
    assert r > 0.7, r
    corner = frames[:, : s // 10, : s // 10].astype(np.float32)
    assert np.abs(corner - corner[0]).mean() < 2.0


def test_deterministic_and_seeded(sample, tmp_path):
    cfg = SampleConfig(seed=0, duration_s=SECONDS, fps=FPS, size=128)
    a = make_sample(tmp_path / "a", cfg)
    b = make_sample(tmp_path / "b", cfg)
    c = make_sample(tmp_path / "c", SampleConfig(seed=1, duration_s=SECONDS, fps=FPS, size=64))
    ta, tb, tc = (np.load(p.truth) for p in (a, b, c))
    assert sorted(ta.files) == sorted(tb.files)
    for key in ta.files:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    assert a.audio.read_bytes() == b.audio.read_bytes()
    assert a.audio.read_bytes() != c.audio.read_bytes()
    assert not np.allclose(ta["mouth_open"], tc["mouth_open"])
    assert not np.allclose(ta["rotation_deg"], tc["rotation_deg"])
    # The utterance does not depend on the frame size: same speech as the 256 px fixture.
    fixture = np.load(sample[0].truth)
    assert a.audio.read_bytes() == sample[0].audio.read_bytes()
    np.testing.assert_array_equal(ta["mouth_open"], fixture["mouth_open"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(duration_s=0.5), "duration_s"),
    (dict(duration_s=float("nan")), "duration_s"),
    (dict(size=255), "even"),
    (dict(size=32), "size"),
    (dict(fps=0), "fps"),
    (dict(seed=1.5), "seed"),
])
def test_invalid_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sample(tmp_path / "out", SampleConfig(**kwargs))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mediapipe_tracks_sample(tmp_path):
    """The project's landmark tracker follows the face, the jaw opening and the blinks."""
    import mediapipe as mp

    paths = make_sample(tmp_path, SampleConfig(seed=3, duration_s=8.0))
    truth = np.load(paths.truth)
    lips, eyes, found = [], [], []
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1,
                                         refine_landmarks=True) as mesh:
        for frame in iter_frames(paths.video):
            result = mesh.process(frame)
            found.append(bool(result.multi_face_landmarks))
            if not result.multi_face_landmarks:
                lips.append(np.nan)
                eyes.append(np.nan)
                continue
            h, w = frame.shape[:2]
            p = np.array([[q.x * w, q.y * h] for q in result.multi_face_landmarks[0].landmark])
            scale = np.linalg.norm(p[33] - p[263])
            lips.append(np.linalg.norm(p[13] - p[14]) / scale)
            eyes.append((np.linalg.norm(p[159] - p[145]) + np.linalg.norm(p[386] - p[374])) / scale)
    found = np.array(found)
    assert found.mean() >= 0.95
    lips, eyes = np.array(lips)[found], np.array(eyes)[found]
    assert np.corrcoef(lips, truth["mouth_open"][found])[0, 1] > 0.9
    assert np.corrcoef(eyes, truth["blink"][found])[0, 1] < -0.7
