"""Training a talking Gaussian head on a subject.

Stages follow the anchors, as iteration counts of the preset:

1. static (``static_iterations``): the canonical Gaussians alone learn the average head;
2. deform: the face and mouth branches learn audio- and eye-driven offsets, the audio encoder
   first on single frames, then (``smooth_audio_after``) with temporal attention;
3. fuse (the last ``1 - fuse_after`` share): learning rates decay, densification has stopped.

Only train-split frames are sampled; the validation split is never seen.

Checkpoints are written every ``checkpoint_every`` steps and every ``checkpoint_minutes`` of
training, so that a crash or a kill loses minutes, not the work before the first step count.
Saving reads the random generators without advancing them, so when checkpoints fall changes
nothing in the trained result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from avatar.atomic import atomic_output, check_writable_dir, clean_stale, refuse_overwrite
from avatar.configs import Config, merge, preset_overrides
from avatar.errors import AvatarError, OutputExistsError
from avatar.image_metrics import lpips_network
from avatar.models import FrameCondition, TalkingHead, TalkingHeadConfig
from avatar.models.gaussians import init_head
from avatar.progress import Progress, null_progress, report_status
from avatar.run import (
    RUN_FORMAT_VERSION,
    RunPaths,
    discard_checkpoints_after,
    find_subject,
    load_checkpoint,
    model_state,
    optimizer_state,
    read_config,
    resolve_device,
    save_checkpoint,
    subject_reference,
    write_config,
)
from avatar.subject import SubjectPaths, read_manifest
from avatar.subject_data import COMPOSITES, HEAD_LABELS, Frame, SubjectData
from avatar.train.losses import LossWeights, compute_loss, mouth_readout_loss
from avatar.train.ops import make_optimizer
from avatar.train.strategy import DensifyStrategy

log = logging.getLogger(__name__)


@dataclass
class LearningRates(Config):
    """Adam learning rates. Position rates are multiplied by the head's size (scene scale)."""

    means: float = 1.6e-3
    means_final: float = 1.6e-5
    quats: float = 2e-3
    log_scales: float = 8e-3
    opacity_logits: float = 5e-2
    sh: float = 5e-3
    tables: float = 5e-3
    """Hash-grid tables of the deformation fields."""
    networks: float = 1e-3
    """MLPs and the audio encoder."""
    fuse_factor: float = 0.1
    """Network learning rates are multiplied by this in the fuse stage."""


@dataclass
class TrainConfig(Config):
    """Everything a run needs; saved to RUN/config.json."""

    subject: str = ""
    """The subject directory, relative to the run directory (so both can move together)."""
    subject_absolute: str = ""
    """The subject directory's absolute path when the run was made (so the run alone can move)."""
    model_kind: str = "gaussian"
    """The avatar kind (``--model``); see :data:`avatar.models.MODEL_KINDS`."""
    preset: str = "fast"
    resolution: int = 256
    iterations: int = 3000
    static_iterations: int = 300
    smooth_audio_after: int = 1000
    fuse_after: float = 0.8
    device: str = "cpu"
    seed: int = 0
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    log_every: int = 25
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 2.0
    """Also checkpoint after this many minutes of training since the last checkpoint (0: off)."""
    preview_every: int = 500
    background: str = "plate"
    """What the rendered head is composited over in training: ``plate`` (the frame's torso over the
    background plate) or ``frame`` (the frame's own pixels around the original head, as ``avatar
    render`` composites by default); see :data:`avatar.subject_data.COMPOSITES`."""
    mouth_batch: int = 64
    """Train frames per step on which the audio code's mouth read-out is taught (``loss.audio_mouth``),
    in runs of :data:`MOUTH_RUN` consecutive frames: cheap (no rendering, and neighbours share the
    audio windows they encode), and far more than the one rendered frame, so the code sees every
    sentence of the subject many times over."""
    model: TalkingHeadConfig = field(default_factory=TalkingHeadConfig)
    lr: LearningRates = field(default_factory=LearningRates)
    loss: LossWeights = field(default_factory=LossWeights)
    strategy: DensifyStrategy = field(default_factory=DensifyStrategy)
    mouth_max_gaussians: int = 0
    """Cap of the mouth-interior set (0: the strategy's ``max_gaussians``). Without it the mouth
    branch keeps growing behind the lips and cheeks, where the face layer hides it: render time
    spent on pixels nobody sees."""
    format_version: int = RUN_FORMAT_VERSION


