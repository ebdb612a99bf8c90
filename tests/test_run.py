"""The run directory: versions, broken checkpoints, a subject that moved."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from avatar import media
from avatar.cli import main
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
