"""The viewer's pure parts: view settings parsing and the orbit camera."""

from __future__ import annotations

import pytest
import torch

from avatar.viewer.state import ViewState, orbit_viewmat, project_points


def test_update_parses_query_strings_and_clamps():
    state = ViewState().update({"t": "1.5", "frame": "3", "follow": "0", "face": "false", "points": "1",
                                "yaw": "190", "pitch": "120", "zoom": "0", "pan_x": "-0.25", "blink": "0.7"})
    assert state.t == 1.5 and state.frame == 3 and not state.follow and not state.face and state.points
    assert state.yaw == pytest.approx(-170.0), "yaw wraps to [-180, 180)"
    assert state.pitch == 89.0 and state.zoom == 0.1, "pitch and zoom are clamped"
    assert state.pan_x == -0.25 and state.blink == 0.7
    assert state.update({"blink": ""}).blink is None and state.update({"blink": None}).blink is None
    assert state.update({"face": True, "t": 2}).face and state.update({"t": 2}).t == 2.0
    assert ViewState().to_dict()["mouth"] is True


@pytest.mark.parametrize("values, match", [
    ({"colour": "red"}, "unknown view setting 'colour'"),
    ({"t": "soon"}, "t: expected a number"),
    ({"zoom": "nan"}, "zoom: expected a finite number"),
    ({"face": "maybe"}, "face: expected a boolean"),
])
def test_update_rejects_bad_settings(values, match):
    with pytest.raises(ValueError, match=match):
        ViewState().update(values)


def _camera(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A camera 1 m in front of a target off the optical axis (world-to-camera, target, K)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = q
    target_cam = torch.tensor([0.05, -0.03, 1.0], dtype=torch.float64)
    target = q.T @ (target_cam - viewmat[:3, 3])
    K = torch.tensor([[500.0, 0, 64], [0, 500.0, 64], [0, 0, 1]], dtype=torch.float64)
    return viewmat, target, K


def _pixel(viewmat, point, K):
    cam = viewmat[:3, :3] @ point + viewmat[:3, 3]
    return (K @ (cam / cam[2]))[:2], cam


def test_orbit_defaults_are_the_training_camera():
    viewmat, target, _ = _camera()
    torch.testing.assert_close(orbit_viewmat(viewmat, target), viewmat)


def test_orbit_keeps_distance_zoom_keeps_pixel_pan_shifts_it():
    viewmat, target, K = _camera(1)
    base_px, base_cam = _pixel(viewmat, target, K)
    turned = orbit_viewmat(viewmat, target, yaw=35.0, pitch=-20.0)
    px, cam = _pixel(turned, target, K)
    torch.testing.assert_close(px, base_px)  # the pivot stays on its pixel
    assert float(torch.linalg.norm(cam)) == pytest.approx(float(torch.linalg.norm(base_cam)))
    off = target + torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64)
    assert not torch.allclose(_pixel(turned, off, K)[0], _pixel(viewmat, off, K)[0]), "the head turns"
    assert torch.allclose(torch.linalg.det(turned[:3, :3]), torch.tensor(1.0, dtype=torch.float64))
    zoomed = orbit_viewmat(viewmat, target, zoom=2.0)
    zpx, zcam = _pixel(zoomed, target, K)
    torch.testing.assert_close(zpx, base_px)
    assert float(zcam[2]) == pytest.approx(float(base_cam[2]) / 2)
    panned = orbit_viewmat(viewmat, target, pan_x=0.1, pan_y=-0.05)
    ppx, _ = _pixel(panned, target, K)
    torch.testing.assert_close(ppx - base_px, torch.tensor([50.0, -25.0], dtype=torch.float64))


def test_orbit_yaw_of_90_degrees_shows_the_side():
    viewmat = torch.eye(4)
    viewmat[2, 3] = 1.0  # camera 1 m in front of the origin
    target = torch.zeros(3)
    side = orbit_viewmat(viewmat, target, yaw=90.0)
    nose = torch.tensor([0.0, 0.0, -0.1])  # towards the training camera
    cam = side[:3, :3] @ nose + side[:3, 3]
    assert abs(float(cam[2]) - 1.0) < 1e-5 and abs(abs(float(cam[0])) - 0.1) < 1e-5


def test_project_points_keeps_visible_ones():
    viewmat = torch.eye(4)
    K = torch.tensor([[10.0, 0, 8], [0, 10.0, 8], [0, 0, 1]])
    points = torch.tensor([[0.0, 0.0, 1.0], [0.35, 0.0, 1.0], [5.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    px = project_points(points, viewmat, K, 16, 16)
    assert px.tolist() == [[8, 8], [11, 8]]

