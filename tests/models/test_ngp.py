"""The NGP talking head: rays, boxes, the occupancy grid, and rendering through the model interface."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatar.models import MODEL_KINDS, AvatarModel, FrameCondition
from avatar.models.ngp import NGPHead, NGPHeadConfig, camera_rays, fit_ngp_boxes


def _model(seed: int = 0, **changes) -> NGPHead:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    face = rng.normal(size=(200, 3)) * [0.07, 0.09, 0.06]
    mouth = rng.normal(size=(30, 3)) * 0.01 + [0.0, -0.04, 0.03]
    config = NGPHeadConfig(grid_resolution=16, steps_per_box=48, **changes)
    config = fit_ngp_boxes(dataclasses.replace(config, motion_features=("eye_blink_left", "head_rot_y")), face, mouth)
    return NGPHead(config)


def _camera(distance: float = 1.2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A camera on the +z axis looking at the origin (OpenCV axes: x right, y down, z forward)."""
    viewmat = torch.eye(4)
    viewmat[:3, :3] = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # flip y and z: looks down -z of the world
    viewmat[2, 3] = distance
    K = torch.tensor([[size * 1.2, 0, size / 2], [0, size * 1.2, size / 2], [0, 0, 1]])
    return viewmat, K


def _cond(model: NGPHead, seed: int = 1) -> FrameCondition:
    g = torch.Generator().manual_seed(seed)
    return FrameCondition(torch.randn(model.config.audio.code_dim, generator=g),
                          torch.randn(len(model.motion_features), generator=g))


def test_it_is_a_model_kind_of_the_interface():
    assert MODEL_KINDS["ngp"] == (NGPHeadConfig, NGPHead)
    assert isinstance(_model(), AvatarModel)
    assert _model().canonical_gaussians() is None


def test_camera_rays_go_through_the_pixels():
    viewmat, K = _camera()
    xy = torch.tensor([[16, 16], [0, 0], [31, 5]])
    origins, dirs = camera_rays(viewmat, K, xy)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(3))
    # Points along each ray project back onto its pixel centre.
    points = origins + 0.4 * dirs
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = (cam @ K.T)[:, :2] / cam[:, 2:]
    torch.testing.assert_close(uv, xy.float() + 0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(origins[0], torch.tensor([0.0, 0.0, 1.2]))


def test_the_box_projects_around_the_head_and_render_marches_only_there():
    model = _model().eval()
    viewmat, K = _camera()
    x0, y0, x1, y1 = model.box_pixels(viewmat, K, 32, 32)
    assert 0 < x0 < x1 < 32 and 0 < y0 < y1 <= 32, (x0, y0, x1, y1)
    with torch.no_grad():
        out = model.render(_cond(model), viewmat, K, 32, 32, torch.full((32, 32, 3), 0.5))
    alpha = out["head_alpha"][..., 0]
    assert float(alpha[y0:y1, x0:x1].max()) > 0.05
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert float(alpha[outside].abs().max()) == 0.0
    torch.testing.assert_close(out["rgb"][outside], torch.full((int(outside.sum()), 3), 0.5))
    # The composite is the premultiplied head over the background.
    torch.testing.assert_close(out["rgb"], out["head_rgb"] + (1 - out["head_alpha"]) * 0.5)


def test_render_equals_marching_its_pixels_and_chunks_change_nothing():
    model = _model().eval()
    viewmat, K = _camera()
    cond = _cond(model)
    with torch.no_grad():
        whole = model.render(cond, viewmat, K, 32, 32)
        model.chunk = 37
        chunked = model.render(cond, viewmat, K, 32, 32)
        xy = torch.tensor([[16, 16], [12, 20]])
        rays = model.render_pixels(cond, viewmat, K, xy)
    torch.testing.assert_close(whole["rgb"], chunked["rgb"], atol=1e-6, rtol=0)
    torch.testing.assert_close(whole["head_rgb"][xy[:, 1], xy[:, 0]], rays["rgb"], atol=1e-6, rtol=0)


def test_conditions_change_the_head_and_layers_hide_fields():
    model = _model().eval()
    viewmat, K = _camera()
    with torch.no_grad():
        a = model.render(_cond(model, 1), viewmat, K, 32, 32)["rgb"]
        b = model.render(_cond(model, 2), viewmat, K, 32, 32)["rgb"]
        mouth_only = model.render(_cond(model, 1), viewmat, K, 32, 32, layers=("mouth",))["head_alpha"]
        nothing = model.render(_cond(model, 1), viewmat, K, 32, 32, layers=())["head_alpha"]
        everything = model.render(None, viewmat, K, 32, 32)["head_alpha"]
    assert float((a - b).abs().max()) > 1e-4
    assert float(nothing.abs().max()) == 0.0
    assert 0 < float(mouth_only.sum()) < float(everything.sum())


def test_gradients_reach_both_fields_and_the_audio_code():
    model = _model()
    viewmat, K = _camera()
    cond = _cond(model)
    cond.audio.requires_grad_(True)
    ys, xs = torch.meshgrid(torch.arange(8, 24), torch.arange(8, 24), indexing="ij")
    out = model.render_pixels(cond, viewmat, K, torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))
    out["rgb"].sum().backward()
    assert cond.audio.grad is not None and float(cond.audio.grad.abs().sum()) > 0
    assert float(model.face.encoding.embeddings.grad.abs().sum()) > 0
    assert float(model.mouth.density[0].weight.grad.abs().sum()) > 0


