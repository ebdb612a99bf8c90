"""avatar eval --drive: the avatar says another person's speech, its lips compared with the real ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.errors import InputError
from avatar.eval.drive import cross_correlation, load_driving_video, max_offset_frames, real_mouth_opening
from avatar.eval.landmarks import mouth_correlation
from tests.conftest import write_test_video


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def other_speaker(tmp_path_factory):
    """Another utterance (seed 1) of the synthetic sample, 2 s at 256 px: (video, true mouth opening [50])."""
    from avatar.sample import SampleConfig, make_sample

    paths = make_sample(tmp_path_factory.mktemp("drive") / "seed1", SampleConfig(seed=1, duration_s=2.0, size=256))
    return paths.video, np.load(paths.truth)["mouth_open"]


# ------------------------------------------------------------------------------- the measure


def test_real_mouth_follows_the_truth(other_speaker):
    video, truth = other_speaker
    opening = real_mouth_opening(video, 25.0)
    assert opening.shape == truth.shape and np.isfinite(opening).all()
    # Measured: r = 0.975 (seed 1, 2 s, 256 px; seed 2 gives 0.988, the same video at 128 px 0.964).
    assert mouth_correlation(opening, truth) > 0.9
    result = cross_correlation(opening, truth, 25.0)
    assert result["offset_ms"] == 0.0 and result["n_frames"] == len(truth)


def test_real_mouth_resampled_to_the_subject_fps(tmp_path):
    """A 30 fps video is measured at 25 fps: frame k is the one shown at k / 25 s."""
    from avatar.sample import SampleConfig, make_sample

    paths = make_sample(tmp_path / "s30", SampleConfig(seed=2, duration_s=2.0, size=192, fps=30))
    truth = np.load(paths.truth)["mouth_open"]
    opening = real_mouth_opening(paths.video, 25.0)
    assert len(opening) == 50
    at_25 = np.interp(np.arange(50) / 25.0, np.arange(len(truth)) / 30.0, truth)
    # Measured: r = 0.96 against the truth interpolated at 25 fps.
    result = cross_correlation(opening, at_25, 25.0)
    assert result["cross_mouth_corr"] > 0.9 and result["offset_ms"] == 0.0, result


@pytest.mark.parametrize("shift", [2, -2])
def test_offset_search_finds_a_known_shift(other_speaker, shift):
    """The avatar's mouth 2 frames late (shift 2) is found at +80 ms, 2 frames early at -80 ms."""
    video, truth = other_speaker
    real = real_mouth_opening(video, 25.0)
    late = np.full_like(truth, np.nan, dtype=np.float64)
    if shift > 0:
        late[shift:] = truth[:-shift]
    else:
        late[:shift] = truth[-shift:]
    result = cross_correlation(late, real, 25.0)
    assert result["offset_ms"] == pytest.approx(40.0 * shift)
    assert result["cross_mouth_corr"] > 0.9 and result["n_frames"] == len(truth) - abs(shift), result


def test_offset_window_and_missing_faces():
    assert max_offset_frames(25) == 2 and max_offset_frames(30) == 2 and max_offset_frames(50) == 4
    t = np.sin(np.arange(40) / 3.0)
    far = np.concatenate([np.full(4, np.nan), t[:-4]])  # 4 frames (160 ms) late: outside the window
    assert cross_correlation(far, t, 25.0)["offset_ms"] != 160.0
    holes = t.copy()
    holes[::4] = np.nan  # frames without a face are left out and counted
    result = cross_correlation(holes, t, 25.0)
    assert result["cross_mouth_corr"] == pytest.approx(1.0) and result["n_frames"] == 30
    none = cross_correlation(np.full(40, np.nan), t, 25.0)
    assert none["cross_mouth_corr"] is None and none["n_frames"] == 0


# ------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def face_run(small_subject, tmp_path_factory):
    """A run trained long enough (40 steps at 64 px) that mediapipe finds a face in its 256 px renders.

    The 6-step ``tiny_run`` is a blur of a head: whether mediapipe sees a face in it at 256 px
    turned on pixels around the head (35 of 50 frames over the plate, 1 over the frame's own pixels)."""
    from avatar.train import train
    from tests.conftest import tiny_train

    _, subject = small_subject
    run = tmp_path_factory.mktemp("face_run") / "run"
    train(subject, run, overrides={**tiny_train(40), "static_iterations": 30}, device="cpu")
    return run


def test_eval_drive_cli(face_run, other_speaker, tmp_path):
    """A run at 64 px renders faces mediapipe cannot find (0 of 50 frames); --drive-size 256 gives
    the judge faces to compare."""
    video, _ = other_speaker
    js, sbs = tmp_path / "m.json", tmp_path / "sbs"
    sbs.mkdir()
    result = _invoke("eval", face_run, "--drive", video, "--drive-size", 256, "--json", js, "--drive-video", sbs,
                     "--video", tmp_path / "val.mp4")
    assert result.exit_code == 0, result.output
    metrics = json.loads(js.read_text())
    assert "mouth_corr" in metrics and metrics["n_frames"] > 0  # the val split is still evaluated
    drive = metrics["drive"]["sample.mp4"]
    for key in ("cross_mouth_corr", "offset_ms", "n_frames"):
        assert isinstance(drive[key], (int, float)) and math.isfinite(drive[key]), drive
    assert abs(drive["offset_ms"]) <= 80.0 and 3 <= drive["n_frames"] <= drive["n_frames_total"] == 50
    assert metrics["cross_mouth_corr"] == drive["cross_mouth_corr"]
    info = media.probe(sbs / "drive_sample.mp4")
    assert (info.width, info.height) == (512, 256) and info.has_audio


def _faceless(path, n_frames: int, audio_seconds=None):
    return write_test_video(path, lambda i: np.full((96, 96, 3), 90 + i % 5, np.uint8), n_frames,
                            audio_seconds=audio_seconds)


@pytest.mark.parametrize("case, message", [
    ("no_face", "no face was found"),
    ("no_audio", "has no audio track"),
    ("short", "lasts only"),
])
def test_eval_drive_bad_video_is_one_sentence(tiny_run, tmp_path, case, message):
    video = {"no_face": lambda p: _faceless(p, 30),
             "no_audio": lambda p: _faceless(p, 30, audio_seconds=0),
             "short": lambda p: _faceless(p, 12)}[case](tmp_path / f"{case}.mp4")
    js = tmp_path / "m.json"
    result = _invoke("eval", tiny_run, "--drive", video, "--json", js)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].count(". ") == 0 and errors[0].endswith("."), result.output
    assert not js.exists()


def test_load_driving_video_refuses_silence(tmp_path):
    video = tmp_path / "silent.mp4"
    media.write_video(video, (np.zeros((64, 64, 3), np.uint8) for _ in range(30)), fps=25,
                      audio=media.write_wav(tmp_path / "silence.wav", np.zeros(16000 * 2)))
    with pytest.raises(InputError, match="silent"):
        load_driving_video(video, 25.0, tmp_path / "speech.wav")


def test_eval_drive_never_writes_over_a_driving_video(tiny_run, other_speaker, tmp_path):
    video, _ = other_speaker
    before = video.read_bytes()
    result = _invoke("eval", tiny_run, "--drive", video, "--json", video)
    assert result.exit_code == 1 and "is also an input" in result.output, result.output
    assert video.read_bytes() == before
    result = _invoke("eval", tiny_run, "--drive", video, "--drive-video", tmp_path / "missing")
    assert result.exit_code == 1 and "does not exist" in result.output, result.output
