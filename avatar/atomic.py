"""Atomic writes: every file the toolkit writes appears whole or not at all.

A reader (another command, a crash-recovery, a user's file browser) must never see half of a
manifest, a checkpoint or a video. Everything is written under a temporary sibling name that
starts with a dot and holds ``.partial`` and the writer's pid (so a later run can tell a dead
writer's leftovers from a live one's), flushed to disk, then renamed onto the final name. This is
the one place that knows how.

Temporary directories (a decoded wav, a checkpoint being serialised) are made by
:func:`scratch_dir`, named ``avatar-KIND-pidPID-...`` (with a leading dot inside a run), so that
:func:`clean_stale` can remove what a killed process left behind, and only that. It also holds
the checks every command makes before writing: the output's directory exists and is writable
(:func:`check_output_dir`), and the output is not one of the command's inputs
(:func:`refuse_overwrite`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from avatar.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

PARTIAL_TAG = ".partial"
"""Marks a temporary sibling; followed by the writer's pid."""


def partial_name(path: Path) -> Path:
    """The temporary sibling of ``path`` this process writes before renaming (suffix kept, so
    tools that choose a format by extension, like ffmpeg and numpy, still do)."""
    return path.with_name(f".{path.stem}{PARTIAL_TAG}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: Path | str, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Raises:
        InputError: the directory of ``path`` does not exist.
    """
    path = Path(path)
    check_output_dir(path)
    _remove_stale_partials_of(path)
    tmp = partial_name(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: Path | str, text: str) -> Path:
    """Write JSON text (already serialised) so that readers never see half of it."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_npz_atomic(path: Path | str, **arrays: np.ndarray) -> Path:
    """``np.savez`` through a temporary file (no pickled objects: string arrays are stored as unicode)."""
    with atomic_output(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# -- checks before writing ---------------------------------------------------------------------


def check_output_dir(path: Path | str) -> None:
    """Refuse an output whose directory is missing or not writable, before any work is done
    (otherwise a long render ends in ffmpeg's error and a traceback).

    Raises:
        InputError: the directory of ``path`` does not exist or cannot be written.
    """
    parent = Path(path).parent
    if not parent.is_dir():
        raise InputError(f"The directory {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"The directory {parent} is not writable; choose another output place.")


def check_writable_dir(directory: Path | str) -> None:
    """Refuse a directory output (a run) that cannot be created or written, before any work.

    Raises:
        InputError: a file is in the way, or the nearest existing directory is not writable.
    """
    probe = Path(directory).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{probe} is a file, not a directory; choose another output place.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"The directory {probe} is not writable; choose another output place.")


def _same_file(a: Path, b: Path) -> bool:
    """Same resolved path, or (both existing) the same inode: a hard link or a bind mount."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_inside(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


def refuse_overwrite(output: Path | str, *inputs: Optional[Path | str]) -> None:
    """Refuse to write ``output`` where that would replace or destroy one of ``inputs``.

    An output is refused when it is an input (same path or same inode), when it lies inside an
    input directory (``eval --json RUN/checkpoints/x.json``), or, when it is a directory, when it
    holds an input (``train SUBJECT -o SUBJECT``). Inputs that are None are skipped.

    Raises:
        OutputExistsError: one sentence naming the input that would be overwritten.
    """
    out = Path(output)
    for given in inputs:
        if given is None:
            continue
        src = Path(given)
        if _same_file(out, src):
            raise OutputExistsError(f"the output {out} is also an input ({src}); write the output somewhere else.")
        if (src.is_dir() and _is_inside(out, src)) or (out.is_dir() and _is_inside(src, out)):
            raise OutputExistsError(f"the output {out} would write into the input {src}; write the output "
                                    "somewhere else.")


# -- what killed processes leave behind ---------------------------------------------------------

_PARTIAL_RE = re.compile(r"^\..+" + re.escape(PARTIAL_TAG) + r"(\d+)(\.[^.]*)?$")
_SCRATCH_RE = re.compile(r"^\.?avatar-[a-z]+-pid(\d+)-")
_LEGACY_TMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
"""safetensors' own temporary name (before checkpoints were serialised in a scratch directory)."""
LEGACY_TMP_AGE_S = 600.0
"""A legacy temporary this old cannot belong to a checkpoint still being written."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's process counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, it is someone else's
        return True
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        log.info("Removed %s, left by a process that no longer runs.", path)
    except OSError as err:  # another cleaner got there first, or not ours to remove
        log.debug("Could not remove %s: %s", path, err)


def _remove_stale_partials_of(path: Path) -> None:
    """Remove the temporary siblings of ``path`` that dead writers left (a killed render)."""
    head = f".{path.stem}{PARTIAL_TAG}"
    exact = re.compile(re.escape(head) + r"(\d+)" + re.escape(path.suffix))
    for candidate in path.parent.glob(glob.escape(head) + "*"):
        m = exact.fullmatch(candidate.name)
        if m and candidate.is_file() and not pid_alive(int(m.group(1))):
            _remove(candidate)


def clean_stale(directory: Path | str, legacy_tmp: bool = False) -> None:
    """Remove what killed processes left in ``directory``: partial files and scratch directories
    whose pid no longer runs (a live writer's are kept). With ``legacy_tmp`` (the checkpoints
    directory), also safetensors' ``.tmp`` + 6 random characters files older than :data:`LEGACY_TMP_AGE_S`."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for entry in entries:
        if (m := _SCRATCH_RE.match(entry.name)) and entry.is_dir() and not entry.is_symlink():
            stale = not pid_alive(int(m.group(1)))
        elif (m := _PARTIAL_RE.match(entry.name)) and entry.is_file():
            stale = not pid_alive(int(m.group(1)))
        else:
            stale = legacy_tmp and _LEGACY_TMP_RE.match(entry.name) is not None and _older_than(entry, LEGACY_TMP_AGE_S)
        if stale:
            _remove(entry)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return path.is_file() and time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def clean_stale_scratch() -> None:
    """Remove the scratch directories of dead processes from the system's temporary directory
    (only ours: other users' are not touched)."""
    root = Path(tempfile.gettempdir())
    try:
        entries = [e for e in root.iterdir() if _SCRATCH_RE.match(e.name) and not e.name.startswith(".")]
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != os.getuid():
                continue
        if not pid_alive(int(_SCRATCH_RE.match(entry.name).group(1))):
            _remove(entry)


@contextlib.contextmanager
def scratch_dir(kind: str, parent: Optional[Path | str] = None) -> Iterator[Path]:
    """A temporary directory named with this process's pid, removed on exit.

    In the system's temporary directory by default (``avatar-KIND-pidPID-`` + random characters); inside
    ``parent`` as a hidden ``.avatar-KIND-pidPID-`` + random characters (same file system, so its files can be
    renamed into place). A killed process's scratch is removed by the next :func:`clean_stale`.
    """
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"scratch kind must be lowercase letters, got {kind!r}")
    prefix = f"{'.' if parent is not None else ''}avatar-{kind}-pid{os.getpid()}-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=None if parent is None else str(parent)))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
