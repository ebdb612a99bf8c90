"""Densification strategy and its optimizer-synchronised parameter edits."""

from __future__ import annotations

import math

import pytest
import torch

from avatar.models.gaussians import GaussianSet
from avatar.render import rasterize
from avatar.train import ops
from avatar.train.strategy import STATE_KEYS, DensifyStrategy

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
LRS = {"means": 1e-3, "quats": 1e-3, "log_scales": 5e-3, "opacity_logits": 5e-2, "sh": 2.5e-3}


def make_set(n: int, scale: float = 0.01, opacity: float = 0.5, seed: int = 0) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.3
    colors = torch.rand(n, 3, generator=g)
    return GaussianSet(means, colors, torch.full((n,), scale), opacity, sh_degree=0)


def fake_meta(pixel_grads: torch.Tensor, visible: torch.Tensor, size: int = 64) -> dict:
    """A rasterize-like meta with hand-set screen gradients. grads [C, N, 2], visible [C, N]."""
    means2d = torch.zeros_like(pixel_grads, requires_grad=True)
    means2d.grad = pixel_grads.clone()
    radii = visible[..., None].expand(-1, -1, 2).to(torch.int32) * 3
    return {"means2d": means2d, "radii": radii, "visible": visible, "width": size, "height": size,
            "n_cameras": pixel_grads.shape[0]}


def fill_state(optimizer: torch.optim.Adam, gaussians: GaussianSet) -> None:
    """Give every parameter Adam state whose rows hold their own index."""
    for name in GaussianSet.PARAM_NAMES:
        p = getattr(gaussians, name)
        rows = torch.arange(p.shape[0], dtype=p.dtype).reshape((-1,) + (1,) * (p.dim() - 1))
        optimizer.state[p] = {"step": torch.tensor(7.0), "exp_avg": rows.expand_as(p).clone(),
                              "exp_avg_sq": rows.expand_as(p).clone() + 0.5}


def assert_in_sync(gaussians: GaussianSet, optimizer: torch.optim.Adam) -> None:
    n = len(gaussians)
    for group in optimizer.param_groups:
        name = group["name"]
        p = getattr(gaussians, name)
        assert group["params"][0] is p, name
        assert p.shape[0] == n, name
        for key in ("exp_avg", "exp_avg_sq"):
            if p in optimizer.state:
                assert optimizer.state[p][key].shape == p.shape, (name, key)


# ------------------------------------------------------------------------------- ops


def test_remove_keeps_rows_with_their_state() -> None:
    gs = make_set(6)
    opt = ops.make_optimizer(gs, LRS)
    fill_state(opt, gs)
    old_means = gs.means.detach().clone()
    n = ops.remove(gs, opt, torch.tensor([False, True, False, True, False, False]))
    assert n == 2 and len(gs) == 4
    assert_in_sync(gs, opt)
    kept = torch.tensor([0, 2, 4, 5])
    torch.testing.assert_close(gs.means.detach(), old_means[kept])
    for name in GaussianSet.PARAM_NAMES:
        st = opt.state[getattr(gs, name)]
        assert st["exp_avg"].reshape(4, -1)[:, 0].tolist() == kept.float().tolist(), name
        assert st["exp_avg_sq"].reshape(4, -1)[:, 0].tolist() == (kept.float() + 0.5).tolist()
        assert float(st["step"]) == 7.0


def test_duplicate_appends_copies_with_zero_state() -> None:
    gs = make_set(5)
    opt = ops.make_optimizer(gs, LRS)
    fill_state(opt, gs)
    old_sh = gs.sh.detach().clone()
    n = ops.duplicate(gs, opt, torch.tensor([True, False, True, False, False]))
    assert n == 2 and len(gs) == 7
    assert_in_sync(gs, opt)
    torch.testing.assert_close(gs.sh.detach(), old_sh[[0, 1, 2, 3, 4, 0, 2]])
    rows = opt.state[gs.means]["exp_avg"][:, 0].tolist()
    assert rows == [0, 1, 2, 3, 4, 0, 0]
    assert opt.state[gs.opacity_logits]["exp_avg_sq"].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5, 0, 0]


