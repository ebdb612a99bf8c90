"""avatar/atomic.py: outputs that are inputs are refused; what killed writers leave is cleaned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avatar.atomic import (
    atomic_output,
    check_output_dir,
    check_writable_dir,
    clean_stale,
    clean_stale_scratch,
    refuse_overwrite,
    scratch_dir,
)
from avatar.errors import InputError, OutputExistsError


def test_an_output_that_is_an_input_is_refused(tmp_path):
    speech = tmp_path / "speech.mp4"
    speech.write_bytes(b"the only copy")
    (tmp_path / "hard.mp4").hardlink_to(speech)
    (tmp_path / "sym.mp4").symlink_to(speech)
    inputs_dir = tmp_path / "checkpoints"
    inputs_dir.mkdir()
    for output in (speech, tmp_path / "sub" / ".." / "speech.mp4", tmp_path / "hard.mp4", tmp_path / "sym.mp4",
                   inputs_dir / "new.json"):
        with pytest.raises(OutputExistsError):
            refuse_overwrite(output, None, speech, inputs_dir)
    with pytest.raises(OutputExistsError, match="write the output somewhere else"):
        refuse_overwrite(tmp_path, speech)  # a directory output holding an input
    refuse_overwrite(tmp_path / "out.mp4", None, speech, inputs_dir)  # anything else is fine
    assert speech.read_bytes() == b"the only copy"


def test_unwritable_or_missing_output_places_are_refused(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        check_output_dir(tmp_path / "nowhere" / "out.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_writable_dir(tmp_path / "file" / "run")
    check_writable_dir(tmp_path / "new" / "run")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(InputError, match="not writable"):
        check_output_dir(tmp_path / "out.mp4")
    with pytest.raises(InputError, match="not writable"):
        check_writable_dir(tmp_path / "run")
    with pytest.raises(InputError, match="not writable"):
        with atomic_output(tmp_path / "x.json"):
            pass


def test_stale_partials_and_scratch_of_dead_writers_are_removed(tmp_path, dead_pid):
    live_pid = os.getppid()
    stale = [tmp_path / f".out.partial{dead_pid}.mp4", tmp_path / f".avatar-ckpt-pid{dead_pid}-x1y2"]
    stale[0].write_bytes(b"half a video")
    stale[1].mkdir()
    (stale[1] / ".tmpAbCdEf").write_bytes(b"half a checkpoint")
    kept = [tmp_path / f".out.partial{live_pid}.mp4", tmp_path / f".avatar-ckpt-pid{live_pid}-x1y2",
            tmp_path / "out.partial123.mp4", tmp_path / ".tmpAbCdEf", tmp_path / "notes.txt"]
    for p in kept:
        p.mkdir() if "ckpt" in p.name else p.write_bytes(b"keep")
    os.utime(tmp_path / ".tmpAbCdEf", (0, 0))
    clean_stale(tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept), "live writers' files, other names and (without legacy_tmp) .tmp stay"
    clean_stale(tmp_path, legacy_tmp=True)
    assert not (tmp_path / ".tmpAbCdEf").exists(), "an old safetensors temporary goes in checkpoints/"
    # The same output written again removes a dead writer's partial of it.
    again = tmp_path / f".again.partial{dead_pid}.json"
    again.write_bytes(b"{")
    with atomic_output(tmp_path / "again.json") as tmp:
        tmp.write_text("{}")
    assert not again.exists() and (tmp_path / "again.json").read_text() == "{}"


def test_scratch_directories_are_named_with_the_pid_and_cleaned(tmp_path, dead_pid, monkeypatch):
    with scratch_dir("render") as tmp:
        assert tmp.name.startswith(f"avatar-render-pid{os.getpid()}-") and tmp.is_dir()
    assert not tmp.exists()
    with scratch_dir("ckpt", tmp_path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".avatar-ckpt-pid")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    leftover = tmp_path / f"avatar-render-pid{dead_pid}-abcd"
    leftover.mkdir()
    (leftover / "speech.wav").write_bytes(b"RIFF")
    other = tmp_path / "avatar-render-old_style"
    other.mkdir()
    clean_stale_scratch()
    assert not leftover.exists() and other.exists()
