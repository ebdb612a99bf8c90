"""TriPlaneEncoding against an independent reference (``grid_sample`` on the full vertex grids)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from avatar.models.encodings import PLANE_AXES, TriPlaneConfig, TriPlaneEncoding

# Small tables: levels of 4 and 6 cells (25 and 49 vertices) are dense, 10 and 16 hashed into 64 rows.
SMALL = dict(
    n_levels=4, features_per_level=2, log2_hashmap_size=6, base_resolution=4, max_resolution=16
)


def vertex_index(res: int, table: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row of vertex (x, y) within its level's table, written independently of the module."""
    if (res + 1) ** 2 <= table:
        return x + y * (res + 1)
    return torch.bitwise_xor(x, y * 2654435761) % table


def reference_encode(enc: TriPlaneEncoding, positions: torch.Tensor) -> torch.Tensor:
    """Per plane and level: build the whole vertex grid from the table, bilinearly sample it with
    ``grid_sample(align_corners=True)``. [M, 3] -> [M, 3, L, F]"""
    cfg = enc.config
    table = 1 << cfg.log2_hashmap_size
    center = torch.tensor(cfg.center, dtype=positions.dtype)
    half_extent = torch.tensor(cfg.half_extent, dtype=positions.dtype)
    u = ((positions - center) / half_extent).clamp(-1, 1)
    row = 0  # the module's table layout: plane-major, then level
    per_plane = []
    for axes in PLANE_AXES:
        levels = []
        for res in cfg.resolutions():
            ys, xs = torch.meshgrid(torch.arange(res + 1), torch.arange(res + 1), indexing="ij")
            rows = row + vertex_index(res, table, xs, ys)  # [R+1 (y), R+1 (x)]
            grid_vals = enc.embeddings[rows].permute(2, 0, 1)[None]  # [1, F, R+1, R+1]
            grid = u[:, list(axes)][None, None].to(grid_vals.dtype)  # [1, 1, M, 2] as (x, y)
            # [1, F, 1, M]; align_corners: -1 and +1 are the centres of the first and last vertex
            sampled = F.grid_sample(grid_vals, grid, mode="bilinear", align_corners=True)
            levels.append(sampled[0, :, 0].T)  # [M, F]
            row += min((res + 1) ** 2, table)
        per_plane.append(torch.stack(levels, dim=1))  # [M, L, F]
    return torch.stack(per_plane, dim=1)  # [M, 3, L, F]


def make(dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> TriPlaneEncoding:
    torch.manual_seed(seed)
    cfg = TriPlaneConfig(**{**SMALL, "init_scale": 1.0, **kw})
    return TriPlaneEncoding(cfg).to(dtype)


def test_layout_dense_then_hashed():
    enc = make()
    assert enc.config.resolutions() == [4, 6, 10, 16]
    assert enc.n_dense == 2
    assert enc.embeddings.shape == (3 * (25 + 49 + 64 + 64), 2)
    assert enc.out_dim == 3 * 4 * 2
    default = TriPlaneEncoding()
    assert default.config.resolutions() == [16, 24, 35, 53, 78, 116, 172, 256]
    assert default.n_dense == 6 and default.out_dim == 48
    assert default.embeddings.abs().max() <= 1e-4


@pytest.mark.parametrize("features", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(features, dtype):
    enc = make(dtype, features_per_level=features, center=(0.1, -0.2, 0.3), half_extent=(0.5, 0.7, 0.9))
    g = torch.Generator().manual_seed(1)
    unit = torch.rand(500, 3, generator=g, dtype=dtype) * 2.4 - 1.2  # some outside the box
    # exact box corners too (the last cell's far edge)
    unit[:8] = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    center = torch.tensor(enc.config.center, dtype=dtype)
    pos = center + unit * torch.tensor(enc.config.half_extent, dtype=dtype)
    got = enc(pos).reshape(500, 3, 4, features)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), reference_encode(enc, pos), **tol)


