"""avatar export: the canonical Gaussians in the standard 3DGS .ply layout."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from avatar.cli import main
from avatar.export import read_ply
from avatar.run import load_avatar


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_ply_round_trip(tiny_run, tmp_path):
    out = tmp_path / "head.ply"
    result = _invoke("export", tiny_run, "-o", out)
    assert result.exit_code == 0, result.output
    table = read_ply(out)
    arrays = load_avatar(tiny_run).model.canonical_gaussians()
    n = len(arrays["means"])
    assert len(table["x"]) == n
    np.testing.assert_allclose(np.stack([table["x"], table["y"], table["z"]], 1), arrays["means"], rtol=1e-6)
    np.testing.assert_allclose(table["opacity"], arrays["opacity_logits"], rtol=1e-6)
    np.testing.assert_allclose(np.stack([table[f"scale_{i}"] for i in range(3)], 1), arrays["log_scales"], rtol=1e-6)
    np.testing.assert_allclose(np.stack([table[f"rot_{i}"] for i in range(4)], 1), arrays["quats"], rtol=1e-6)
    np.testing.assert_allclose(np.stack([table[f"f_dc_{i}"] for i in range(3)], 1), arrays["sh"][:, 0], rtol=1e-6)
