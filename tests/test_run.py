"""The run directory: versions, broken checkpoints (verified, skipped for the newest complete one), a subject that moved."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.errors import AvatarError
from tests.conftest import tone


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_from_another_version_is_refused(tiny_run, tmp_path):
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
    assert result.exit_code == 1 and "no checkpoint" in result.output and "--force" in result.output, result.output


def test_a_run_finds_its_subject_after_both_move_and_asks_for_it_otherwise(tiny_run, tmp_path):
    from avatar.run import load_avatar

    config = json.loads((tiny_run / "config.json").read_text())
    assert not config["subject"].startswith("/"), "stored relative to the run, so both can move together"
    subject = load_avatar(tiny_run).subject_dir
    # Move run and subject together (keeping their relative places): found without help.
    home = tmp_path / "moved"
    run_rel = tiny_run.relative_to(tiny_run.parents[2])
    subject_rel = subject.resolve().relative_to(tiny_run.parents[2].resolve())
    shutil.copytree(tiny_run, home / run_rel)
    shutil.copytree(subject, home / subject_rel, ignore=shutil.ignore_patterns(".cache", ".work"))
    moved = load_avatar(home / run_rel)
    assert moved.subject_dir.resolve() == (home / subject_rel).resolve()
    # The run alone somewhere else, its subject's old places gone: one clear sentence naming --subject.
    alone = tmp_path / "alone_run"
    shutil.copytree(tiny_run, alone)
    config["subject"] = "../nowhere"
    config["subject_absolute"] = str(tmp_path / "gone")
    (alone / "config.json").write_text(json.dumps(config))
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    result = _invoke("render", alone, "--audio", speech, "-o", tmp_path / "o.mp4")
    assert result.exit_code == 1 and "--subject" in result.output and "Traceback" not in result.output, result.output
    result = _invoke("render", alone, "--audio", speech, "-o", tmp_path / "o.mp4", "--subject", home / subject_rel)
    assert result.exit_code == 0, result.output
    result = _invoke("eval", alone, "--subject", tmp_path, "--json", tmp_path / "m.json")
    assert result.exit_code == 1 and "not a subject directory" in result.output, result.output
    # export needs no subject at all
    assert _invoke("export", alone, "-o", tmp_path / "x.ply").exit_code == 0


def test_runs_written_before_the_motion_condition_was_named_still_load(tiny_run, tmp_path):
    """Runs of the same format whose config and checkpoint say eye_* for the motion condition."""
    import torch
    from safetensors.torch import load_file, save_file

    from avatar.run import load_avatar

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    config = json.loads((old / "config.json").read_text())
    config["model"]["eye_features"] = config["model"].pop("motion_features")
    config["model"]["face"]["eye_dim"] = config["model"]["face"].pop("motion_dim")
    config["subject"] = config["subject_absolute"]
    (old / "config.json").write_text(json.dumps(config))
    for ckpt in (old / "checkpoints").glob("*.safetensors"):
        tensors = load_file(str(ckpt))
        save_file({k.replace("motion_proj", "eye_proj"): v for k, v in tensors.items()}, str(ckpt))
        meta_path = ckpt.with_suffix(".json")  # written before checkpoints recorded their size and checksum
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("size", "sha256")}))
    new, legacy = load_avatar(tiny_run, "cpu").model, load_avatar(old, "cpu").model
    assert legacy.motion_features == new.motion_features
    for name, value in new.state_dict().items():
        torch.testing.assert_close(legacy.state_dict()[name], value)


def _truncate(path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_complete_one(tiny_run, tmp_path, caplog):
    """Before: a truncated newest checkpoint blocked export, render and --resume although step 3 was whole."""
    from avatar.run import RunPaths, load_avatar

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    paths = RunPaths(run)
    assert paths.checkpoint_steps() == [6, 3]
    _truncate(paths.checkpoint(6)[0])
    with caplog.at_level("WARNING"):
        assert load_avatar(run, "cpu").step == 3
    assert "using step 3" in caplog.text and "step_000006" in caplog.text
    assert _invoke("export", run, "-o", tmp_path / "x.ply").exit_code == 0
    result = _invoke("export", run, "-o", tmp_path / "y.ply", "--step", "6")
    assert result.exit_code == 1 and "broken" in result.output and "--step" in result.output, result.output
    result = _invoke("export", run, "-o", tmp_path / "y.ply", "--step", "5")
    assert result.exit_code == 1 and "it has: 3, 6" in result.output, result.output
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    result = _invoke("render", run, "--audio", speech, "-o", tmp_path / "o.mp4", "--step", "3")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["flip_a_data_byte", "flip_a_header_byte", "step_abc", "json_bytes", "size"])
def test_every_kind_of_damaged_checkpoint_is_detected(tiny_run, tmp_path, damage):
    from avatar.run import RunPaths, load_checkpoint, verify_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    paths = RunPaths(run)
    st, js = paths.checkpoint(6)
    if damage in ("flip_a_data_byte", "flip_a_header_byte"):
        data = bytearray(st.read_bytes())
        at = len(data) - 100 if damage == "flip_a_data_byte" else 20
        data[at] ^= 0xFF
        st.write_bytes(bytes(data))
    elif damage == "step_abc":
        js.write_text(js.read_text().replace('"step": 6', '"step": "abc"'))
    elif damage == "json_bytes":
        js.write_bytes(bytes(range(256)))
    else:
        meta = json.loads(js.read_text())
        meta["size"] += 1
        js.write_text(json.dumps(meta))
    with pytest.raises(AvatarError):
        verify_checkpoint(paths, 6)
    assert load_checkpoint(paths)[1]["step"] == 3


def test_checkpoints_written_before_the_checksum_still_load(tiny_run, tmp_path):
    """No size or sha256 in step_N.json: the header and the file size are still checked."""
    from avatar.run import RunPaths, load_avatar

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    paths = RunPaths(run)
    for step in (3, 6):
        js = paths.checkpoint(step)[1]
        meta = json.loads(js.read_text())
        js.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("size", "sha256")}))
    assert load_avatar(run, "cpu").step == 6
    _truncate(paths.checkpoint(6)[0], 0.9)
    assert load_avatar(run, "cpu").step == 3