def make_config(preset: str = "fast", overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """The preset's options with ``overrides`` applied (``ValueError`` names a bad option)."""
    config = merge(TrainConfig(), preset_overrides(preset))
    config = dataclasses.replace(config, preset=preset)
    return merge(config, overrides or {})


def check_config(config: TrainConfig) -> None:
    """Refuse values that would train nothing or divide by zero (``--set log_every=0``), before
    anything is written.

    Raises:
        AvatarError: names the option and the range it takes.
    """
    for name in ("iterations", "log_every", "checkpoint_every", "preview_every", "mouth_batch"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AvatarError(f"{name} must be a whole number of at least 1, got {value!r}.")
    if isinstance(config.resolution, bool) or not isinstance(config.resolution, int) or config.resolution < 16:
        raise AvatarError(f"resolution must be a whole number of at least 16 pixels, got {config.resolution!r}.")
    if config.background not in COMPOSITES:
        raise AvatarError(f"background must be one of {', '.join(COMPOSITES)}, got {config.background!r}.")
    minutes = config.checkpoint_minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 <= minutes < math.inf:
        raise AvatarError(f"checkpoint_minutes must be a number of minutes >= 0 (0: off), got {minutes!r}.")


def save_config(paths: RunPaths, config: TrainConfig) -> None:
    write_config(paths.root, config.to_dict())


def load_config(run_dir: Path | str) -> TrainConfig:
    """The full training config of a run (see :func:`avatar.run.read_config` for the checks)."""
    data = read_config(run_dir)
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise AvatarError(f"{RunPaths(run_dir).config} does not match this version of avatar ({err}); train again.") from None


# ---------------------------------------------------------------------------------------------


def _initial_model(data: SubjectData, config: TrainConfig) -> TalkingHead:
    """Initial Gaussians from the face model and a few train frames (see models.gaussians)."""
    train_idx = data.split("train")
    picks = train_idx[np.linspace(0, len(train_idx) - 1, num=min(config.model.init.reference_frames, len(train_idx))).astype(int)]
    frames = np.stack([np.asarray(data.frames[i]) for i in picks])
    labels = np.stack([np.asarray(data.masks[i]) for i in picks])
    head = np.isin(labels, HEAD_LABELS)
    names = [str(n) for n in data.subject.tracks["blendshape_names"]]
    jaw = data.subject.tracks["blendshapes"][picks, names.index("jaw_open")] if "jaw_open" in names else None
    init = init_head(
        data.face_mean, data.viewmats[picks].cpu().numpy().astype(np.float64), data.K.cpu().numpy().astype(np.float64),
        frames, head, int(np.argmax(jaw)) if jaw is not None else None, config.model.init, seed=config.seed,
    )
    return TalkingHead.from_init(config.model, init)


def _model_from_checkpoint(config: TalkingHeadConfig, tensors: dict[str, Tensor], paths: RunPaths,
                           step: int) -> TalkingHead:
    try:
        return TalkingHead.from_state_dict(config, model_state(tensors))
    except (KeyError, RuntimeError) as err:
        raise AvatarError(f"checkpoint step {step} of {paths.root} does not fit its config.json ({err}); "
                          "train again with --force.") from None


def _scene_scale(meta: dict[str, Any]) -> float:
    value = meta.get("scene_scale")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AvatarError(f"checkpoint step {meta.get('step')} holds no valid scene_scale; train again with --force.")
    return float(value)


def _gaussian_optimizer(gaussians, lr: LearningRates, scene_scale: float) -> torch.optim.Adam:
    return make_optimizer(gaussians, {
        "means": lr.means * scene_scale, "quats": lr.quats, "log_scales": lr.log_scales,
        "opacity_logits": lr.opacity_logits, "sh": lr.sh,
    })


def _network_optimizer(model: TalkingHead, lr: LearningRates) -> torch.optim.Adam:
    tables, others = [], []
    for name, p in model.named_parameters():
        if name.startswith(("face.", "mouth.")):
            continue
        (tables if "encoding" in name else others).append(p)
    return torch.optim.Adam([
        {"params": tables, "lr": lr.tables, "name": "tables"},
        {"params": others, "lr": lr.networks, "name": "networks"},
    ], eps=1e-15)


def scene_scale_of(model: TalkingHead) -> float:
    means = model.face.means.detach()
    return float((means.max(0).values - means.min(0).values).norm())


def preview_image(pred: Tensor, gt: Tensor) -> np.ndarray:
    """GT | render | error (x4) side by side, uint8 RGB."""
    p = pred.detach().clamp(0, 1).cpu().numpy()
    g = gt.detach().cpu().numpy()
    err = np.clip(np.abs(p - g) * 4, 0, 1)
    return (np.concatenate([g, p, err], axis=1) * 255).round().astype(np.uint8)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    n_gaussians: int
    last_psnr: float
    """Running mean of the training PSNR; NaN when no step was taken (a resumed run already done)."""
    start_step: int = 0
    """The step training started from (non-zero when resumed)."""

    def summary(self) -> dict[str, Any]:
        """What the validation metrics of a run record about its training."""
        return {"train_seconds": round(self.seconds, 1), "steps": self.steps, "n_gaussians": self.n_gaussians}


class _Trainer:
    """Holds the state of one training run (model, optimizers, densification, RNG)."""

    def __init__(self, config: TrainConfig, paths: RunPaths, device: torch.device, progress: Optional[Progress]):
        self.config, self.paths, self.device = config, paths, device
        self.progress = progress or null_progress
        subject_dir = find_subject(paths.root, config.to_dict())
        self.data = SubjectData(subject_dir, config.resolution, config.model.motion_features, device, progress,
                                mouth_targets=config.model.mouth_targets)
        self.train_idx = self.data.split("train")
        if len(self.train_idx) < 2:
            raise AvatarError(f"{subject_dir} has fewer than 2 tracked training frames.")
        taught = torch.isfinite(self.data.mouth_targets[torch.from_numpy(self.train_idx)]).any(dim=1).cpu().numpy()
        self.mouth_idx = torch.from_numpy(self.train_idx[taught])
        """Train frames with a tracked mouth: where the read-out loss is taken."""

    def setup(self, resume: bool) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        tensors = meta = None
        resume = resume and self.paths.latest_checkpoint() is not None  # none yet: start the run at step 0
        if resume:
            tensors, meta = load_checkpoint(self.paths)  # the newest complete one (broken newer ones: warned)
            self.step = int(meta["step"])
            discard_checkpoints_after(self.paths, self.step)
            self.model = _model_from_checkpoint(cfg.model, tensors, self.paths, self.step).to(self.device)
        else:
            self.model = _initial_model(self.data, cfg).to(self.device)
            # The deformation fields' boxes were fitted to the initial points: keep them in config.json.
            self.config = cfg = dataclasses.replace(cfg, model=self.model.config)
            save_config(self.paths, cfg)
        self.scene_scale = _scene_scale(meta) if meta else scene_scale_of(self.model)
        self.lpips_net = None
        if cfg.loss.lpips > 0:
            self.lpips_net = lpips_network(cfg.loss.lpips_net, str(self.device))
            if self.lpips_net is None:
                log.warning("loss.lpips is %g but LPIPS could not be loaded (see the info log: the lpips "
                            "package needs torchvision and its weights); training without it.", cfg.loss.lpips)
        self.optimizers = {
            "face": _gaussian_optimizer(self.model.face, cfg.lr, self.scene_scale),
            "mouth": _gaussian_optimizer(self.model.mouth, cfg.lr, self.scene_scale),
            "networks": _network_optimizer(self.model, cfg.lr),
        }
        self.strategies = {
            "face": cfg.strategy,
            "mouth": dataclasses.replace(cfg.strategy, max_gaussians=cfg.mouth_max_gaussians)
            if cfg.mouth_max_gaussians > 0 else cfg.strategy,
        }
        self.strategy_state = {
            "face": cfg.strategy.initialize_state(len(self.model.face), self.device),
            "mouth": cfg.strategy.initialize_state(len(self.model.mouth), self.device),
        }
        if resume:
            try:
                self._restore(tensors, meta)
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise AvatarError(f"checkpoint step {self.step} of {self.paths.root} does not fit its run "
                                  f"({type(err).__name__}: {err}); train again with --force.") from None

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Optimizer moments, densification state and random generators of a checkpoint."""
        for name, opt in self.optimizers.items():
            opt.load_state_dict(optimizer_state(name, tensors, meta))
        for layer in ("face", "mouth"):
            for key in list(self.strategy_state[layer]):
                name = f"strategy/{layer}/{key}"
                if name in tensors:
                    self.strategy_state[layer][key] = tensors[name].to(self.device)
        torch.set_rng_state(tensors["rng/torch"])
        self.sampler.set_state(tensors["rng/sampler"])

    # -- schedule ---------------------------------------------------------------------------
    def _set_learning_rates(self) -> None:
        cfg, lr = self.config, self.config.lr
        t = min(self.step / max(cfg.iterations, 1), 1.0)
        means_lr = math.exp((1 - t) * math.log(lr.means) + t * math.log(lr.means_final)) * self.scene_scale
        for name in ("face", "mouth"):
            for group in self.optimizers[name].param_groups:
                if group["name"] == "means":
                    group["lr"] = means_lr
        fuse = self.step >= cfg.fuse_after * cfg.iterations
        for group in self.optimizers["networks"].param_groups:
            base = lr.tables if group["name"] == "tables" else lr.networks
            group["lr"] = base * (lr.fuse_factor if fuse else 1.0)

    def condition(self, index: int, frame: Frame) -> Optional[FrameCondition]:
        if self.step < self.config.static_iterations:
            return None
        smooth = self.step >= self.config.smooth_audio_after
        idx = torch.tensor([index], device=self.device)
        return self.model.conditions(self.data.audio_features, idx, frame.motion[None], smooth=smooth)[0]

    def mouth_loss(self) -> Optional[Tensor]:
        """The audio code's mouth read-out error on ``mouth_batch`` train frames (runs of consecutive
        frames from random starts, :func:`mouth_batch_picks`), or None
        when switched off (no read-out, a zero weight, no frame with a tracked mouth)."""
        cfg = self.config
        if self.model.mouth_readout is None or cfg.loss.audio_mouth <= 0 or len(self.mouth_idx) == 0:
            return None
        idx = self.mouth_idx[mouth_batch_picks(len(self.mouth_idx), cfg.mouth_batch, self.sampler)].to(self.device)
        codes = self.model.audio_codes(self.data.audio_features, idx, smooth=self.step >= cfg.smooth_audio_after)
        return mouth_readout_loss(self.model.predict_mouth(codes), self.data.mouth_targets[idx])

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self._set_learning_rates()
        pick = int(torch.randint(len(self.train_idx), (1,), generator=self.sampler))
        frame = self.data.frame(int(self.train_idx[pick]))
        cond = self.condition(frame.index, frame)
        out = self.model.render(cond, frame.viewmat, frame.K, cfg.resolution, cfg.resolution,
                                frame.over(cfg.background))
        scales = torch.cat([self.model.face.scales, self.model.mouth.scales])
        loss, parts = compute_loss(out, frame, cfg.loss, scales, self.scene_scale, self.lpips_net)
        mouth = self.mouth_loss()
        if mouth is not None:
            loss = loss + cfg.loss.audio_mouth * mouth
            parts["audio_mouth"] = float(mouth.detach())
            parts["loss"] = float(loss.detach())
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        for layer, gaussians in (("face", self.model.face), ("mouth", self.model.mouth)):
            if layer in out["meta"]:
                counts = self.strategies[layer].step_post_backward(
                    gaussians, self.optimizers[layer], self.strategy_state[layer], self.step,
                    out["meta"][layer], self.scene_scale,
                )
                for key, value in (counts or {}).items():
                    if value:
                        parts[f"{layer}_{key}"] = float(value)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self._last_out, self._last_frame = out, frame
        return parts

    def save(self) -> None:
        extra = {"rng/torch": torch.get_rng_state(), "rng/sampler": self.sampler.get_state()}
        for layer, state in self.strategy_state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    extra[f"strategy/{layer}/{key}"] = value
        save_checkpoint(self.paths, self.step, self.model, self.optimizers, extra,
                        {"scene_scale": self.scene_scale, "n_face": len(self.model.face),
                         "n_mouth": len(self.model.mouth)})


MOUTH_RUN = 8
"""Consecutive frames per run of the mouth read-out batch: 8 neighbours share 15 encoded audio
windows instead of 64 when smoothing over 8 frames, a quarter of the encoder's work."""


def mouth_batch_picks(n: int, batch: int, generator: torch.Generator) -> Tensor:
    """``batch`` positions in ``[0, n)``: runs of :data:`MOUTH_RUN` consecutive positions from
    random starts (fewer at the end of the range, where a run is cut short)."""
    run = min(MOUTH_RUN, n, batch)
    starts = torch.randint(n - run + 1, (-(-batch // run),), generator=generator)  # ceil(batch / run) runs
    return (starts[:, None] + torch.arange(run)).reshape(-1)[:batch]


def _fit_audio_encoder(config: TrainConfig, features: dict[str, Any]) -> TrainConfig:
    """The audio encoder's input shape is the subject's feature window: ``W`` frames of ``D``
    values (mel 16 x 80, whisper 4 x 384, ...), whatever the preset says."""
    window, dim = int(features.get("window") or 0), int(features.get("dim") or 0)
    if window < 1 or dim < 1:
        raise AvatarError("the subject's subject.json does not say the shape of its audio features; preprocess it again.")
    audio = dataclasses.replace(config.model.audio, window=window, dim=dim)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, audio=audio))


def train(
    subject_dir: Path | str,
    run_dir: Path | str,
    preset: str = "fast",
    overrides: Optional[dict[str, Any]] = None,
    device: str = "auto",
    resume: bool = False,
    progress: Optional[Progress] = None,
    force: bool = False,
) -> TrainResult:
    """Train a talking Gaussian head on a subject into a run directory.

    Validation metrics are not this function's business: the command line and the demo call
    :func:`avatar.eval.evaluate_run` on the finished run.

    Args:
        overrides: nested options over the preset, e.g. ``{"iterations": 500}``.
        resume: continue the run in ``run_dir`` from its newest complete checkpoint, exactly (from
            step 0 when it has none yet).
        force: replace the run in ``run_dir`` (only a run: a directory holding anything else is
            refused), once every option has been checked.

    Raises:
        AvatarError: bad subject, run directory in the way, unknown option or device.
    """
    from torch.utils.tensorboard import SummaryWriter

    paths = RunPaths(run_dir)
    dev = resolve_device(device)
    if resume and force:
        raise AvatarError("--resume continues a run and --force replaces it; pass only one of them.")
    check_writable_dir(paths.root)
    clean_stale(paths.root)
    clean_stale(paths.checkpoints, legacy_tmp=True)
    config = _resumed_config(paths, overrides) if resume else _new_config(subject_dir, paths, preset, overrides, force)
    config = dataclasses.replace(config, device=str(dev))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    trainer = _Trainer(config, paths, dev, progress)
    trainer.setup(resume)
    config = trainer.config
    report = progress or null_progress
    writer = SummaryWriter(str(paths.tensorboard))
    paths.previews.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    start_step = trainer.step
    last_save = time.monotonic()
    parts: dict[str, float] = {}
    psnr_avg = float("nan")
    try:
        report("train", trainer.step, config.iterations)
        while trainer.step < config.iterations:
            parts = trainer.train_step()
            psnr_avg = parts["psnr"] if math.isnan(psnr_avg) else 0.95 * psnr_avg + 0.05 * parts["psnr"]
            step = trainer.step
            if step % config.log_every == 0 or step == config.iterations:
                for key, value in parts.items():
                    writer.add_scalar(f"train/{key}", value, step)
                writer.add_scalar("train/n_gaussians", len(trainer.model.face) + len(trainer.model.mouth), step)
                log.info("step %d loss %.4f psnr %.2f gaussians %d", step, parts["loss"], psnr_avg,
                         len(trainer.model.face) + len(trainer.model.mouth))
            if step % config.preview_every == 0 or step == config.iterations:
                _write_preview(trainer, writer, step)
            if _checkpoint_due(config, step, time.monotonic() - last_save):
                trainer.save()
                last_save = time.monotonic()
            if step % 5 == 0:
                report_status(progress, "train", f"loss {parts['loss']:.4f} psnr {psnr_avg:.2f} "
                                                 f"n {len(trainer.model.face) + len(trainer.model.mouth)}")
            report("train", step, config.iterations)
    except KeyboardInterrupt:
        # Ctrl-C: keep what was learned, so that --resume continues from here.
        if trainer.paths.latest_checkpoint() != trainer.step:
            trainer.save()
        log.warning("Interrupted at step %d; continue with --resume.", trainer.step)
        raise
    finally:
        writer.flush()
        writer.close()
    seconds = time.perf_counter() - start
    return TrainResult(run_dir=paths.root, steps=trainer.step, seconds=seconds,
                       n_gaussians=len(trainer.model.face) + len(trainer.model.mouth), last_psnr=psnr_avg,
                       start_step=start_step)


def _checkpoint_due(config: TrainConfig, step: int, seconds_since_last: float) -> bool:
    """Every ``checkpoint_every`` steps, at the end, and after ``checkpoint_minutes`` of training."""
    if step % config.checkpoint_every == 0 or step == config.iterations:
        return True
    return config.checkpoint_minutes > 0 and seconds_since_last >= config.checkpoint_minutes * 60.0


def _resumed_config(paths: RunPaths, overrides: Optional[dict[str, Any]]) -> TrainConfig:
    """The run's own config.json; of the options only the iteration count may change."""
    config = load_config(paths.root)
    fixed = sorted(set(overrides or {}) - {"iterations"})
    if fixed:
        raise AvatarError(f"a resumed run keeps its config.json; only the iteration count can change, "
                          f"not {', '.join(fixed)}.")
    if overrides and "iterations" in overrides:
        try:
            config = merge(config, {"iterations": overrides["iterations"]})
        except ValueError as err:
            raise AvatarError(str(err)) from None
    check_config(config)
    return config


def _new_config(subject_dir: Path | str, paths: RunPaths, preset: str, overrides: Optional[dict[str, Any]],
                force: bool) -> TrainConfig:
    """The config of a new run; checks everything before ``force`` removes the old run."""
    if force:
        _check_replaceable(paths)
    else:
        _refuse_existing(paths)
    manifest = read_manifest(subject_dir)  # a clear error before anything is created
    refuse_overwrite(paths.root, *SubjectPaths(subject_dir).inputs())
    try:
        config = make_config(preset, overrides)
    except ValueError as err:
        raise AvatarError(str(err)) from None
    check_config(config)
    config = dataclasses.replace(config, **subject_reference(subject_dir, paths.root))
    if config.resolution > manifest.size:
        log.info("Training at the subject's %d px (the preset asks for %d).", manifest.size, config.resolution)
        config = dataclasses.replace(config, resolution=manifest.size)
    config = _fit_audio_encoder(config, manifest.audio_features)
    if force:
        _clear_run(paths)
    return config


def _refuse_existing(paths: RunPaths) -> None:
    if paths.config.exists():
        if paths.latest_checkpoint() is None:
            raise OutputExistsError(f"{paths.root} holds a run that has no checkpoint yet; pass --resume to start "
                                    "its training, or --force to replace it.")
        raise OutputExistsError(f"{paths.root} already holds a run; pass --resume to continue it, --force to "
                                "replace it, or choose another directory.")
    if paths.root.exists() and any(paths.root.iterdir()):
        raise OutputExistsError(f"{paths.root} exists and is not empty; choose a new directory for the run.")


def _check_replaceable(paths: RunPaths) -> None:
    """--force replaces runs only: never a directory of something else (a subject, a home)."""
    if paths.root.exists() and any(paths.root.iterdir()) and not paths.config.is_file():
        raise OutputExistsError(f"{paths.root} holds something that is not a run, which --force does not replace; "
                                "choose a new directory for the run.")


def _clear_run(paths: RunPaths) -> None:
    """Remove what training wrote into a run (other files the user put there stay)."""
    log.warning("Replacing the run in %s (--force).", paths.root)
    for path in (paths.config, paths.checkpoints, paths.tensorboard, paths.previews, paths.metrics):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _write_preview(trainer: _Trainer, writer, step: int) -> None:
    import cv2

    out, frame = trainer._last_out, trainer._last_frame
    image = preview_image(out["rgb"], frame.image)
    with atomic_output(trainer.paths.previews / f"step_{step:06d}.png", fsync=False) as tmp:
        cv2.imwrite(str(tmp), image[:, :, ::-1])
    writer.add_image("preview/gt_render_error", image, step, dataformats="HWC")
