"""Ray marching and compositing: the PyTorch twins against per-ray Python loops written from the
docstrings' definitions, and the C++ / CUDA kernels against the twins (samples exactly, compositing
and its gradients to float tolerance)."""

from __future__ import annotations

import math
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from avatar.render import _raymarch_kernels, raymarch
from avatar.render.raymarch import RaySamples, composite_rays, composite_weights, march_rays, ray_aabb

AABB = torch.tensor([-1.0, -0.8, -0.6, 1.0, 0.8, 0.6])
HAS_CPP = _raymarch_kernels.cpu_available(torch.float64)
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ ray marching kernel does not build here")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _rays(n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays from around the box towards it, some inside it, some missing it, some axis-aligned."""
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(n, 3, generator=g, dtype=torch.float64) * 2.0
    origins[: n // 8] *= 0.2  # inside the box
    target = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.5
    dirs = (target - origins) * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64))  # not unit
    dirs[n // 8: n // 4] = torch.randn(n // 4 - n // 8, 3, generator=g, dtype=torch.float64)  # random
    dirs[n // 4: n // 4 + 4, 1:] = 0  # parallel to x
    return origins.to(dtype), dirs.to(dtype)


def _occupancy(shape: tuple[int, int, int] = (8, 6, 5), fill: float = 0.4, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < fill


def _march_loop(origins, dirs, near, far, occupancy, aabb, step, max_samples):
    """march_rays' definition, one ray and one candidate at a time (float64 Python arithmetic)."""
    dims = occupancy.shape
    lo, hi = aabb[:3].tolist(), aabb[3:].tolist()
    scale = [dims[a] / (hi[a] - lo[a]) for a in range(3)]
    ts, ids, pos, counts = [], [], [], []
    for r in range(origins.shape[0]):
        o, d = origins[r].tolist(), dirs[r].tolist()
        n = 0
        k = 0
        while n < max_samples:
            t = near[r].item() + (k + 0.5) * step
            k += 1
            if not t < far[r].item():
                break
            p = [o[a] + t * d[a] for a in range(3)]
            cell = [min(max(math.floor((p[a] - lo[a]) * scale[a]), 0), dims[a] - 1) for a in range(3)]
            if occupancy[cell[0], cell[1], cell[2]]:
                ts.append(t)
                ids.append(r)
                pos.append(p)
                n += 1
        counts.append(n)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return ts, ids, pos, offsets


def _composite_loop(sigmas, rgbs, deltas, ts, offsets, stop):
    """composite_rays' definition, sample after sample (float64 Python arithmetic)."""
    out_rgb, out_opacity, out_depth, weights = [], [], [], [0.0] * sigmas.shape[0]
    for r in range(offsets.shape[0] - 1):
        trans, rgb, opacity, depth = 1.0, [0.0] * rgbs.shape[1], 0.0, 0.0
        for i in range(int(offsets[r]), int(offsets[r + 1])):
            if not trans >= stop:
                break
            alpha = 1.0 - math.exp(-sigmas[i].item() * deltas[i].item())
            w = trans * alpha
            weights[i] = w
            rgb = [acc + w * c for acc, c in zip(rgb, rgbs[i].tolist())]
            opacity += w
            depth += w * ts[i].item()
            trans *= 1.0 - alpha
        out_rgb.append(rgb)
        out_opacity.append(opacity)
        out_depth.append(depth)
    return out_rgb, out_opacity, out_depth, weights


def _packed(counts: list[int], channels: int, dtype: torch.dtype, seed: int = 0, sigma_scale: float = 20.0):
    """Random packed samples: sigmas, rgbs, deltas, ts, offsets."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    sigmas = (torch.rand(n, generator=g, dtype=torch.float64) * sigma_scale).to(dtype)
    rgbs = torch.rand(n, channels, generator=g, dtype=torch.float64).to(dtype)
    deltas = (0.02 + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    ts = (torch.rand(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    return sigmas, rgbs, deltas, ts, offsets


def _random_counts(n_rays: int, most: int, seed: int = 0) -> list[int]:
    counts = torch.randint(0, most + 1, (n_rays,), generator=torch.Generator().manual_seed(seed))
    counts[::5] = 0  # rays without samples
    return counts.tolist()


def _composite_and_grads(impl: str, sigmas, rgbs, deltas, ts, offsets, stop=1e-4, seed=1):
    s, c = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
    outs = composite_rays(s, c, deltas, ts, offsets, stop, implementation=impl)
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    grads = torch.autograd.grad(outs, (s, c), cots)
    return [o.detach() for o in outs], list(grads)


def _assert_same_samples(a: RaySamples, b: RaySamples) -> None:
    for name in ("ts", "deltas", "ray_ids", "offsets", "positions"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(x.cpu(), y.cpu()), name


# --- ray_aabb ------------------------------------------------------------------------------------


def test_ray_aabb_hits_misses_and_inside_origins() -> None:
    box = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    origins = torch.tensor([
        [0.5, 1.0, -2.0],  # in front of the box, along +z
        [0.5, 1.0, 2.0],  # inside the box
        [5.0, 1.0, -2.0],  # beside the box: misses
        [0.5, 1.0, 6.0],  # box behind the ray
        [0.5, 1.0, -2.0],  # zero direction
        [-1.0, 1.0, 1.0],  # along +x, not unit
        [-1.0, 3.0, 1.0],  # along +x, outside the y slab: misses
    ])
    dirs = torch.tensor([
        [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0],
        [2.0, 0.0, 0.0], [2.0, 0.0, 0.0],
    ])
    near, far = ray_aabb(origins, dirs, box)
    assert near.tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert far.tolist() == [6.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_ray_aabb_points_are_on_the_box() -> None:
    origins, dirs = _rays(64)
    box = AABB.double()
    near, far = ray_aabb(origins, dirs, box)
    hit = far > near
    assert 10 < int(hit.sum()) < 64 and (near >= 0).all() and (near[~hit] == far[~hit]).all()
    outside = hit & (near > 0)
    assert 0 < int(outside.sum()) < int(hit.sum())  # some origins are inside the box
    for sel, t in ((outside, near[outside]), (hit, far[hit])):
        p = origins[sel] + t[:, None] * dirs[sel]
        on_face = ((p - box[:3]).abs() < 1e-9) | ((p - box[3:]).abs() < 1e-9)
        inside = (p >= box[:3] - 1e-9) & (p <= box[3:] + 1e-9)
        assert on_face.any(-1).all() and inside.all()


# --- march_rays ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_samples", [0, 3, 1000])
def test_march_twin_matches_the_definition(max_samples: int) -> None:
    origins, dirs = _rays(48)
    near, far = ray_aabb(origins, dirs, AABB)
    occupancy = _occupancy()
    samples = march_rays(origins, dirs, near, far, occupancy, AABB, 0.07, max_samples, implementation="torch")
    ts, ids, pos, offsets = _march_loop(origins, dirs, near, far, occupancy, AABB, 0.07, max_samples)
    assert samples.ts.tolist() == ts and samples.ray_ids.tolist() == ids and samples.offsets.tolist() == offsets
    assert samples.positions.tolist() == (pos or samples.positions.tolist())
    assert (samples.deltas == 0.07).all()
    if max_samples == 1000:
        assert len(ts) > 100


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_samples", [0, 1, 5, 4096])
def test_march_cpp_equals_torch(dtype: torch.dtype, max_samples: int) -> None:
    origins, dirs = _rays(300, dtype)
    near, far = ray_aabb(origins, dirs, AABB)
    occupancy = _occupancy()
    aabb = AABB.to(dtype)
    a = march_rays(origins, dirs, near, far, occupancy, aabb, 0.013, max_samples, implementation="torch")
    b = march_rays(origins, dirs, near, far, occupancy, aabb, 0.013, max_samples, implementation="cpp")
    _assert_same_samples(a, b)
    assert a.ts.dtype == dtype and a.ray_ids.dtype == torch.int64
    if max_samples:
        assert a.n_samples > 0 and (a.offsets.diff() <= max_samples).all()


@needs_cpp
def test_march_cpp_edge_cases() -> None:
    """No rays; all rays missing; an empty grid; a full grid (then samples are the plain uniform ones);
    near/far not from ray_aabb (samples outside the box use the border cells)."""
    occupancy = _occupancy((4, 4, 4))
    empty = torch.zeros(0, 3)
    for impl in ("torch", "cpp"):
        s = march_rays(empty, empty, torch.zeros(0), torch.zeros(0), occupancy, AABB, 0.1, 8, implementation=impl)
        assert s.n_samples == 0 and s.offsets.tolist() == [0] and s.positions.shape == (0, 3)
    origins, dirs = _rays(40, torch.float32)
    near, far = ray_aabb(origins, dirs, AABB)
    cases = [
        (near, near, occupancy),
        (near, far, torch.zeros(4, 4, 4, dtype=torch.bool)),
        (near, far, torch.ones(3, 5, 2, dtype=torch.bool)),
        (torch.zeros_like(near), torch.full_like(far, 5.0), occupancy),
    ]
    for n, f, occ in cases:
        a = march_rays(origins, dirs, n, f, occ, AABB, 0.05, 64, implementation="torch")
        b = march_rays(origins, dirs, n, f, occ, AABB, 0.05, 64, implementation="cpp")
        _assert_same_samples(a, b)
    full = march_rays(origins, dirs, near, far, torch.ones(3, 5, 2, dtype=torch.bool), AABB, 0.05, 10_000)
    k = torch.arange(full.n_samples) - full.offsets[full.ray_ids]
    assert torch.equal(full.ts, near[full.ray_ids] + (k.float() + 0.5) * torch.tensor(0.05))


def test_march_rejects_bad_inputs() -> None:
    origins, dirs = _rays(4, torch.float32)
    near, far = ray_aabb(origins, dirs, AABB)
    occ = _occupancy((4, 4, 4))
    with pytest.raises(ValueError, match="occupancy"):
        march_rays(origins, dirs, near, far, occ.float(), AABB, 0.1, 8)
    with pytest.raises(ValueError, match="step"):
        march_rays(origins, dirs, near, far, occ, AABB, 0.0, 8)
    with pytest.raises(ValueError, match="finite"):
        march_rays(origins, dirs, near, torch.full_like(far, float("inf")), occ, AABB, 0.1, 8)
    with pytest.raises(ValueError, match="near and far"):
        march_rays(origins, dirs, near[:2], far, occ, AABB, 0.1, 8)
    with pytest.raises(ValueError, match="implementation"):
        march_rays(origins, dirs, near, far, occ, AABB, 0.1, 8, implementation="numba")  # type: ignore[arg-type]


# --- composite_rays ------------------------------------------------------------------------------


def test_composite_twin_matches_the_definition() -> None:
    counts = _random_counts(30, 15)
    sigmas, rgbs, deltas, ts, offsets = _packed(counts, 3, torch.float64, sigma_scale=60.0)
    sigmas[offsets[3] + 1] = 1e6  # a wall: the ray stops right after it
    for stop in (1e-4, 0.3, 0.0):
        rgb, opacity, depth = composite_rays(sigmas, rgbs, deltas, ts, offsets, stop, implementation="torch")
        ref_rgb, ref_opacity, ref_depth, ref_w = _composite_loop(sigmas, rgbs, deltas, ts, offsets, stop)
        torch.testing.assert_close(rgb, torch.tensor(ref_rgb, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opacity, torch.tensor(ref_opacity, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(depth, torch.tensor(ref_depth, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        weights = composite_weights(sigmas, deltas, offsets, stop)
        torch.testing.assert_close(weights, torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        if stop > 0:
            assert (weights == 0).sum() > sum(c == 0 for c in counts), "no sample was cut off"


def test_composite_twin_gradcheck() -> None:
    sigmas, rgbs, deltas, ts, offsets = _packed([3, 0, 5, 1], 2, torch.float64, sigma_scale=10.0)
    sigmas.requires_grad_()
    rgbs.requires_grad_()
    fn = lambda s, c: composite_rays(s, c, deltas, ts, offsets, 1e-4, implementation="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (sigmas, rgbs))
    assert torch.autograd.gradcheck(lambda s: composite_weights(s, deltas, offsets), (sigmas,))


@needs_cpp
def test_composite_cpp_gradcheck() -> None:
    sigmas, rgbs, deltas, ts, offsets = _packed([3, 0, 5, 1], 2, torch.float64, sigma_scale=10.0)
    sigmas.requires_grad_()
    rgbs.requires_grad_()
    fn = lambda s, c: composite_rays(s, c, deltas, ts, offsets, 1e-4, implementation="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (sigmas, rgbs))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 7])
def test_composite_cpp_equals_torch(dtype: torch.dtype, channels: int) -> None:
    counts = _random_counts(200, 40)
    sigmas, rgbs, deltas, ts, offsets = _packed(counts, channels, dtype, sigma_scale=40.0)
    sigmas[offsets[7] + 2] = 1e8  # opaque walls: the ray ends after them
    sigmas[offsets[12]] = 1e30
    ref_out, ref_grads = _composite_and_grads("torch", sigmas, rgbs, deltas, ts, offsets)
    out, grads = _composite_and_grads("cpp", sigmas, rgbs, deltas, ts, offsets)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL[dtype])
    cut = composite_weights(sigmas, deltas, offsets) == 0
    assert (grads[0][cut & (sigmas > 0)] == 0).all() and (grads[1][cut] == 0).all()
    assert int(cut.sum()) > 100  # early termination did happen


@needs_cpp
def test_composite_cpp_stop_transmittance_extremes() -> None:
    sigmas, rgbs, deltas, ts, offsets = _packed(_random_counts(50, 30), 3, torch.float64, sigma_scale=80.0)
    for stop in (0.0, 0.5, 1.0):
        ref_out, ref_grads = _composite_and_grads("torch", sigmas, rgbs, deltas, ts, offsets, stop)
        out, grads = _composite_and_grads("cpp", sigmas, rgbs, deltas, ts, offsets, stop)
        for a, b in zip(out + grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


@needs_cpp
def test_composite_cpp_without_samples() -> None:
    sigmas, rgbs, deltas, ts, offsets = _packed([0, 0, 0], 3, torch.float32)
    out, grads = _composite_and_grads("cpp", sigmas, rgbs, deltas, ts, offsets)
    assert [tuple(o.shape) for o in out] == [(3, 3), (3,), (3,)] and all((o == 0).all() for o in out)
    assert grads[0].shape == (0,) and grads[1].shape == (0, 3)


def test_composite_rejects_bad_inputs() -> None:
    sigmas, rgbs, deltas, ts, offsets = _packed([2, 3], 3, torch.float32)
    with pytest.raises(ValueError, match="offsets"):
        composite_rays(sigmas, rgbs, deltas, ts, offsets.int())
    with pytest.raises(ValueError, match="offsets"):
        composite_rays(sigmas, rgbs, deltas, ts, offsets + 1)
    with pytest.raises(ValueError, match="rgbs"):
        composite_rays(sigmas, rgbs[:, 0], deltas, ts, offsets)
    with pytest.raises(ValueError, match="stop_transmittance"):
        composite_rays(sigmas, rgbs, deltas, ts, offsets, stop_transmittance=2.0)


# --- implementation choice -----------------------------------------------------------------------


def test_unavailable_kernel_warns_once_and_uses_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_raymarch_kernels, "load_cpu", lambda: None)
    monkeypatch.setattr(raymarch, "_WARNED", set())
    sigmas, rgbs, deltas, ts, offsets = _packed([4, 0, 6], 3, torch.float32)
    ref = composite_rays(sigmas, rgbs, deltas, ts, offsets, implementation="torch")
    with pytest.warns(RuntimeWarning, match="implementation='cpp' is unavailable"):
        out = composite_rays(sigmas, rgbs, deltas, ts, offsets, implementation="cpp")
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        composite_rays(sigmas, rgbs, deltas, ts, offsets, implementation="cpp")  # warned already
        composite_rays(sigmas, rgbs, deltas, ts, offsets, implementation="auto")  # auto: silent
    origins, dirs = _rays(8, torch.float32)
    near, far = ray_aabb(origins, dirs, AABB)
    with pytest.warns(RuntimeWarning, match="march_rays: implementation='cpp'"):
        march_rays(origins, dirs, near, far, _occupancy(), AABB, 0.1, 8, implementation="cpp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_cuda_on_cpu_tensors_warns_and_uses_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raymarch, "_WARNED", set())
    sigmas, rgbs, deltas, ts, offsets = _packed([4, 6], 1, torch.float64)
    with pytest.warns(RuntimeWarning, match="needs CUDA tensors"):
        out = composite_rays(sigmas, rgbs, deltas, ts, offsets, implementation="cuda")
    ref = composite_rays(sigmas, rgbs, deltas, ts, offsets, implementation="torch")
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert raymarch._choose("auto", sigmas.half(), "x") == "torch"


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_source_compiles_standalone(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "cuda_ext" / "raymarch.cu"
    proc = subprocess.run(["nvcc", "-std=c++17", "-c", str(source), "-I", str(source.parent),
                           "-o", str(tmp_path / "raymarch.o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march_cuda_equals_torch(dtype: torch.dtype) -> None:
    assert _raymarch_kernels.cuda_available(dtype)
    origins, dirs = _rays(500, dtype)
    near, far = ray_aabb(origins, dirs, AABB)
    args = [t.cuda() for t in (origins, dirs, near, far, _occupancy(), AABB.to(dtype))]
    for max_samples in (0, 5, 4096):
        a = march_rays(*args, 0.013, max_samples, implementation="torch")
        b = march_rays(*args, 0.013, max_samples, implementation="cuda")
        _assert_same_samples(a, b)
        _assert_same_samples(a, march_rays(*(t.cpu() for t in args), 0.013, max_samples, implementation="torch"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_composite_cuda_equals_torch(dtype: torch.dtype, channels: int) -> None:
    counts = _random_counts(300, 40)
    packed = [t.cuda() for t in _packed(counts, channels, dtype, sigma_scale=40.0)]
    packed[0][int(packed[4][7]) + 2] = 1e8
    ref_out, ref_grads = _composite_and_grads("torch", *packed)
    out, grads = _composite_and_grads("cuda", *packed)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert a.is_cuda and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL[dtype])
