"""The tri-plane encoding's kernels (C++, CUDA) against the PyTorch twin, in both passes."""

from __future__ import annotations

import warnings

import pytest
import torch

from avatar.models.encodings import TriPlaneConfig, TriPlaneEncoding
from avatar.render import _triplane_kernels, triplane
from avatar.render._triplane_kernels import triplane_encode_kernel
from avatar.render.triplane import _triplane_encode, triplane_encode

needs_cpp = pytest.mark.skipif(_triplane_kernels.load_cpu() is None, reason="no C++ compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# name: (cells per side of each level, log2_hashmap_size, features per vertex)
CONFIGS = {
    "dense_and_hashed": ([4, 6, 10, 16], 6, 2),  # 25 and 49 vertices dense, 121 and 289 hashed into 64
    "all_dense": ([3, 5, 8], 8, 3),  # every level fits its 256 rows; F = 3 takes the generic-F loop
    "all_hashed": ([9, 13], 5, 1),  # 100 and 196 vertices into 32 rows each
}


def make_layout(resolutions: list[int], log2: int, feats: int, dtype: torch.dtype, seed: int = 0,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(embeddings [E, F], resolutions [L], offsets [L, 3], n_dense), tables plane-major as in
    TriPlaneEncoding, entries uniform in [-1, 1]."""
    table = 1 << log2
    sizes = [min((r + 1) ** 2, table) for r in resolutions]
    n_dense = sum((r + 1) ** 2 <= table for r in resolutions)
    starts, row = [], 0
    for _ in range(3):
        starts.append([])
        for size in sizes:
            starts[-1].append(row)
            row += size
    offsets = torch.tensor(starts, dtype=torch.long).T.contiguous()  # [L, 3]
    g = torch.Generator().manual_seed(seed)
    emb = (torch.rand(row, feats, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    res = torch.tensor(resolutions, dtype=torch.long)
    return emb.to(device), res.to(device), offsets.to(device), n_dense


def sample_points(resolutions: list[int], dtype: torch.dtype, n_random: int = 1500, seed: int = 1) -> torch.Tensor:
    """Random points plus the cube's corners and points on the cell edges of every level. [M, 3]"""
    g = torch.Generator().manual_seed(seed)
    pts = [torch.rand(n_random, 3, generator=g, dtype=torch.float64)]
    pts.append(torch.tensor([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=torch.float64))
    for r in resolutions:
        edges = torch.arange(r + 1, dtype=torch.float64) / r  # every vertex line of the level
        idx = torch.randint(0, r + 1, (60, 3), generator=g)
        on_edges = edges[idx]
        mixed = torch.rand(60, 3, generator=g, dtype=torch.float64)
        mixed[:, 0] = on_edges[:, 0]  # on an edge along one axis only
        pts += [on_edges, mixed]
    return torch.cat(pts).to(dtype)


def run(fn, coords: torch.Tensor, emb: torch.Tensor, res: torch.Tensor, offsets: torch.Tensor, n_dense: int,
        log2: int, grads: str = "both", **kw) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(features, grad to embeddings, grad to coords) for one random cotangent."""
    coords = coords.clone().requires_grad_(grads in ("both", "coords"))
    emb = emb.clone().requires_grad_(grads in ("both", "table"))
    out = fn(coords, emb, res, offsets, n_dense, log2, **kw)
    g = torch.Generator().manual_seed(7)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    (out * cot).sum().backward()
    return out.detach(), emb.grad, coords.grad


def tolerances(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-4)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("threads", [None, 1, 3])
def test_cpp_matches_torch(dtype, config, threads):
    resolutions, log2, feats = CONFIGS[config]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, dtype)
    coords = sample_points(resolutions, dtype)
    want = run(_triplane_encode, coords, emb, res, offsets, n_dense, log2)
    # an explicit thread count is used exactly: the threaded paths on few points
    got = run(triplane_encode_kernel, coords, emb, res, offsets, n_dense, log2, threads=threads)
    for name, w, x in zip(("features", "grad embeddings", "grad coords"), want, got):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x, w, **tolerances(dtype), msg=lambda m, name=name: f"{name}: {m}")


@needs_cpp
@pytest.mark.parametrize("grads", ["table", "coords"])
def test_cpp_one_gradient_at_a_time(grads):
    resolutions, log2, feats = CONFIGS["dense_and_hashed"]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, torch.float64)
    coords = sample_points(resolutions, torch.float64)
    want = run(_triplane_encode, coords, emb, res, offsets, n_dense, log2, grads=grads)
    for threads in (1, 2):
        got = run(triplane_encode_kernel, coords, emb, res, offsets, n_dense, log2, grads=grads, threads=threads)
        for w, x in zip(want, got):
            assert (w is None) == (x is None)
            if w is not None:
                torch.testing.assert_close(x, w, **tolerances(torch.float64))


@needs_cpp
def test_cpp_is_deterministic_whatever_the_thread_count():
    """Every sum is taken in one order (a level's table rows by one thread, in point order; a
    point's position gradient in level order), so the results are bitwise equal."""
    resolutions, log2, feats = CONFIGS["dense_and_hashed"]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, torch.float32)
    coords = sample_points(resolutions, torch.float32)
    one = run(triplane_encode_kernel, coords, emb, res, offsets, n_dense, log2, threads=1)
    for threads in (3, 3, 8):
        many = run(triplane_encode_kernel, coords, emb, res, offsets, n_dense, log2, threads=threads)
        for x, y in zip(one, many):
            assert torch.equal(x, y)


@needs_cpp
def test_cpp_outside_the_unit_cube():
    """Slightly outside [0, 1] the kernel extrapolates the edge cells exactly as the twin does
    (trunc toward zero); far outside (where the twin's dense index would go negative) and for
    NaN it stays inside the table."""
    resolutions, log2, feats = CONFIGS["dense_and_hashed"]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, torch.float64)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(300, 3, generator=g, dtype=torch.float64) * 1.25 - 0.05  # [-0.05, 1.2]
    want = run(_triplane_encode, coords, emb, res, offsets, n_dense, log2)
    got = run(triplane_encode_kernel, coords, emb, res, offsets, n_dense, log2)
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, **tolerances(torch.float64))
    wild = torch.tensor([[-3.0, 0.5, 0.5], [0.5, 1e6, -1e6], [float("nan"), 0.2, 0.3]], dtype=torch.float64)
    out = triplane_encode_kernel(wild, emb, res, offsets, n_dense, log2)
    assert torch.isfinite(out[:2]).all()


@needs_cpp
def test_cpp_rejects_a_layout_outside_the_table():
    resolutions, log2, feats = CONFIGS["dense_and_hashed"]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, torch.float32)
    with pytest.raises(ValueError, match="layout"):
        triplane_encode_kernel(torch.rand(10, 3), emb[:-1], res, offsets, n_dense, log2)