def test_split_children_follow_the_parent_shape() -> None:
    gs = make_set(3)
    with torch.no_grad():
        gs.log_scales[1] = torch.log(torch.tensor([0.5, 0.001, 0.001]))
        # 90 degrees about z: the parent's long axis (local x) points along world y.
        gs.quats[1] = torch.tensor([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])
    opt = ops.make_optimizer(gs, LRS)
    fill_state(opt, gs)
    parent_mean = gs.means[1].detach().clone()
    parent_log_scale = gs.log_scales[1].detach().clone()
    n = ops.split(gs, opt, torch.tensor([False, True, False]), generator=torch.Generator().manual_seed(1))
    assert n == 1 and len(gs) == 4
    assert_in_sync(gs, opt)
    assert opt.state[gs.means]["exp_avg"][:, 0].tolist() == [0, 2, 0, 0]
    children = gs.means.detach()[2:] - parent_mean
    assert children[:, 0].abs().max() < 0.01 and children[:, 2].abs().max() < 0.01
    assert children[:, 1].abs().max() > 0.01  # spread along the rotated long axis
    torch.testing.assert_close(gs.log_scales.detach()[2:], (parent_log_scale - math.log(1.6)).expand(2, 3))


def test_split_spread_matches_the_gaussian() -> None:
    gs = make_set(2000, scale=0.2)
    before = gs.means.detach().clone()
    ops.split(gs, None, torch.ones(2000, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    offsets = gs.means.detach() - before.repeat(2, 1)
    assert abs(float(offsets.std()) - 0.2) < 0.01


def test_reset_opacity_clamps_and_clears_moments() -> None:
    gs = make_set(4, opacity=0.9)
    with torch.no_grad():
        gs.opacity_logits[0] = -6.0  # already below the ceiling: unchanged
    opt = ops.make_optimizer(gs, LRS)
    fill_state(opt, gs)
    ops.reset_opacity(gs, opt, 0.01)
    assert_in_sync(gs, opt)
    assert float(gs.opacities.detach().max()) <= 0.01 + 1e-6
    assert float(gs.opacity_logits.detach()[0]) == -6.0
    assert opt.state[gs.opacity_logits]["exp_avg"].abs().sum() == 0
    assert opt.state[gs.means]["exp_avg"][:, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ops.reset_opacity(gs, opt, 1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_keep_the_optimizer_usable(device: str) -> None:
    gs = make_set(8).to(device)
    opt = ops.make_optimizer(gs, LRS)
    loss = sum(getattr(gs, n).square().sum() for n in GaussianSet.PARAM_NAMES)
    loss.backward()
    opt.step()
    ops.duplicate(gs, opt, torch.arange(8) < 3)  # masks may live on another device
    ops.split(gs, opt, torch.arange(11, device=device) % 2 == 0)
    ops.reset_opacity(gs, opt, 0.01)
    ops.remove(gs, opt, torch.arange(len(gs)) == 0)
    opt.zero_grad()
    loss = sum(getattr(gs, n).square().sum() for n in GaussianSet.PARAM_NAMES)
    loss.backward()
    opt.step()
    assert_in_sync(gs, opt)


def test_bad_mask_and_layout_raise() -> None:
    gs = make_set(4)
    with pytest.raises(ValueError, match=r"bool \[N\] = \[4\]"):
        ops.remove(gs, None, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="missing"):
        ops.make_optimizer(gs, {"means": 1e-3})
    shared = torch.optim.Adam([{"params": [gs.means, gs.quats]}])
    with pytest.raises(ValueError, match="alone in its optimizer group"):
        DensifyStrategy().check_sanity(gs, shared)
    DensifyStrategy().check_sanity(gs, ops.make_optimizer(gs, LRS))


# ------------------------------------------------------------------------------- strategy


def grads_for(n: int, high: list[int], value: float = 1e-4) -> torch.Tensor:
    """Pixel gradients [1, n, 2]: ``value`` on rows ``high``, tiny elsewhere."""
    g = torch.full((1, n, 2), 1e-7)
    g[0, high] = value
    return g


@pytest.mark.parametrize("device", DEVICES)
def test_clone_split_prune_counts(device: str) -> None:
    gs = make_set(10, scale=0.001)
    with torch.no_grad():
        gs.log_scales[4:8] = math.log(0.05)  # big: above grow_scale3d * scene_scale
        gs.opacity_logits[9] = -8.0  # transparent: pruned
    gs.to(device)
    opt = ops.make_optimizer(gs, LRS)
    strategy = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0)
    state = strategy.initialize_state(len(gs))  # on the CPU, as after loading a checkpoint
    meta = fake_meta(grads_for(10, [0, 1, 4, 5]).to(device), torch.ones(1, 10, dtype=torch.bool, device=device))
    counts = strategy.step_post_backward(gs, opt, state, 1, meta, scene_scale=1.0)
    assert (counts["cloned"], counts["split"], counts["pruned"], counts["reset"]) == (2, 2, 1, 0)
    assert len(gs) == 10 + 2 + 2 - 1 == counts["n_gaussians"]
    assert_in_sync(gs, opt)
    assert all(state[k].shape == (len(gs),) and float(state[k].abs().sum()) == 0 for k in STATE_KEYS)
    assert all(getattr(gs, n).device.type == device for n in GaussianSet.PARAM_NAMES)


def test_statistics_average_over_visible_cameras_only() -> None:
    # Threshold 2e-4 in NDC units; with W = 64 and C = 2 a pixel gradient g counts as g * 32 * 2.
    # Row 0 is seen by one camera: mean 2.5e-6 * 64 = 1.6e-4 if the invisible camera counted
    # (below), 3.2e-4 if not (above). Row 1 is seen by both with the same gradient each time.
    n = 3
    grads = torch.zeros(2, n, 2)
    grads[0, 0] = 2.5e-6 / math.sqrt(2) * 2
    grads[:, 1] = 1e-6
    visible = torch.tensor([[True, True, True], [False, True, True]])
    gs = make_set(n, scale=0.001)
    strategy = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0)
    state = strategy.initialize_state(n)
    strategy._accumulate(state, fake_meta(grads, visible), n)
    assert state["count"].tolist() == [1.0, 2.0, 2.0]
    avg = state["grad2d"] / state["count"]
    assert avg[0] > strategy.grow_grad2d > avg[1]
    counts = strategy.step_post_backward(gs, None, strategy.initialize_state(n), 1,
                                         fake_meta(grads, visible))
    assert counts["cloned"] == 1


def test_schedule_gates_refinement_and_reset() -> None:
    gs = make_set(6, scale=0.001, opacity=0.9)
    opt = ops.make_optimizer(gs, LRS)
    strategy = DensifyStrategy(refine_start_iter=10, refine_every=5, reset_every=20, refine_stop_iter=30)
    state = strategy.initialize_state(6)
    vis = torch.ones(1, 6, dtype=torch.bool)
    for step in (5, 10):  # on the refine_every grid, but not after refine_start_iter
        counts = strategy.step_post_backward(gs, opt, state, step, fake_meta(grads_for(6, [0]), vis))
        assert counts["cloned"] == 0
    assert state["count"].tolist() == [2.0] * 6
    counts = strategy.step_post_backward(gs, opt, state, 15, fake_meta(grads_for(6, [0]), vis))
    assert counts["cloned"] == 1 and len(gs) == 7
    counts = strategy.step_post_backward(gs, opt, state, 20, fake_meta(grads_for(7, []), vis.new_ones(1, 7)))
    assert counts["reset"] == 1 and float(gs.opacities.detach().max()) <= 0.0101
    state_before = {k: v.clone() for k, v in state.items()}
    counts = strategy.step_post_backward(gs, opt, state, 30, fake_meta(grads_for(7, [0]), vis.new_ones(1, 7)))
    assert counts == {"cloned": 0, "split": 0, "pruned": 0, "reset": 0, "n_gaussians": 7}
    assert all(torch.equal(state[k], state_before[k]) for k in STATE_KEYS)


def test_max_gaussians_keeps_the_strongest() -> None:
    gs = make_set(10, scale=0.001)
    opt = ops.make_optimizer(gs, LRS)
    strategy = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0, max_gaussians=13)
    grads = torch.full((1, 10, 2), 1e-7)
    for row, value in zip([1, 3, 5, 7, 8, 9], [1e-4, 5e-4, 2e-4, 9e-4, 3e-4, 4e-4]):
        grads[0, row] = value
    counts = strategy.step_post_backward(gs, opt, strategy.initialize_state(10), 1,
                                         fake_meta(grads, torch.ones(1, 10, dtype=torch.bool)))
    assert counts["cloned"] == 3 and len(gs) == 13
    torch.testing.assert_close(gs.means.detach()[10:], gs.means.detach()[[3, 7, 9]])
    counts = strategy.step_post_backward(gs, opt, strategy.initialize_state(13), 2,
                                         fake_meta(grads_for(13, list(range(13))),
                                                   torch.ones(1, 13, dtype=torch.bool)))
    assert counts["cloned"] + counts["split"] == 0 and len(gs) == 13


def test_recycling_at_the_cap_retires_the_faintest_for_the_strongest() -> None:
    gs = make_set(20, scale=0.001, opacity=0.5)
    with torch.no_grad():
        gs.opacity_logits[[2, 6, 11]] = torch.logit(torch.tensor([0.02, 0.01, 0.03]))  # faint, above prune_opa
        gs.opacity_logits[15] = torch.logit(torch.tensor(0.04))
    opt = ops.make_optimizer(gs, LRS)
    fill_state(opt, gs)
    strategy = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0, max_gaussians=20,
                               recycle_share=0.1, recycle_opa=0.05)
    grads = torch.full((1, 20, 2), 1e-7)
    grads[0, 4], grads[0, 9], grads[0, 6] = 9e-4, 5e-4, 8e-4  # row 6 is faint: retired, not grown
    state = strategy.initialize_state(20)
    means_before = gs.means.detach().clone()
    counts = strategy.step_post_backward(gs, opt, state, 1, fake_meta(grads, torch.ones(1, 20, dtype=torch.bool)))
    # 10 % of 20 = 2 retired (the two faintest: rows 6 and 2), and the two strongest left clone.
    assert counts["pruned"] == 2 and counts["cloned"] == 2 and len(gs) == 20
    kept = [i for i in range(20) if i not in (2, 6)]
    torch.testing.assert_close(gs.means.detach()[:18], means_before[kept])
    torch.testing.assert_close(gs.means.detach()[18:], means_before[[4, 9]])
    assert_in_sync(gs, opt)
    assert all(state[k].shape == (20,) for k in STATE_KEYS)
    # Nothing faint enough: nothing retired, so no room to grow.
    opaque = make_set(20, scale=0.001, opacity=0.5)
    counts = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0, max_gaussians=20,
                             recycle_share=0.1).step_post_backward(
        opaque, None, strategy.initialize_state(20), 1, fake_meta(grads, torch.ones(1, 20, dtype=torch.bool)))
    assert counts["pruned"] == 0 and counts["cloned"] == 0 and len(opaque) == 20
    with pytest.raises(ValueError, match="recycle_share"):
        DensifyStrategy(recycle_share=1.0)


