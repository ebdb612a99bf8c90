from pathlib import Path

import numpy as np
import pytest

from avatar import media
from avatar.errors import InputError
from tests.conftest import tone


def _frames(n: int, w: int = 96, h: int = 64):
    for i in range(n):
        yield np.full((h, w, 3), (i * 7) % 256, np.uint8)


def test_write_probe_and_read_back(tmp_path: Path):
    wav = media.write_wav(tmp_path / "a.wav", tone(2.0))
    out = media.write_video(tmp_path / "v.mp4", _frames(50), fps=25, audio=wav)
    info = media.probe(out)
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (96, 64)
    assert info.fps == pytest.approx(25)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    frames = list(media.iter_frames(out))
    assert len(frames) == 50 and frames[0].shape == (64, 96, 3)
    audio = media.load_audio(out)
    assert len(audio) == pytest.approx(32000, abs=1600)
    assert not list(tmp_path.glob(".*partial*")), "temporary files must be gone"


def test_iter_frames_resamples_crops_and_resizes(tmp_path: Path):
    out = media.write_video(tmp_path / "v.mp4", _frames(30), fps=30)
    frames = list(media.iter_frames(out, fps=15, crop=media.Crop(8, 4, 64, 48), size=(32, 24)))
    assert len(frames) == 15
    assert frames[0].shape == (24, 32, 3)


def test_wav_round_trip(tmp_path: Path):
    x = tone(0.5)
    media.write_wav(tmp_path / "t.wav", x)
    y, rate = media.read_wav(tmp_path / "t.wav")
    assert rate == media.AUDIO_RATE
    np.testing.assert_allclose(x, y, atol=1e-4)


def test_unreadable_inputs_raise_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        media.probe(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a readable"):
        media.probe(junk)
    silent = media.write_video(tmp_path / "silent.mp4", _frames(10), fps=25)
    with pytest.raises(InputError, match="no audio stream"):
        media.load_audio(silent)


def test_failed_write_leaves_nothing(tmp_path: Path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with media.VideoWriter(target, fps=25) as writer:
            for frame in _frames(5):
                writer.write(frame)
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_in_missing_directory(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        media.write_wav(tmp_path / "nope" / "a.wav", tone(0.1))
