"""Each kind of bad input gets one clear sentence, a non-zero exit, and no subject.json."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.subject import SubjectPaths, read_manifest
from tests.conftest import moving_portrait, write_test_video

FPS = 25


def _run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def _assert_clean_failure(result, pattern: str, out: Path | None = None):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert pattern.lower() in result.output.lower(), result.output
    if out is not None:
        assert not SubjectPaths(out).manifest.exists()


def _gradient(i: int) -> np.ndarray:
    x = np.linspace(0, 255, 256, dtype=np.float32)
    img = np.stack(np.meshgrid(x, x), -1).mean(-1)
    img = (img + 3 * i) % 256
    return np.repeat(img[:, :, None], 3, axis=2).astype(np.uint8)


def test_no_face_anywhere(tmp_path):
    video = write_test_video(tmp_path / "noface.mp4", _gradient, 6 * FPS)
    out = tmp_path / "subj"
    _assert_clean_failure(_run("preprocess", str(video), "-o", str(out), "--size", "256"), "no face", out)


def test_no_audio_stream(tmp_path, astronaut):
    video = write_test_video(tmp_path / "mute.mp4", moving_portrait(astronaut), 6 * FPS, audio_seconds=0)
    out = tmp_path / "subj"
    _assert_clean_failure(_run("preprocess", str(video), "-o", str(out)), "--audio", out)
    assert not out.exists(), "nothing is created before the input is known to be usable"


def test_too_short(tmp_path, astronaut):
    video = write_test_video(tmp_path / "short.mp4", moving_portrait(astronaut), 3 * FPS)
    _assert_clean_failure(_run("preprocess", str(video), "-o", str(tmp_path / "s")), "at least 5 s")


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    _assert_clean_failure(_run("preprocess", str(text), "-o", str(tmp_path / "s")), "not a readable")
    wav = media.write_wav(tmp_path / "speech.wav", np.zeros(16000 * 6, np.float32))
    _assert_clean_failure(_run("preprocess", str(wav), "-o", str(tmp_path / "s")), "no video stream")
    _assert_clean_failure(_run("preprocess", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "s")),
                          "does not exist")


def test_truncated_file(tmp_path, astronaut):
    video = write_test_video(tmp_path / "full.mp4", moving_portrait(astronaut), 6 * FPS)
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    out = tmp_path / "subj"
    result = _run("preprocess", str(cut), "-o", str(out), "--size", "256")
    _assert_clean_failure(result, str(cut), out)


def test_output_directory_that_is_not_a_subject(tmp_path, astronaut):
    video = write_test_video(tmp_path / "v.mp4", moving_portrait(astronaut), 6 * FPS)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    _assert_clean_failure(_run("preprocess", str(video), "-o", str(out), "--force"), "not a subject directory")
    assert (out / "holiday.jpg").exists()


def _face_then_nothing(image: np.ndarray, face_frames: int):
    portrait = moving_portrait(image)

    def frame(i: int) -> np.ndarray:
        return portrait(i) if i < face_frames else np.full((256, 256, 3), 90, np.uint8)

    return frame


def test_face_lost_for_most_of_the_video(tmp_path, astronaut):
    video = write_test_video(tmp_path / "lost.mp4", _face_then_nothing(astronaut, 2 * FPS), 6 * FPS)
    out = tmp_path / "subj"
    _assert_clean_failure(_run("preprocess", str(video), "-o", str(out), "--size", "256"), "tracked in only", out)


def _two_faces(image: np.ndarray):
    big = moving_portrait(image, 320)
    small = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)

    def frame(i: int) -> np.ndarray:
        canvas = np.full((320, 576, 3), 60, np.uint8)
        canvas[:, :320] = big(i)
        canvas[48:272, 336:560] = small
        return canvas

    return frame


def test_two_faces_short_audio_resume_and_replace(tmp_path, astronaut):
    """Two faces: the larger is used and the user is told; short audio is padded; a re-run resumes."""
    n = int(5.6 * FPS)
    video = write_test_video(tmp_path / "two.mp4", _two_faces(astronaut), n, audio_seconds=3.0)
    out = tmp_path / "subj"
    result = _run("preprocess", str(video), "-o", str(out), "--size", "256")
    assert result.exit_code == 0, result.output
    assert "largest" in result.output
    manifest = read_manifest(out)
    assert manifest.n_frames == n
    # the crop is around the big face on the left, not the small one on the right
    assert manifest.crop["x"] + manifest.crop["w"] / 2 < 320
    samples, rate = media.read_wav(out / "audio.wav")
    assert len(samples) == pytest.approx(n / FPS * rate, abs=rate / FPS)
    assert np.abs(samples[int(4 * rate):]).max() == 0.0, "missing audio is padded with silence"

    again = _run("preprocess", str(video), "-o", str(out), "--size", "256")
    assert again.exit_code == 0, again.output
    assert "cached: detect, track" in again.output

    other = write_test_video(tmp_path / "other.mp4", moving_portrait(astronaut), 6 * FPS)
    _assert_clean_failure(_run("preprocess", str(other), "-o", str(out)), "--force")
    assert read_manifest(out).n_frames == n, "the existing subject is left untouched"


@pytest.mark.parametrize("size", ["100000", "8", "255"])
def test_impossible_crop_size_is_refused_before_anything_is_written(tmp_path, astronaut, size):
    video = write_test_video(tmp_path / "v.mp4", moving_portrait(astronaut), 6 * FPS)
    out = tmp_path / "subj"
    result = _run("preprocess", str(video), "-o", str(out), "--size", size)
    assert result.exit_code == 2 and "size" in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("speech", ["empty", "silent"])
def test_speech_without_sound_is_refused(tmp_path, astronaut, speech):
    video = write_test_video(tmp_path / "v.mp4", moving_portrait(astronaut), 6 * FPS)
    samples = np.zeros(0 if speech == "empty" else 6 * media.AUDIO_RATE, np.float32)
    wav = media.write_wav(tmp_path / f"{speech}.wav", samples)
    out = tmp_path / "subj"
    result = _run("preprocess", str(video), "-o", str(out), "--size", "128", "--audio", str(wav))
    _assert_clean_failure(result, "no audio samples" if speech == "empty" else "silent", out)