def test_prune_never_empties_the_set() -> None:
    gs = make_set(4, opacity=0.001)
    strategy = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0)
    counts = strategy.step_post_backward(gs, None, strategy.initialize_state(4), 1,
                                         fake_meta(grads_for(4, []), torch.ones(1, 4, dtype=torch.bool)))
    assert counts["pruned"] == 0 and len(gs) == 4


def test_screen_size_pruning_uses_pre_growth_rows() -> None:
    gs = make_set(4, scale=0.001)
    with torch.no_grad():
        gs.log_scales[1] = math.log(0.05)  # will be split
    strategy = DensifyStrategy(refine_start_iter=0, refine_every=1, reset_every=0,
                               refine_scale2d_stop_iter=100, prune_scale2d=0.1)
    meta = fake_meta(grads_for(4, [0, 1]), torch.ones(1, 4, dtype=torch.bool))
    meta["radii"] = torch.tensor([[[1, 1], [20, 20], [1, 1], [20, 20]]], dtype=torch.int32)  # 20/64 > 0.1
    counts = strategy.step_post_backward(gs, None, strategy.initialize_state(4), 1, meta)
    # Row 3 is too big on screen; row 1 too, but it was split and its children are judged anew.
    assert (counts["cloned"], counts["split"], counts["pruned"]) == (1, 1, 1)
    assert len(gs) == 4 + 1 + 1 - 1