def test_vertices_read_their_rows_exactly():
    """At a vertex the interpolation returns that vertex's row: the dense rows are distinct per
    vertex, the hashed ones follow the hash (collisions allowed)."""
    enc = make(torch.float64)
    table = 1 << enc.config.log2_hashmap_size
    for level, res in enumerate(enc.config.resolutions()):
        ix, iy = torch.meshgrid(torch.arange(res + 1), torch.arange(res + 1), indexing="ij")
        ix, iy = ix.reshape(-1), iy.reshape(-1)
        u = torch.stack([ix, iy, ix], dim=-1).double() / res * 2 - 1  # xy plane at (ix, iy)
        feats = enc(u).reshape(-1, 3, 4, 2)[:, 0, level]  # xy plane
        rows = vertex_index(res, table, ix, iy)
        if (res + 1) ** 2 <= table:
            assert rows.unique().numel() == (res + 1) ** 2
        else:
            assert rows.max() < table
        expected = enc.embeddings.detach()[int(enc.offsets[level, 0]) + rows]
        torch.testing.assert_close(feats.detach(), expected)


@pytest.mark.parametrize("batch", [(), (7,), (2, 5), (0,)])
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_shapes(batch, combine):
    enc = make(combine=combine)
    out = enc(torch.rand(*batch, 3))
    assert out.shape == (*batch, enc.out_dim)
    assert enc.out_dim == (24 if combine == "concat" else 8)
    if combine == "sum":
        x = torch.rand(6, 3)
        concat = make(combine="concat")
        concat.load_state_dict(enc.state_dict())
        torch.testing.assert_close(enc(x), concat(x).reshape(6, 3, 8).sum(1))


def test_gradients_reach_table_and_positions():
    enc = make(torch.float64)
    pos = (torch.rand(40, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    enc(pos).pow(2).sum().backward()
    assert pos.grad is not None and pos.grad.abs().sum() > 0 and torch.isfinite(pos.grad).all()
    touched = enc.embeddings.grad.abs().sum(1) > 0
    assert 0 < touched.sum() < enc.embeddings.shape[0]  # only the looked-up rows


def test_gradcheck():
    enc = make(torch.float64, n_levels=3, max_resolution=12)
    g = torch.Generator().manual_seed(3)
    pos = (torch.rand(12, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    table = enc.embeddings
    assert torch.autograd.gradcheck(
        lambda p, t: _functional(enc, p, t), (pos, table), eps=1e-6, atol=1e-6
    )


def _functional(enc: TriPlaneEncoding, pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(enc, {"embeddings": table}, (pos,))


def test_continuity():
    enc = make()
    x = torch.rand(300, 3) * 1.9 - 0.95
    d = torch.randn(300, 3)
    d = d / d.norm(dim=1, keepdim=True) * 1e-4
    # slope bound: finest level 16 cells over a width of 2, table values in [-1, 1]
    assert (enc(x + d) - enc(x)).abs().max() < 16 / 2 * 2 * 2 * 1e-4
    # and it is not constant
    assert (enc(x + 100 * d) - enc(x)).abs().max() > 0


def test_outside_box_is_clamped():
    enc = make()
    inside = torch.tensor([[1.0, 0.3, -1.0]])
    outside = torch.tensor([[1.7, 0.3, -4.0]])
    torch.testing.assert_close(enc(outside), enc(inside))


def test_config_round_trip_and_validation():
    cfg = TriPlaneConfig(center=(1, 2, 3), half_extent=[0.5, 0.5, 0.25], combine="sum")
    assert cfg.center == (1.0, 2.0, 3.0)
    again = TriPlaneConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg
    with pytest.raises(ValueError, match="combine"):
        TriPlaneConfig(combine="mean")
    with pytest.raises(ValueError, match="half_extent"):
        TriPlaneConfig(half_extent=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="max_resolution"):
        TriPlaneConfig(base_resolution=64, max_resolution=32)
    with pytest.raises(ValueError, match="unknown fields"):
        TriPlaneConfig.from_dict({"n_levels": 4, "bogus": 1})
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        TriPlaneEncoding()(torch.zeros(4, 2))
