"""Atomic writes: every file the toolkit writes appears whole or not at all.

A reader (another command, a crash-recovery, a user's file browser) must never see half of a
manifest, a checkpoint or a video. Everything is written under a temporary sibling name that
starts with a dot and holds ``.partial`` and the writer's pid (so a later run can tell a dead
writer's leftovers from a live one's), flushed to disk, then renamed onto the final name. This is
the one place that knows how.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from avatar.errors import InputError

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
    if not path.parent.is_dir():
        raise InputError(f"The directory {path.parent} does not exist; create it first.")
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