@needs_cpp
def test_cpp_no_points():
    resolutions, log2, feats = CONFIGS["dense_and_hashed"]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, torch.float32)
    out, g_emb, g_coords = run(triplane_encode_kernel, torch.zeros(0, 3), emb, res, offsets, n_dense, log2)
    assert out.shape == (0, 3, 4, 2) and g_coords.shape == (0, 3)
    assert torch.equal(g_emb, torch.zeros_like(emb))


@needs_cpp
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_encoding_module_cpp_matches_torch(combine):
    cfg = TriPlaneConfig(n_levels=4, features_per_level=2, log2_hashmap_size=6, base_resolution=4,
                         max_resolution=16, combine=combine, init_scale=1.0, center=(0.1, -0.2, 0.3),
                         half_extent=(0.5, 0.7, 0.9))
    torch.manual_seed(0)
    ref = TriPlaneEncoding(cfg, implementation="torch")
    enc = TriPlaneEncoding(cfg, implementation="cpp")
    enc.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(4, 150, 3, generator=g) * 0.6  # some outside the box (clamped)
    cot = torch.randn(4, 150, cfg.out_dim, generator=g)
    results = []
    for module in (ref, enc):
        p = pos.clone().requires_grad_()
        out = module(p)
        (out * cot).sum().backward()
        results.append((out.detach(), module.embeddings.grad, p.grad))
    for w, x in zip(*results):
        torch.testing.assert_close(x, w, rtol=1e-4, atol=2e-4)
    assert "implementation=cpp" in repr(enc)
    assert "implementation" not in cfg.to_dict()  # a runtime choice, not saved with the model


