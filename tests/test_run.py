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
    assert result.exit_code == 1 and "unreadable" in result.output, result.output
