"""Training the NGP kind end to end, and the commands that use a run through the model interface."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from avatar.cli import main
from avatar.errors import AvatarError
from avatar.eval import evaluate_run
from avatar.export import export_run
from avatar.run import RunPaths, load_avatar
from avatar.speak import RenderOptions, render_speech
from avatar.train import train
from avatar.train.ngp_trainer import pick_rays
from avatar.train.trainer import load_config

TINY_NGP = {
    "resolution": 64,
    "smooth_audio_after": 4,
    "checkpoint_every": 3,
    "preview_every": 3,
    "log_every": 1,
    "rays": 512,
    "patch": 8,
    "grid_every": 2,
    "grid_warmup": 4,
    "model": {"grid_resolution": 16, "steps_per_box": 48, "hidden": 32},
}


def tiny_ngp(iterations: int) -> dict:
    return {**TINY_NGP, "iterations": iterations}


@pytest.fixture(scope="module")
def ngp_run(small_subject, tmp_path_factory):
    _, subject = small_subject
    run = tmp_path_factory.mktemp("ngp") / "run"
    result = train(subject, run, overrides=tiny_ngp(6), device="cpu", model="ngp")
    assert result.steps == 6 and result.n_gaussians is None
    return run


def test_a_run_has_its_kind_boxes_and_checkpoints(ngp_run):
    paths = RunPaths(ngp_run)
    assert paths.latest_checkpoint() == 6 and list(paths.previews.glob("*.png"))
    saved = json.loads(paths.config.read_text())
    assert saved["model_kind"] == "ngp"
    assert saved["model"]["face_encoding"]["half_extent"] != [1.0, 1.0, 1.0], "boxes fitted to the head"
    assert load_config(ngp_run).model.grid_resolution == 16
    loaded = load_avatar(ngp_run)
    assert loaded.kind == "ngp" and loaded.step == 6
    assert bool((loaded.model.density_grid >= 0).any()), "the grid was measured in training"


def test_interrupt_then_resume_is_exact(small_subject, tmp_path):
    _, subject = small_subject
    train(subject, tmp_path / "a", overrides=tiny_ngp(8), device="cpu", model="ngp")

    def interrupt_at_5(step, done, total):
        if step == "train" and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(subject, tmp_path / "b", overrides=tiny_ngp(8), device="cpu", model="ngp", progress=interrupt_at_5)
    resumed = train(subject, tmp_path / "b", device="cpu", resume=True)
    assert resumed.steps == 8
    sa, sb = load_avatar(tmp_path / "a").model.state_dict(), load_avatar(tmp_path / "b").model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


def test_eval_render_and_export_go_through_the_interface(ngp_run, small_subject, tmp_path):
    paths, _ = small_subject
    metrics = evaluate_run(ngp_run, "val", tmp_path / "m.json", device="cpu")
    assert metrics["n_frames"] > 0 and metrics["psnr"] > 5
    summary = render_speech(ngp_run, paths.audio, tmp_path / "out.mp4", RenderOptions(size=64))
    assert summary.n_frames > 0 and (tmp_path / "out.mp4").stat().st_size > 0
    with pytest.raises(AvatarError, match="no Gaussians"):
        export_run(ngp_run, tmp_path / "x.ply")


def test_the_train_command_takes_the_kind_and_rejects_unknown_ones(small_subject, tmp_path):
    _, subject = small_subject
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(tmp_path / "r"), "--model", "ngp",
                                       "--iters", "2", "--no-eval",
                                       *[f"--set={k}={json.dumps(v)}" for k, v in TINY_NGP.items()]])
    assert result.exit_code == 0, result.output
    assert "Gaussians" not in result.output
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(tmp_path / "s"), "--model", "nerf"])
    assert result.exit_code == 2


def test_rays_hold_two_patches_and_stay_in_the_image(small_subject):
    from avatar.subject_data import SubjectData

    _, subject = small_subject
    data = SubjectData(subject, 64, ())
    frame = data.frame(int(data.split("train")[0]))
    xy, n_patch = pick_rays(frame, (10, 10, 50, 60), 512, 8, torch.Generator().manual_seed(0))
    assert xy.shape == (512, 2) and n_patch == 128
    assert int(xy.min()) >= 0 and int(xy.max()) < 64
    patch = xy[:64].reshape(8, 8, 2)
    assert bool((patch[:, 1:, 0] - patch[:, :-1, 0] == 1).all()), "a patch is a square of neighbours"
    x0, y0, x1, y1 = frame.mouth_box
    centre = patch.float().mean(dim=(0, 1))
    assert x0 - 8 <= float(centre[0]) <= x1 + 8 and y0 - 8 <= float(centre[1]) <= y1 + 8, "the first patch is on the mouth"


def test_distortion_loss_equals_its_pairwise_definition():
    from avatar.train.losses import distortion_loss

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    ts = torch.cat([torch.sort(torch.rand(int(c), generator=g, dtype=torch.float64))[0] for c in counts])
    deltas = torch.full_like(ts, 0.05)
    weights = torch.rand(len(ts), generator=g, dtype=torch.float64)
    expected = 0.0
    for r in range(len(counts)):
        w, t, d = (x[offsets[r]:offsets[r + 1]] for x in (weights, ts, deltas))
        expected += float((w[:, None] * w[None] * (t[:, None] - t[None]).abs()).sum() + (w.square() * d).sum() / 3)
    assert float(distortion_loss(weights, ts, deltas, offsets)) == pytest.approx(expected / len(counts), rel=1e-12)
    # One sharp peak costs less than the same weight spread along the ray.
    t = torch.linspace(0, 1, 10, dtype=torch.float64)
    spread = distortion_loss(torch.full((10,), 0.1, dtype=torch.float64), t, torch.full((10,), 0.1), torch.tensor([0, 10]))
    peak = distortion_loss(torch.eye(10, dtype=torch.float64)[4], t, torch.full((10,), 0.1), torch.tensor([0, 10]))
    assert float(peak) < float(spread)


def test_the_viewer_serves_an_ngp_run(ngp_run):
    import urllib.request

    import cv2
    import numpy as np

    from avatar.viewer import start

    running = start(ngp_run, host="127.0.0.1", port=0, device="cpu")
    try:
        def frame(query: str) -> np.ndarray:
            with urllib.request.urlopen(f"{running.url}api/frame?session=s&{query}", timeout=60) as r:
                assert r.status == 200
                return cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR).astype(np.float32)

        head = frame("t=0.5&face=1&mouth=1&background=0")
        flat = frame("face=0&mouth=0&background=0")
        dotted = frame("face=1&mouth=1&background=0&points=1")
        assert head.shape == (64, 64, 3) and flat.std() < 2.0
        assert np.abs(head - flat).max() > 10, "the head is drawn"
        assert np.abs(dotted - head).max() > 50, "the occupied cells are drawn as points"
    finally:
        running.stop()


@pytest.mark.parametrize("preset", ["fast", "default", "best"])
def test_every_ngp_preset_builds_its_model(preset):
    from avatar.models.ngp import NGPHead
    from avatar.train import NGPTrainConfig, make_config

    config = make_config(preset, kind="ngp")
    assert isinstance(config, NGPTrainConfig) and config.model_kind == "ngp"
    assert NGPTrainConfig.from_dict(config.to_dict()) == config
    assert sum(p.numel() for p in NGPHead(config.model).parameters()) > 0
    with pytest.raises(ValueError, match="model kind"):
        make_config(preset, kind="nerf")
