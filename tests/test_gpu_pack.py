"""Carrying wheels to the GPU machine (benchmarks/gpu_pack.py): unzipped into a site folder, their
programs into a bin folder, executable, as pip would install them there."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu_pack():
    yield from load_benchmark("gpu_pack")


def _wheel(path: Path) -> Path:
    """A wheel like ninja's: a package, metadata, a program under ``*.data/scripts`` (mode 755)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fakepkg/__init__.py", "VALUE = 42\n")
        archive.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg\n")
        program = zipfile.ZipInfo("fakepkg-1.0.data/scripts/fakeprog")
        program.external_attr = (stat.S_IFREG | 0o755) << 16
        archive.writestr(program, "#!/bin/sh\necho fake 1.0\n")
        archive.writestr("fakepkg-1.0.data/headers/skip.h", "")
    return path


def test_wheels_install_as_a_site_and_a_bin_folder(gpu_pack, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels / "fakepkg-1.0-py3-none-any.whl")
    (wheels / "notes.txt").write_text("not a wheel")
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    assert gpu_pack.install_wheels(wheels, site, bin_dir) == ["fakepkg-1.0-py3-none-any.whl"]
    assert (site / "fakepkg-1.0.dist-info" / "METADATA").is_file()
    assert not (site / "fakepkg-1.0.data").exists() and not (bin_dir / "skip.h").exists()
    program = bin_dir / "fakeprog"
    assert os.access(program, os.X_OK)
    assert subprocess.run([str(program)], capture_output=True, text=True).stdout.strip() == "fake 1.0"
    found = subprocess.run([sys.executable, "-c", "import fakepkg; print(fakepkg.VALUE)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert found.stdout.strip() == "42"
