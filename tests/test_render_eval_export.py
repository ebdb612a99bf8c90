"""Render new speech, evaluate, export: the user's payoff commands on a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.export import gaussian_arrays, read_ply
from avatar.render.speech import auto_blinks, blink_events, loop_indices, pose_track
from avatar.subject import MASK_LEGEND
from avatar.train.trainer import load_model
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
    config, _, _ = load_model(tiny_run)
    tracks = np.load(f"{config.subject}/tracks.npz")
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
    assert not list(out.parent.glob(".*partial*")) if out.parent.exists() else True


def test_eval_writes_json_and_video(tiny_run, tmp_path):
    js = tmp_path / "m.json"
    video = tmp_path / "side.mp4"
    result = _invoke("eval", tiny_run, "--json", js, "--video", video)
    assert result.exit_code == 0, result.output
    metrics = json.loads(js.read_text())
    for key in ("psnr", "psnr_head", "ssim", "lpips", "lmd", "mouth_corr", "n_frames", "render_fps",
                "resolution", "device"):
        assert key in metrics
    assert metrics["n_frames"] > 0 and metrics["psnr"] > 5
    # The per-region breakdown covers every label and its shares add up to the whole error.
    assert set(metrics["region_psnr"]) == set(MASK_LEGEND.values())
    assert sum(metrics["region_error_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert metrics["region_psnr"]["face"] is not None and metrics["region_psnr"]["face"] > 5
    info = media.probe(video)
    assert info.width == 2 * metrics["resolution"] and info.has_audio


def test_export_ply_round_trip(tiny_run, tmp_path):
    out = tmp_path / "head.ply"
    result = _invoke("export", tiny_run, "-o", out)
    assert result.exit_code == 0, result.output
    table = read_ply(out)
    _, model, _ = load_model(tiny_run)
    arrays = gaussian_arrays(model)
    n = len(arrays["means"])
    assert len(table["x"]) == n
    np.testing.assert_allclose(np.stack([table["x"], table["y"], table["z"]], 1), arrays["means"], rtol=1e-6)
    np.testing.assert_allclose(table["opacity"], arrays["opacity_logits"], rtol=1e-6)
    np.testing.assert_allclose(np.stack([table[f"scale_{i}"] for i in range(3)], 1), arrays["log_scales"], rtol=1e-6)
    np.testing.assert_allclose(np.stack([table[f"rot_{i}"] for i in range(4)], 1), arrays["quats"], rtol=1e-6)
    np.testing.assert_allclose(np.stack([table[f"f_dc_{i}"] for i in range(3)], 1), arrays["sh"][:, 0], rtol=1e-6)


def test_pose_loop_has_no_jump_and_blinks_are_natural():
    train_idx = np.arange(10, 20)
    seq = loop_indices(train_idx, 50)
    assert np.abs(np.diff(seq)).max() == 1
    frames, c2w = pose_track("loop", 30, train_idx, 40)
    assert c2w is None and len(frames) == 30
    subject = np.zeros((500, 2), np.float32)
    for start in range(20, 500, 90):  # a blink every 3.6 s
        subject[start:start + 5] = [[0.4, 0.4], [0.9, 0.9], [1.0, 1.0], [0.9, 0.9], [0.4, 0.4]]
    blinks = auto_blinks(subject, 25 * 60, 25.0, seed=0)
    events = blink_events(blinks.mean(axis=1))
    gaps = np.diff([a for a, _ in events]) / 25.0
    assert 8 <= len(events) <= 30 and np.all(gaps >= 1.0)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "-o", str(out), "--iters", "60"])
    assert result.exit_code == 0, result.output
    info = media.probe(out / "avatar_says_new_speech.mp4")
    assert info.has_audio and info.duration_s == pytest.approx(8.0, abs=0.1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_frames"] > 0 and metrics["psnr"] > 15


def test_run_from_another_version_is_refused(tiny_run, tmp_path):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(tiny_run, old)
    config = json.loads((old / "config.json").read_text())
    config["format_version"] = 0
    (old / "config.json").write_text(json.dumps(config))
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    result = _invoke("render", old, "--audio", speech, "-o", tmp_path / "o.mp4")
    assert result.exit_code == 1 and "train it again" in result.output, result.output
    broken = tmp_path / "broken_run"
    shutil.copytree(tiny_run, broken)
    for ckpt in (broken / "checkpoints").glob("*.safetensors"):
        ckpt.write_bytes(b"not a checkpoint")
    result = _invoke("export", broken, "-o", tmp_path / "x.ply")
    assert result.exit_code == 1 and "unreadable" in result.output, result.output
