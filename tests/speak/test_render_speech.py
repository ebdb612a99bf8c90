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
    bad = _invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "p.mp4", "--pose", tmp_path / "nope.npz")
    assert bad.exit_code == 1 and "--pose" in bad.output


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
