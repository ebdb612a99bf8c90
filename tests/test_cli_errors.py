"""Hostile input ends in one sentence and a non-zero exit: never a traceback, nothing half-written."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from tests.conftest import tone


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _clean_failure(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for word in words:
        assert word in result.output, result.output


@pytest.fixture
def unwritable(monkeypatch):
    """Makes directories read-only as far as the toolkit can tell (tests may run as root, who may
    write anywhere: chmod alone would not do)."""
    blocked: list = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(os.path.realpath(path) == os.path.realpath(b) for b in blocked):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return blocked


def test_read_only_output_places_are_refused_before_any_work(small_subject, tiny_run, tmp_path, unwritable):
    _, subject = small_subject
    ro = tmp_path / "ro"
    ro.mkdir()
    unwritable.append(ro)
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    _clean_failure(_invoke("train", subject, "-o", ro / "run"), "not writable")
    _clean_failure(_invoke("export", tiny_run, "-o", ro / "x.ply"), "not writable")
    _clean_failure(_invoke("render", tiny_run, "--audio", speech, "-o", ro / "o.mp4"), "not writable")
    _clean_failure(_invoke("eval", tiny_run, "--json", ro / "m.json"), "not writable")
    assert list(ro.iterdir()) == []


def test_the_file_systems_refusals_become_one_sentence(tiny_run, tmp_path, monkeypatch):
    import avatar.export

    def refuse(path, **arrays):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(avatar.export, "write_ply", refuse)
    _clean_failure(_invoke("export", tiny_run, "-o", tmp_path / "x.ply"), "Permission denied", "x.ply")


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"[1, 2, 3]", b'{"format_version": 1, "model": [1]}'])
def test_a_corrupt_config_json_is_refused_by_every_command(small_subject, tiny_run, tmp_path, content):
    _, subject = small_subject
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.json").write_bytes(content)
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    for args in (["render", run, "--audio", speech, "-o", tmp_path / "o.mp4"], ["export", run, "-o", tmp_path / "x.ply"],
                 ["eval", run, "--json", tmp_path / "m.json"], ["train", subject, "-o", run, "--resume"]):
        _clean_failure(_invoke(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.wav"]


def test_a_subject_with_pickled_tracks_or_a_bad_manifest_is_refused(small_subject, tiny_run, tmp_path):
    _, subject = small_subject
    copy = tmp_path / "subject"
    shutil.copytree(subject, copy, ignore=shutil.ignore_patterns(".cache", ".work"))
    tracks = dict(np.load(copy / "tracks.npz"))
    tracks["landmarks"] = np.array([{"a": 1}, None], dtype=object)
    np.savez(copy / "tracks.npz", **tracks)
    speech = media.write_wav(tmp_path / "s.wav", tone(1.0))
    _clean_failure(_invoke("render", tiny_run, "--audio", speech, "-o", tmp_path / "o.mp4", "--subject", copy),
                   "tracks.npz")
    for manifest in (bytes(range(256)), b"[1, 2, 3]", b'{"format_version": 1}'):
        (copy / "subject.json").write_bytes(manifest)
        _clean_failure(_invoke("train", copy, "-o", tmp_path / "run"), "subject.json")
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "run").exists()


def test_eval_refuses_one_file_for_both_outputs(tiny_run, tmp_path):
    both = tmp_path / "both.mp4"
    _clean_failure(_invoke("eval", tiny_run, "--json", both, "--video", both), "--json and --video")
    _clean_failure(_invoke("eval", tiny_run, "--json", tiny_run / "config.json"), "is also an input")
    assert not both.exists()
