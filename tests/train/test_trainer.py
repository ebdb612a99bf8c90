"""Training: checkpoints round-trip, resume is exact, PSNR rises, bad runs fail clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from avatar.cli import main
from avatar.configs import merge, parse_assignments
from avatar.errors import AvatarError
from avatar.run import RunPaths, load_avatar, load_checkpoint, model_state
from avatar.subject import read_manifest
from avatar.subject_data import Frame
from avatar.train.losses import LossWeights, compute_loss
from avatar.train.trainer import TrainConfig, train
from tests.conftest import tiny_train


def test_checkpoint_round_trip_and_run_layout(small_subject, tmp_path):
    _, subject = small_subject
    run = tmp_path / "run"
    result = train(subject, run, overrides=tiny_train(6), device="cpu")
    assert result.steps == 6
    paths = RunPaths(run)
    assert paths.config.is_file() and paths.latest_checkpoint() == 6
    assert list(paths.previews.glob("*.png")) and list(paths.tensorboard.iterdir())
    loaded = load_avatar(run)
    model, step = loaded.model, loaded.step
    assert step == 6
    tensors, _ = load_checkpoint(paths)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, model_state(tensors)[name])
    saved = json.loads(paths.config.read_text())
    assert saved["model"]["face"]["encoding"]["half_extent"] != [1.0, 1.0, 1.0], "boxes fitted to the head"


def test_interrupt_then_resume_is_exact(small_subject, tmp_path):
    _, subject = small_subject
    straight = train(subject, tmp_path / "a", overrides=tiny_train(8), device="cpu")

    def interrupt_at_5(step, done, total):
        if step == "train" and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(subject, tmp_path / "b", overrides=tiny_train(8), device="cpu", progress=interrupt_at_5)
    assert RunPaths(tmp_path / "b").latest_checkpoint() == 5, "Ctrl-C saves a checkpoint"
    resumed = train(subject, tmp_path / "b", device="cpu", resume=True)
    assert straight.steps == resumed.steps == 8
    a = load_avatar(tmp_path / "a").model
    b = load_avatar(tmp_path / "b").model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


def test_mouth_set_has_its_own_cap(small_subject, tmp_path):
    _, subject = small_subject
    overrides = {**tiny_train(12), "mouth_max_gaussians": 70}
    overrides["strategy"] = {**overrides["strategy"], "grow_grad2d": 0.0}  # every Gaussian wants to grow
    result = train(subject, tmp_path / "run", overrides=overrides, device="cpu")
    model = load_avatar(result.run_dir).model
    assert len(model.mouth) <= 70, "the mouth branch stops at its own cap"
    assert len(model.face) > 600, "the face branch still grows up to the strategy's cap"


def _loss_frame(skin: torch.Tensor, inside: torch.Tensor) -> Frame:
    h, w = skin.shape[:2]
    return Frame(index=0, image=torch.full((h, w, 3), 0.5), background=torch.zeros(h, w, 3),
                 plate_background=torch.zeros(h, w, 3),
                 head_mask=skin + inside, skin_mask=skin, mouth_mask=inside, mouth_box=(0, 0, 0, 0),
                 viewmat=torch.eye(4), head_viewmat=torch.eye(4), K=torch.eye(3), motion=torch.zeros(4))


def test_face_layer_is_opaque_over_the_skin_and_open_over_the_mouth_interior():
    skin = torch.zeros(16, 16, 1)
    skin[4:12, 4:12] = 1.0
    inside = torch.zeros(16, 16, 1)
    inside[8:10, 6:10] = 1.0
    skin[8:10, 6:10] = 0.0
    frame = _loss_frame(skin, inside)
    weights = LossWeights(face_alpha=1.0, mouth_alpha=1.0)
    scales = torch.zeros(1, 3)

    def loss_with(face_alpha: torch.Tensor) -> dict:
        out = {"rgb": frame.image.clone(), "head_alpha": skin + inside, "face_alpha": face_alpha}
        return compute_loss(out, frame, weights, scales, scene_scale=1.0)[1]

    # The mouth layer showing through the skin (face layer transparent there) is penalised in
    # full, and so are face Gaussians painting the inside of the mouth; off the face both are free.
    transparent = loss_with(torch.zeros(16, 16, 1))
    assert transparent["face_alpha"] == pytest.approx(1.0) and transparent["mouth_alpha"] == pytest.approx(0.0)
    opaque = loss_with(torch.ones(16, 16, 1))
    assert opaque["face_alpha"] == pytest.approx(0.0) and opaque["mouth_alpha"] == pytest.approx(1.0)
    right = loss_with(skin.clone())
    assert right["face_alpha"] == pytest.approx(0.0) and right["mouth_alpha"] == pytest.approx(0.0)
    assert loss_with(skin * 0.5)["face_alpha"] == pytest.approx(0.5)


def test_refuses_to_overwrite_and_rejects_bad_options(small_subject, tmp_path):
    _, subject = small_subject
    run = tmp_path / "run"
    train(subject, run, overrides=tiny_train(2), device="cpu")
    with pytest.raises(AvatarError, match="--resume"):
        train(subject, run, overrides=tiny_train(2), device="cpu")
    with pytest.raises(AvatarError, match="no option"):
        train(subject, tmp_path / "other", overrides={"nonsense": 1}, device="cpu")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "missing"), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "not a complete subject" in result.output


def test_set_assignments_parse_to_nested_checked_overrides():
    overrides = parse_assignments(["loss.mouth=2", "model.motion_features=[\"eyeBlinkLeft\"]", "device=cuda",
                                   "strategy.max_gaussians=5000", "loss.dssim=0.5"])
    assert overrides == {"loss": {"mouth": 2, "dssim": 0.5}, "model": {"motion_features": ["eyeBlinkLeft"]},
                         "device": "cuda", "strategy": {"max_gaussians": 5000}}
    config = merge(TrainConfig(), overrides)
    assert config.loss.mouth == 2.0 and isinstance(config.loss.mouth, float)
    assert config.model.motion_features == ("eyeBlinkLeft",) and config.strategy.max_gaussians == 5000
    for bad in (["loss.mouth"], ["=1"], ["loss..mouth=1"], ["loss=1", "loss.mouth=2"]):
        with pytest.raises(ValueError):
            parse_assignments(bad)
    for bad, message in (({"loss": {"mouth": "big"}}, "loss.mouth"), ({"iterations": 10.5}, "iterations"),
                         ({"loss": 1.0}, "group"), ({"loss": {"nonsense": 1}}, "loss.nonsense"),
                         ({"model": {"motion_features": "eyeBlinkLeft"}}, "model.motion_features")):
        with pytest.raises(ValueError, match=message):
            merge(TrainConfig(), bad)


def test_train_command_sets_options_and_a_resumed_run_keeps_them(small_subject, tmp_path):
    _, subject = small_subject
    run = tmp_path / "run"
    args = ["train", str(subject), "-o", str(run), "--iters", "2", "--no-eval", "--device", "cpu",
            "--set", "resolution=64", "--set", "loss.mouth=3.5",
            "--set", 'model.init={"n_face": 200, "n_head": 200, "n_mouth": 40}']
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["loss"]["mouth"] == 3.5 and saved["resolution"] == 64 and saved["iterations"] == 2
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(run), "--resume", "--set", "loss.mouth=1"])
    assert result.exit_code == 1 and "keeps its config.json" in result.output
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(tmp_path / "r2"), "--set", "loss.mouth=big"])
    assert result.exit_code == 1 and "loss.mouth" in result.output
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(tmp_path / "r3"), "--set", "loss.mouth"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output


@pytest.mark.slow
def test_psnr_rises_on_the_sample(small_subject, tmp_path):
    _, subject = small_subject
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(run), "--iters", "300"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_frames"] > 0 and metrics["resolution"] == 128
    assert metrics["psnr"] > 24.0, metrics
    assert np.isfinite(metrics["ssim"])


class _TinyPerceptual(torch.nn.Module):
    """Stands in for the LPIPS network (no torchvision here): a fixed conv feature distance."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.min() >= -1 and x.max() <= 1  # LPIPS takes images in [-1, 1]
        return (self.conv(x) - self.conv(y)).square().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_term_joins_the_loss_when_its_network_loads():
    skin = torch.zeros(48, 48, 1)
    skin[4:44, 4:44] = 1.0
    frame = _loss_frame(skin, torch.zeros(48, 48, 1))
    pred = (frame.image + 0.2 * torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    pred.requires_grad_(True)
    out = {"rgb": pred, "head_alpha": skin, "face_alpha": skin}
    net = _TinyPerceptual()
    off, parts_off = compute_loss(out, frame, LossWeights(), torch.zeros(1, 3), 1.0, net)
    on, parts_on = compute_loss(out, frame, LossWeights(lpips=2.0), torch.zeros(1, 3), 1.0, net)
    assert parts_off["lpips"] == 0.0 and parts_on["lpips"] > 0
    assert float((on - off).detach()) == pytest.approx(2.0 * parts_on["lpips"], rel=1e-5)
    on.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    same = {**out, "rgb": frame.image}
    assert compute_loss(same, frame, LossWeights(lpips=2.0), torch.zeros(1, 3), 1.0, net)[1]["lpips"] == 0.0


def test_a_run_asking_for_lpips_trains_without_it_when_it_cannot_load(small_subject, tmp_path, monkeypatch, caplog):
    import avatar.image_metrics as metrics

    _, subject = small_subject
    monkeypatch.setattr(metrics, "_load_lpips", lambda net, device: None)
    with caplog.at_level("WARNING"):
        result = train(subject, tmp_path / "run", overrides={**tiny_train(2), "loss": {"lpips": 0.1}},
                       device="cpu")
    assert result.steps == 2 and "LPIPS could not be loaded" in caplog.text
    calls = []
    monkeypatch.setattr(metrics, "_load_lpips", lambda net, device: calls.append(net) or _TinyPerceptual())
    train(subject, tmp_path / "run2", overrides={**tiny_train(2), "loss": {"lpips": 0.1, "lpips_net": "vgg"}},
          device="cpu")
    assert calls == ["vgg"]


def _same_weights(a_run, b_run) -> None:
    sa, sb = load_avatar(a_run).model.state_dict(), load_avatar(b_run).model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


def test_time_checkpoints_change_nothing_and_resume_skips_a_truncated_newest(small_subject, tmp_path, caplog):
    """Checkpoints by time (here: after every step) leave the result as it was; when the newest ones
    are cut short (a kill, a full disk), --resume continues from the newest complete one, exactly."""
    _, subject = small_subject
    straight = tmp_path / "straight"
    train(subject, straight, overrides={**tiny_train(8), "checkpoint_minutes": 0.0}, device="cpu")
    timed = tmp_path / "timed"
    every_step = {**tiny_train(8), "checkpoint_every": 1000, "checkpoint_minutes": 1e-9}
    train(subject, timed, overrides=every_step, device="cpu")
    paths = RunPaths(timed)
    assert paths.checkpoint_steps() == [8, 7, 6], "a checkpoint after each step, the newest 3 kept"
    _same_weights(straight, timed)
    for step in (8, 7):
        st = paths.checkpoint(step)[0]
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        resumed = train(subject, timed, device="cpu", resume=True)
    assert resumed.start_step == 6 and resumed.steps == 8
    assert "using step 6" in caplog.text
    _same_weights(straight, timed)


def test_a_run_without_a_checkpoint_is_resumed_from_step_0_or_replaced_with_force(small_subject, tmp_path):
    """Before: a run with a config and no checkpoint was refused by export, render, train and
    train --resume, each pointing to another. Now --resume starts it and --force replaces it."""
    _, subject = small_subject
    run = tmp_path / "run"
    train(subject, run, overrides=tiny_train(2), device="cpu")
    shutil.rmtree(run / "checkpoints")
    result = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "x.ply")])
    assert result.exit_code == 1 and "--resume" in result.output, result.output
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(run), "--no-eval"])
    assert result.exit_code == 1 and "--resume" in result.output and "--force" in result.output, result.output
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(run), "--resume", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert RunPaths(run).latest_checkpoint() == 2
    (run / "mine.txt").write_text("the user's own note")
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(run), "--force", "--no-eval",
                                       "--iters", "1", "--set", "resolution=64",
                                       "--set", 'model.init={"n_face": 200, "n_head": 200, "n_mouth": 40}'])
    assert result.exit_code == 0, result.output
    assert RunPaths(run).checkpoint_steps() == [1], "the old run's checkpoints are gone"
    assert (run / "mine.txt").is_file(), "--force removes what training wrote, nothing else"
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(run), "--force", "--resume"])
    assert result.exit_code == 2
    # --force never replaces what is not a run, nor a directory holding the subject.
    for target in (subject, subject.parent):
        result = CliRunner().invoke(main, ["train", str(subject), "-o", str(target), "--force"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (subject / "subject.json").is_file()


@pytest.mark.parametrize("args", [["--iters", "-5"], ["--iters", "0"]])
def test_train_refuses_numbers_that_train_nothing(small_subject, tmp_path, args):
    _, subject = small_subject
    result = CliRunner().invoke(main, ["train", str(subject), "-o", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and "--iters" in result.output, result.output
    assert not (tmp_path / "run").exists()
    for bad in ("iterations=-5", "checkpoint_every=0", "log_every=0", "resolution=-8", "checkpoint_minutes=-1",
                "mouth_batch=0", "background=wall"):
        result = CliRunner().invoke(main, ["train", str(subject), "-o", str(tmp_path / "run"), "--set", bad])
        assert result.exit_code == 1 and bad.split("=")[0] in result.output, result.output
        assert not (tmp_path / "run").exists()


def test_stale_checkpoint_leftovers_of_a_killed_trainer_are_removed(small_subject, tmp_path, dead_pid):
    """kill -9 while a checkpoint is written leaves a partial file and safetensors' own temporary (in
    our scratch directory, named with the pid); the next start removes them, a live writer's stay."""
    import os

    _, subject = small_subject
    run = tmp_path / "run"
    train(subject, run, overrides=tiny_train(2), device="cpu")
    ckpt = run / "checkpoints"
    stale = [ckpt / f".step_000003.partial{dead_pid}.safetensors", ckpt / f".avatar-ckpt-pid{dead_pid}-abc123"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    (stale[1] / ".tmpAbC123").write_bytes(b"half")
    live = ckpt / f".step_000003.partial{os.getppid()}.safetensors"
    live.write_bytes(b"someone is writing this")
    legacy = ckpt / ".tmpXyZ789"
    legacy.write_bytes(b"an old version's leftover")
    os.utime(legacy, (0, 0))
    train(subject, run, device="cpu", resume=True, overrides={"iterations": 3})
    assert not any(p.exists() for p in stale) and not legacy.exists()
    assert live.exists()


def test_the_audio_encoder_takes_the_shape_of_the_subjects_features(small_subject, tmp_path):
    """A subject made with other features (whisper: 4 x 384 per frame, not mel's 16 x 80) trains and speaks."""
    import shutil

    from avatar.preprocess.pipeline import PreprocessConfig, preprocess
    from avatar.speak import SampleSpeech, SpeechDriver
    from avatar.subject_data import SubjectData
    from tests.conftest import tone

    paths, subject = small_subject
    whisper_subject = tmp_path / "subject"
    shutil.copytree(subject, whisper_subject, ignore=shutil.ignore_patterns(".cache"))
    preprocess(paths.video, whisper_subject, PreprocessConfig(size=128, audio_features="whisper"))
    run = tmp_path / "run"
    train(whisper_subject, run, overrides=tiny_train(2), device="cpu")
    avatar = load_avatar(run, "cpu")
    assert (avatar.model.audio.config.window, avatar.model.audio.config.dim) == (4, 384)
    data = SubjectData(avatar.subject_dir, avatar.resolution, avatar.model.motion_features)
    driver = SpeechDriver(avatar.model, data)
    batch = next(driver.frames(SampleSpeech(tone(0.5)), batch=2))
    frames = avatar.model.render_many(batch.condition, batch.viewmats, data.K, 64, 64,
                                      torch.stack([data.frame(int(i)).background for i in batch.subject_frames]))
    assert frames.shape == (2, 64, 64, 3) and torch.isfinite(frames).all()


def test_mouth_readout_loss_skips_frames_without_a_face_and_is_zero_without_any():
    from avatar.train.losses import mouth_readout_loss

    predicted = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [3.0, 2.0]])
    loss = mouth_readout_loss(predicted, target)
    assert loss.item() == pytest.approx((1.0 + 0.0 + 4.0) / 3)
    nothing = mouth_readout_loss(predicted, torch.full((2, 2), float("nan")))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(predicted.grad, torch.zeros(2, 2))


def test_the_audio_code_learns_to_predict_the_tracked_mouth(small_subject, tmp_path):
    """The read-out's error on the train frames falls well below the variance of the standardised
    targets (1.0) when only the read-out loss teaches the audio path; a code that ignored the mouth
    (or a loss that never reached the encoder) would stay near 1."""
    from avatar.subject import read_manifest
    from avatar.train.trainer import _fit_audio_encoder, _Trainer, make_config

    _, subject = small_subject
    config = merge(make_config("fast", tiny_train(1)), {"subject_absolute": str(subject), "mouth_batch": 128})
    config = _fit_audio_encoder(config, read_manifest(subject).audio_features)
    trainer = _Trainer(config, RunPaths(tmp_path / "run"), torch.device("cpu"), None)
    trainer.setup(resume=False)
    assert trainer.model.mouth_readout is not None and len(trainer.mouth_idx) > 20
    opt = torch.optim.Adam([*trainer.model.audio.parameters(), *trainer.model.mouth_readout.parameters()], lr=3e-3)
    losses = []
    for _ in range(150):
        loss = trainer.mouth_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[:5]) > 0.5 and np.mean(losses[-10:]) < 0.3, (losses[:5], losses[-10:])


@pytest.mark.parametrize("n,batch", [(100, 64), (5, 64), (100, 20), (1, 3)])
def test_mouth_batches_are_runs_of_consecutive_frames_inside_the_range(n, batch):
    from avatar.train.losses import MOUTH_RUN, mouth_batch_picks

    picks = mouth_batch_picks(n, batch, torch.Generator().manual_seed(0))
    assert picks.shape == (batch,) and int(picks.min()) >= 0 and int(picks.max()) < n
    run = min(MOUTH_RUN, n, batch)
    steps = picks[: batch - batch % run].reshape(-1, run).diff(dim=1)
    assert bool((steps == 1).all())


def test_long_subjects_get_more_steps_up_to_the_cap_unless_the_count_is_given():
    from avatar.train.trainer import iterations_for, make_config

    fast = make_config("fast")
    assert iterations_for(fast, 10_000) == fast.iterations  # the preset does not scale
    scaled = make_config("fast", {"iterations_per_frame": 4.0, "max_iterations": 4500})
    assert iterations_for(scaled, 150) == 3000  # an 8 s clip: the preset's count
    assert iterations_for(scaled, 1001) == 4004
    assert iterations_for(scaled, 10_000) == 4500
    assert iterations_for(make_config("fast", {"iterations_per_frame": 4.0}), 2000) == 8000  # no cap


def test_a_new_run_records_the_scaled_count_and_keeps_a_given_one(small_subject, tmp_path):
    from avatar.train.trainer import _new_config, make_config

    _, subject = small_subject
    n_train = read_manifest(subject).split["train"][1]
    chosen = _new_config(subject, RunPaths(tmp_path / "a"), "fast", {"iterations_per_frame": 50.0,
                                                                     "max_iterations": 0}, force=False)
    assert chosen.iterations == max(make_config("fast").iterations, 50 * n_train)
    given = _new_config(subject, RunPaths(tmp_path / "b"), "fast", {"iterations_per_frame": 50.0, "iterations": 7},
                        force=False)
    assert given.iterations == 7