def test_the_occupancy_grid_empties_where_the_field_is_empty_but_keeps_the_mouth():
    model = _model().eval()
    assert bool(model.occupancy().all()), "unmeasured cells are marched"
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.face.density[-1].bias[0] = -20.0  # an empty face field
        model.mouth.density[-1].bias[0] = -20.0
    g = model.config.grid_resolution
    model.update_density_grid([_cond(model)], torch.arange(g ** 3))
    occupied = model.occupancy()
    assert bool(occupied[model.mouth_cells].all()), "the mouth box stays marched"
    near_mouth = torch.nn.functional.max_pool3d(model.mouth_cells[None].float(), 3, 1, 1)[0] > 0  # jitter crosses cells
    assert not bool(occupied[~near_mouth].any()), "empty space is skipped"
    viewmat, K = _camera()
    with torch.no_grad():
        out = model.render(_cond(model), viewmat, K, 32, 32)
    assert float(out["head_alpha"].max()) < 1e-3


def test_state_round_trip_keeps_the_grid():
    model = _model().eval()
    g = model.config.grid_resolution
    model.update_density_grid([_cond(model)], torch.arange(0, g ** 3, 3))
    again = NGPHead.from_state_dict(model.config, model.state_dict()).eval()
    torch.testing.assert_close(again.density_grid, model.density_grid)
    assert bool((again.occupancy() == model.occupancy()).all())
    viewmat, K = _camera()
    with torch.no_grad():
        torch.testing.assert_close(again.render(_cond(model), viewmat, K, 32, 32)["rgb"],
                                   model.render(_cond(model), viewmat, K, 32, 32)["rgb"])


def test_config_round_trips_and_refuses_nonsense():
    model = _model()
    assert NGPHeadConfig.from_dict(model.config.to_dict()) == model.config
    with pytest.raises(ValueError, match="grid_resolution"):
        NGPHeadConfig(grid_resolution=0)


def test_training_marches_only_what_compositing_keeps_and_renders_the_same():
    model = _model()
    with torch.no_grad():
        model.face.density[-1].bias[0] = 4.0  # a dense head: rays stop early
    viewmat, K = _camera()
    cond = _cond(model)
    ys, xs = torch.meshgrid(torch.arange(4, 28), torch.arange(4, 28), indexing="ij")
    xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    with torch.no_grad():
        everything = model.render_pixels(cond, viewmat, K, xy)
    trimmed = model.render_pixels(cond, viewmat, K, xy)  # grad enabled: the occluded samples are dropped
    assert trimmed["samples"] < 0.7 * everything["samples"]
    for key in ("rgb", "alpha", "depth"):  # rendering (in rounds) differs by less than stop_transmittance
        torch.testing.assert_close(trimmed[key].detach(), everything[key], atol=2e-3, rtol=0)


def test_rendering_in_rounds_equals_marching_every_sample_at_once():
    model = _model()
    with torch.no_grad():
        model.face.density[-1].bias[0] = 2.0
    model.config = dataclasses.replace(model.config, round_samples=3, stop_transmittance=0.0)
    viewmat, K = _camera()
    cond = _cond(model)
    ys, xs = torch.meshgrid(torch.arange(2, 30), torch.arange(2, 30), indexing="ij")
    xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    with torch.no_grad():
        rounds = model.render_pixels(cond, viewmat, K, xy)
    once = model.render_pixels(cond, viewmat, K, xy)  # all samples in one pass (nothing stops: threshold 0)
    assert rounds["samples"] == once["samples"] > 0
    for key in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(rounds[key], once[key].detach(), atol=1e-5, rtol=1e-4)


def test_region_attention_gates_each_condition_channel_by_position():
    model = _model()
    branch, cond = model.face, _cond(model)
    x = torch.randn(50, 3) * 0.05
    raw, rgb = branch(x, cond.audio, cond.motion)
    feats = branch.encoding(x)
    gates = torch.sigmoid(branch.attention(feats))
    reference = branch.density(torch.cat([feats, gates * torch.cat([cond.audio, cond.motion])[None]], dim=-1))
    torch.testing.assert_close(raw, reference[:, 0])
    torch.testing.assert_close(rgb, torch.sigmoid(branch.color(reference[:, 1:])))


def test_the_bitfield_follows_the_grid_however_it_changes():
    model = _model().eval()
    assert bool(model.occupancy().all())
    other = _model()
    g = other.config.grid_resolution
    with torch.no_grad():
        other.density_grid.fill_(0.0)
        other.density_grid[0, 0, 0] = 1e6  # one dense cell
    model.load_state_dict(other.state_dict())  # in place, not through from_state_dict
    occupied = model.occupancy()
    assert bool(occupied[0, 0, 0]) and int(occupied.sum()) == 1 + int(model.mouth_cells.sum()) - int(model.mouth_cells[0, 0, 0])
    model.update_density_grid([_cond(model)], torch.arange(g ** 3))
    assert not bool((model.occupancy() == occupied).all()), "an update changes the bitfield"
