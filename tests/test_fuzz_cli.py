"""Property-based checks of the command line against hostile input (hypothesis, bounded, reproducible).

Whatever number an option is given and however a run's or a subject's files are damaged, a command
ends with exit code 0, 1 or 2, prints no traceback and leaves no file but its output behind (no
partial file, no scratch directory). Examples are few and derandomized, so that CI sees the same
ones every time; values that would start long work (a 4000-pixel render, a 24-second sample) are
not drawn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from avatar import media
from avatar.cli import main
from tests.conftest import tone

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_WORDS = st.sampled_from(["", "0", "-0", "-1", "nan", "inf", "-inf", "1e309", "0x10", " 8", "1_000", "3.5", "--help"])
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Nd")), max_size=6)


def _numbers(small: int, big: int) -> st.SearchStrategy[str]:
    """Option values: anything a user might type, but valid numbers only up to ``small`` (cheap
    work) or from ``big`` (refused by the option's range)."""
    return st.one_of(st.integers(-4, small).map(str), st.integers(max_value=small).map(str),
                     st.integers(min_value=big).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     _WORDS, _TEXT)


@pytest.fixture(scope="module")
def fuzz_home(tiny_run, small_subject, tmp_path_factory):
    """A private copy of the run and its subject (render caches frames in the subject)."""
    home = tmp_path_factory.mktemp("fuzz")
    _, subject = small_subject
    shutil.copytree(subject, home / "subject", ignore=shutil.ignore_patterns(".work"))
    shutil.copytree(tiny_run, home / "run")
    media.write_wav(home / "tone.wav", tone(1.0))
    return home


def _work_dir(home: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="case-", dir=home))


def _our_scratch() -> list[str]:
    return [p for p in os.listdir(tempfile.gettempdir()) if f"-pid{os.getpid()}-" in p]


def _check(result, work: Path, before: set[str], output: Path | None) -> None:
    """Exit 0, 1 or 2, no traceback, nothing in ``work`` but what was there and the output."""
    event(f"exit {result.exit_code}")
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    after = {str(p.relative_to(work)) for p in work.rglob("*")}
    allowed = before | ({output.name} if output is not None and result.exit_code == 0 else set())
    assert after <= allowed, (sorted(after - allowed), result.output)
    assert not _our_scratch()


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_numeric_options_never_crash(fuzz_home, data):
    command = data.draw(st.sampled_from(["render", "export", "train", "sample"]), label="command")
    work = _work_dir(fuzz_home)
    run, subject = fuzz_home / "run", fuzz_home / "subject"
    output = None
    if command == "render":
        output = work / "o.mp4"
        option = data.draw(st.sampled_from(["--size", "--batch", "--step"]), label="option")
        value = data.draw(_numbers(40, 4097), label="value")
        args = ["render", run, "--audio", fuzz_home / "tone.wav", "-o", output, "--subject", subject, option, value]
    elif command == "export":
        output = work / "x.ply"
        args = ["export", run, "-o", output, "--step", data.draw(_numbers(10, 11), label="step")]
    elif command == "train":  # an existing run and no --resume: every valid value is refused before work
        args = ["train", subject, "-o", run, "--no-eval", "--iters", data.draw(_numbers(10**9, 10**9), label="iters")]
    else:
        output = work / "sample"
        args = ["sample", "-o", output, "--duration", data.draw(_numbers(1, 3601), label="duration"),
                "--seed", data.draw(_numbers(10**12, 10**12), label="seed")]
    before = {str(p.relative_to(work)) for p in work.rglob("*")}
    result = CliRunner().invoke(main, [str(a) for a in args])
    if command == "sample" and result.exit_code == 0:
        before |= {f"sample/{name}" for name in ("sample.mp4", "sample.wav", "sample_truth.npz")}
    _check(result, work, before, output)


_RUN_FILES = ["config.json", "checkpoints/step_000006.json", "checkpoints/step_000006.safetensors",
              "checkpoints/step_000003.safetensors"]
_SUBJECT_FILES = ["subject.json", "tracks.npz", "audio.wav"]


def _damage(path: Path, data) -> None:
    """Truncate ``path``, or overwrite some of its bytes (the first 200 hold a safetensors header)."""
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "bytes", "replace"]), label="how")
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="keep")]
    elif how == "bytes":
        at = data.draw(st.integers(0, min(len(raw) - 1, 200)), label="at")
        patch = data.draw(st.binary(min_size=1, max_size=16), label="patch")
        raw[at:at + len(patch)] = patch
    else:
        raw = bytearray(data.draw(st.binary(max_size=64), label="content"))
    path.write_bytes(bytes(raw))


@FUZZ
@given(data=st.data())
def test_damaged_runs_and_subjects_never_crash(fuzz_home, data):
    work = _work_dir(fuzz_home)
    target = data.draw(st.sampled_from(_RUN_FILES + _SUBJECT_FILES), label="file")
    run, subject = fuzz_home / "run", fuzz_home / "subject"
    if target in _RUN_FILES:
        run = work / "run"
        shutil.copytree(fuzz_home / "run", run)
        _damage(run / target, data)
        output = work / "x.ply"
        args = ["export", run, "-o", output]
    else:
        subject = work / "subject"
        shutil.copytree(fuzz_home / "subject", subject, ignore=shutil.ignore_patterns(".cache"))
        _damage(subject / target, data)
        output = work / "o.mp4"
        args = ["render", run, "--audio", fuzz_home / "tone.wav", "-o", output, "--subject", subject, "--size", "32"]
    before = {str(p.relative_to(work)) for p in work.rglob("*")}
    result = CliRunner().invoke(main, [str(a) for a in args])
    if target in _SUBJECT_FILES:  # render caches the frames it reads in the subject: not an output
        before |= {str(p.relative_to(work)) for p in (subject / ".cache").rglob("*")} | {"subject/.cache"}
    _check(result, work, before, output)
