"""avatar render: new speech in, an mp4 of the avatar saying it out."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.run import load_avatar
from tests.conftest import tone


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_render_duration_audio_and_frames(tiny_run, tmp_path):
    speech = media.write_wav(tmp_path / "speech.wav", tone(2.02))
    out = tmp_path / "out.mp4"
    result = _invoke("render", tiny_run, "--audio", speech, "-o", out, "--size", "96")
    assert result.exit_code == 0, result.output
    info = media.probe(out)
    assert info.has_audio and info.has_video and (info.width, info.height) == (96, 96)
    assert abs(info.duration_s - 2.02) <= 1 / 25 + 0.03
    assert len(list(media.iter_frames(out))) == round(2.02 * 25)
    assert "frames/s" in result.output


def test_render_pose_and_blink_options(tiny_run, tmp_path):
    speech = media.write_wav(tmp_path / "speech.wav", tone(1.0))
    for pose, blink in (("static", "none"), ("static:3", "auto")):
        out = tmp_path / f"{pose.replace(':', '_')}.mp4"
        result = _invoke("render", tiny_run, "--audio", speech, "-o", out, "--pose", pose, "--blink", blink)
        assert result.exit_code == 0, result.output
    tracks = np.load(load_avatar(tiny_run).subject_dir / "tracks.npz")
    poses = tmp_path / "poses.npz"
    np.savez(poses, cam_to_world=tracks["cam_to_world"][:5], frame_index=np.arange(5))
    result = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "posed.mp4", "--pose", poses)
    assert result.exit_code == 0, result.output
    # A pose file is not the frames' poses: the face composite renders the whole head, as --background frame.
    whole = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "posed_frame.mp4", "--pose", poses,
                    "--background", "frame")
    assert whole.exit_code == 0, whole.output
    np.testing.assert_array_equal(np.stack(list(media.iter_frames(tmp_path / "posed.mp4"))),
                                  np.stack(list(media.iter_frames(tmp_path / "posed_frame.mp4"))))
    bad = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "p.mp4", "--pose", tmp_path / "nope.npz")
    assert bad.exit_code == 1 and "--pose" in bad.output
    for background in ("plate", "frame"):
        result = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / f"{background}.mp4", "--pose",
                         "static", "--blink", "none", "--background", background)
        assert result.exit_code == 0, result.output
    face = np.stack(list(media.iter_frames(tmp_path / "static.mp4"))).astype(float)  # the default: face
    over_frame = np.stack(list(media.iter_frames(tmp_path / "frame.mp4"))).astype(float)
    over_plate = np.stack(list(media.iter_frames(tmp_path / "plate.mp4"))).astype(float)
    assert face.shape == over_frame.shape == over_plate.shape
    assert np.abs(over_frame - over_plate).mean() > 0.1 and np.abs(face - over_frame).mean() > 0.1
    wrong = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "w.mp4", "--background", "wall")
    assert wrong.exit_code == 2 and "--background" in wrong.output


@pytest.mark.parametrize("case", ["silent", "empty", "missing_dir", "corrupt", "bad_run"])
def test_render_bad_input(case, tiny_run, tmp_path):
    out = tmp_path / "out.mp4"
    run = tiny_run
    if case == "silent":
        speech = media.write_wav(tmp_path / "s.wav", np.zeros(16000, np.float32))
        want = "silent"
    elif case == "empty":
        speech = media.write_wav(tmp_path / "e.wav", np.zeros(0, np.float32))
        want = "audio"
    elif case == "missing_dir":
        speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
        out = tmp_path / "nowhere" / "out.mp4"
        want = "does not exist"
    elif case == "corrupt":
        speech = tmp_path / "c.mp3"
        speech.write_bytes(b"\x00\x01garbage" * 100)
        want = "c.mp3"
    else:
        speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
        run = tmp_path / "not_a_run"
        run.mkdir()
        want = "not a run directory"
    result = _invoke("render", run, "--audio", speech, "-o", out)
    assert result.exit_code == 1, result.output
    assert want.lower() in result.output.lower(), result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    if out.parent.exists():
        assert not list(out.parent.glob(".*partial*"))


def test_render_refuses_to_write_over_its_own_input(tiny_run, tmp_path):
    """Before: `avatar render RUN --audio X -o X` encoded over the speech it was reading (rc 0)."""
    speech_wav = media.write_wav(tmp_path / "s.wav", tone(1.0))
    speech = tmp_path / "speech.mp4"
    assert _invoke("render", tiny_run, "--audio", speech_wav, "-o", speech).exit_code == 0
    before = speech.read_bytes()
    (tmp_path / "link.mp4").hardlink_to(speech)
    for output in (speech, tmp_path / "link.mp4"):
        result = _invoke("render", tiny_run, "--audio", speech, "-o", output)
        assert result.exit_code == 1 and "is also an input" in result.output, result.output
    assert speech.read_bytes() == before
    result = _invoke("render", tiny_run, "--audio", speech_wav, "-o", tiny_run / "checkpoints" / "x.mp4")
    assert result.exit_code == 1 and "input" in result.output, result.output


def test_render_sizes_are_checked_and_odd_ones_rounded_up(tiny_run, tmp_path, caplog):
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    for size in ("0", "-8", "15"):
        result = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "o.mp4", "--size", size)
        assert result.exit_code == 2 and "--size" in result.output, result.output
    assert _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "o.mp4", "--batch", "0").exit_code == 2
    with caplog.at_level("WARNING"):
        result = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "o.mp4", "--size", "97")
    assert result.exit_code == 0, result.output
    assert "even size" in caplog.text
    info = media.probe(tmp_path / "o.mp4")
    assert (info.width, info.height) == (98, 98)


def test_a_killed_renders_leftovers_are_removed_by_the_next(tiny_run, tmp_path, dead_pid, monkeypatch):
    """kill -9 leaves `.NAME.partialPID.mp4` by the output and a scratch directory in the temp dir."""
    import os

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    partial = out_dir / f".old.partial{dead_pid}.mp4"
    partial.write_bytes(b"half a video")
    scratch = temp / f"avatar-render-pid{dead_pid}-abcd"
    scratch.mkdir()
    (scratch / "speech.wav").write_bytes(b"RIFF")
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    assert _invoke("render", tiny_run, "--audio", speech, "-o", out_dir / "new.mp4").exit_code == 0
    assert not partial.exists() and not scratch.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == ["new.mp4"]
    assert not [p for p in temp.iterdir() if f"pid{os.getpid()}" in p.name], "this render's scratch is gone too"