def test_errors_name_the_problem() -> None:
    gs = make_set(4)
    strategy = DensifyStrategy()
    meta = fake_meta(grads_for(4, []), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[N\] = \[4\]"):
        strategy.step_post_backward(gs, None, strategy.initialize_state(5), 0, meta)
    meta["means2d"].grad = None
    with pytest.raises(ValueError, match="after loss.backward"):
        strategy.step_post_backward(gs, None, strategy.initialize_state(4), 0, meta)
    with pytest.raises(ValueError, match="refine_every"):
        DensifyStrategy(refine_every=0)


def test_state_round_trips_through_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    strategy = DensifyStrategy()
    state = strategy.initialize_state(5)
    strategy._accumulate(state, fake_meta(grads_for(5, [2]), torch.ones(1, 5, dtype=torch.bool)), 5)
    save_file(state, tmp_path / "s.safetensors")
    loaded = load_file(tmp_path / "s.safetensors")
    assert set(loaded) == set(STATE_KEYS)
    assert all(torch.equal(loaded[k], state[k]) for k in STATE_KEYS)


def test_training_loop_with_the_rasterizer() -> None:
    torch.manual_seed(0)
    size, n = 32, 200
    gs = make_set(n, scale=0.03, opacity=0.3)
    with torch.no_grad():
        gs.log_scales[::2] = math.log(0.005)  # half small (cloned), half big (split)
        gs.opacity_logits[::10] = -7.0  # a few transparent ones (pruned)
    opt = ops.make_optimizer(gs, LRS)
    strategy = DensifyStrategy(refine_start_iter=1, refine_every=3, reset_every=9,
                               refine_stop_iter=50, max_gaussians=600)
    strategy.check_sanity(gs, opt)
    state = strategy.initialize_state(n)
    K = torch.tensor([[40.0, 0, size / 2], [0, 40.0, size / 2], [0, 0, 1]]).expand(2, 3, 3)
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[:, 2, 3] = 2.5
    viewmats[1, 0, 3] = 0.8  # second camera shifted: some Gaussians fall outside its view
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    target = torch.stack([xx, yy, 0.5 * (xx + yy)], dim=-1).expand(2, size, size, 3)
    totals = {"cloned": 0, "split": 0, "pruned": 0, "reset": 0}
    for step in range(12):
        rgb, _, meta = rasterize(gs.means, gs.quats, gs.scales, gs.opacities, gs.sh, viewmats, K,
                                 size, size, sh_degree=0, backend="torch")
        loss = (rgb - target).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert not bool(meta["visible"].all())  # the shifted camera misses some
        counts = strategy.step_post_backward(gs, opt, state, step, meta, scene_scale=0.5)
        for key in totals:
            totals[key] += counts[key]
        assert_in_sync(gs, opt)
        assert all(state[k].shape == (len(gs),) for k in STATE_KEYS)
        assert len(gs) <= 600
    assert min(totals["cloned"], totals["split"], totals["pruned"]) > 0 and totals["reset"] == 1
    assert torch.isfinite(gs.means).all()