def test_unknown_implementation_is_an_error():
    emb, res, offsets, n_dense = make_layout(*CONFIGS["all_dense"], torch.float32)
    with pytest.raises(ValueError, match="implementation"):
        triplane_encode(torch.rand(4, 3), emb, res, offsets, n_dense, 8, implementation="tcnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="implementation"):
        TriPlaneEncoding(implementation="tcnn")  # type: ignore[arg-type]


def test_unavailable_kernel_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_triplane_kernels, "load_cpu", lambda: None)
    monkeypatch.setattr(triplane, "_warned", set())
    resolutions, log2, feats = CONFIGS["dense_and_hashed"]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, torch.float32)
    coords = torch.rand(50, 3)
    want = _triplane_encode(coords, emb, res, offsets, n_dense, log2)
    with pytest.warns(RuntimeWarning, match="implementation='cpp' is unavailable"):
        out = triplane_encode(coords, emb, res, offsets, n_dense, log2, implementation="cpp")
    torch.testing.assert_close(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and "auto" falls back silently
        triplane_encode(coords, emb, res, offsets, n_dense, log2, implementation="cpp")
        assert triplane.resolve_implementation("auto", coords, emb) == "torch"
        enc = TriPlaneEncoding(TriPlaneConfig(n_levels=2, base_resolution=4, max_resolution=8))
        enc(torch.rand(3, 3))


def test_kernel_needs_matching_device_and_dtype(monkeypatch):
    monkeypatch.setattr(triplane, "_warned", set())
    emb, res, offsets, n_dense = make_layout(*CONFIGS["all_dense"], torch.float32)
    coords = torch.rand(20, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="one dtype"):
        assert triplane.resolve_implementation("cpp", coords, emb) == "torch"
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="needs CUDA tensors"):
            out = triplane_encode(coords.float(), emb, res, offsets, n_dense, 8, implementation="cuda")
        torch.testing.assert_close(out, _triplane_encode(coords.float(), emb, res, offsets, n_dense, 8))
    assert triplane.resolve_implementation("auto", torch.rand(2, 3, dtype=torch.float16),
                                           emb.half()) == "torch"


@needs_cpp
def test_auto_uses_the_cpp_kernel_on_cpu():
    emb, res, offsets, n_dense = make_layout(*CONFIGS["all_dense"], torch.float32)
    assert triplane.resolve_implementation("auto", torch.rand(2, 3), emb) == "cpp"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_matches_torch(dtype, config):
    resolutions, log2, feats = CONFIGS[config]
    emb, res, offsets, n_dense = make_layout(resolutions, log2, feats, dtype, device="cuda")
    coords = sample_points(resolutions, dtype).cuda()
    assert triplane.resolve_implementation("auto", coords, emb) == "cuda"
    want = run(_triplane_encode, coords, emb, res, offsets, n_dense, log2)
    got = run(triplane_encode, coords, emb, res, offsets, n_dense, log2, implementation="cuda")
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, **(tolerances(dtype) if dtype == torch.float32 else dict(rtol=1e-9,
                                                                                                     atol=1e-9)))


@needs_cuda
def test_cuda_encoding_module_matches_cpu():
    torch.manual_seed(0)
    cpu = TriPlaneEncoding(TriPlaneConfig(init_scale=1.0), implementation="torch")
    gpu = TriPlaneEncoding(TriPlaneConfig(init_scale=1.0), implementation="cuda").cuda()
    gpu.load_state_dict(cpu.state_dict())
    pos = torch.rand(2000, 3) * 2 - 1
    torch.testing.assert_close(gpu(pos.cuda()).cpu(), cpu(pos), rtol=1e-4, atol=2e-4)
