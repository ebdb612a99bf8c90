"""Training a talking head on a subject: the loop every model kind shares (:func:`train`), and the
Gaussian kind's trainer (the NGP kind's is :mod:`avatar.train.ngp_trainer`).

Stages of the Gaussian kind follow the anchors, as iteration counts of the preset:

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
from avatar.models import TalkingHead, TalkingHeadConfig
from avatar.progress import Progress, null_progress, report_status
from avatar.run import (
    POSE_CORRECTIONS,
    RunPaths,
    model_kind_of,
    model_state,
    optimizer_state,
    read_config,
    resolve_device,
    save_checkpoint,
    subject_reference,
)
from avatar.subject import SubjectPaths, read_manifest
from avatar.subject_data import BACKGROUNDS, SubjectData
from avatar.train.base import TrainerBase, initial_head
from avatar.train.config import BaseTrainConfig
from avatar.train.losses import LossWeights, compute_loss
from avatar.train.ngp_trainer import NGPTrainConfig, NGPTrainer
from avatar.train.ops import make_optimizer
from avatar.train.pose_align import PoseAlignConfig, align_poses
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
class TrainConfig(BaseTrainConfig):
    """Everything a Gaussian run needs; saved to RUN/config.json."""

    model: TalkingHeadConfig = field(default_factory=TalkingHeadConfig)
    lr: LearningRates = field(default_factory=LearningRates)
    loss: LossWeights = field(default_factory=LossWeights)
    strategy: DensifyStrategy = field(default_factory=DensifyStrategy)
    pose_align: PoseAlignConfig = field(default_factory=PoseAlignConfig)
    """The held-out frames' head poses, aligned to the finished avatar (:mod:`avatar.train.pose_align`)."""
    mouth_max_gaussians: int = 0
    """Cap of the mouth-interior set (0: the strategy's ``max_gaussians``). Without it the mouth
    branch keeps growing behind the lips and cheeks, where the face layer hides it: render time
    spent on pixels nobody sees."""


CONFIG_KINDS: dict[str, type[BaseTrainConfig]] = {"gaussian": TrainConfig, "ngp": NGPTrainConfig}
"""The training config class of each model kind (``--model``)."""


def make_config(preset: str = "fast", overrides: Optional[dict[str, Any]] = None, kind: str = "gaussian") -> Any:
    """The preset's options for a model kind with ``overrides`` applied (``ValueError`` names a bad
    option or kind)."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(CONFIG_KINDS)}")
    config = merge(CONFIG_KINDS[kind](), preset_overrides(preset, kind))
    config = dataclasses.replace(config, preset=preset)
    return merge(config, overrides or {})


def iterations_for(config: Any, n_train: int) -> int:
    """The steps a new run on ``n_train`` train frames takes: ``iterations``, or more for a long
    subject when the config scales them (:attr:`avatar.train.config.BaseTrainConfig.iterations_per_frame`)."""
    if config.iterations_per_frame <= 0:
        return config.iterations
    scaled = int(math.ceil(config.iterations_per_frame * n_train))
    if config.max_iterations > 0:
        scaled = min(scaled, config.max_iterations)
    return max(config.iterations, scaled)


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
    if config.background not in BACKGROUNDS:
        raise AvatarError(f"background must be one of {', '.join(BACKGROUNDS)}, got {config.background!r}.")
    minutes = config.checkpoint_minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 <= minutes < math.inf:
        raise AvatarError(f"checkpoint_minutes must be a number of minutes >= 0 (0: off), got {minutes!r}.")


def load_config(run_dir: Path | str) -> Any:
    """The full training config of a run, of its kind's class (see :func:`avatar.run.read_config`
    for the checks)."""
    data = read_config(run_dir)
    try:
        return CONFIG_KINDS[model_kind_of(data)].from_dict(data)
    except (TypeError, ValueError) as err:
        raise AvatarError(f"{RunPaths(run_dir).config} does not match this version of avatar ({err}); train again.") from None


# ---------------------------------------------------------------------------------------------


def _initial_model(data: SubjectData, config: TrainConfig) -> TalkingHead:
    """Initial Gaussians from the face model and a few train frames (see models.gaussians)."""
    return TalkingHead.from_init(config.model, initial_head(data, config.model.init, config.seed))


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
    n_gaussians: Optional[int]
    """Gaussians of a Gaussian run; None for a kind that has none."""
    last_psnr: float
    """Running mean of the training PSNR; NaN when no step was taken (a resumed run already done)."""
    start_step: int = 0
    """The step training started from (non-zero when resumed)."""

    def summary(self) -> dict[str, Any]:
        """What the validation metrics of a run record about its training."""
        out: dict[str, Any] = {"train_seconds": round(self.seconds, 1), "steps": self.steps}
        if self.n_gaussians is not None:
            out["n_gaussians"] = self.n_gaussians
        return out


class _Trainer(TrainerBase):
    """Holds the state of one Gaussian training run (model, optimizers, densification, RNG)."""

    def setup(self, resume: bool) -> None:
        cfg = self.config
        tensors, meta = self.start(resume)
        resume = tensors is not None
        if resume:
            self.model = _model_from_checkpoint(cfg.model, tensors, self.paths, self.step).to(self.device)
        else:
            self.model = _initial_model(self.data, cfg).to(self.device)
            # The deformation fields' boxes were fitted to the initial points: keep them in config.json.
            self.config = cfg = dataclasses.replace(cfg, model=self.model.config)
            self.save_config()
        self.scene_scale = _scene_scale(meta) if meta else scene_scale_of(self.model)
        self.pose_corrections: Optional[Tensor] = None
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
        self.pose_corrections = tensors.get(POSE_CORRECTIONS)
        self.restore_random_state(tensors)

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

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self._set_learning_rates()
        frame = self.data.frame(self.pick_frame())
        cond = self.condition(frame.index, frame.motion)
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

    def size(self) -> str:
        return f"{self.n_gaussians} Gaussians"

    def finish(self) -> bool:
        """Align the held-out frames' head poses to the trained avatar, once (True: a checkpoint
        with them is due)."""
        cfg = self.config
        if self.pose_corrections is not None or cfg.pose_align.steps <= 0:
            return False
        held_out = self.data.split("val")
        corrections = torch.zeros(self.data.n_frames, 6, device=self.device)
        if len(held_out):
            self.model.eval()
            corrections[torch.as_tensor(held_out, device=self.device)] = align_poses(
                self.model, self.data, held_out, cfg.pose_align, cfg.background, self.scene_scale, self.progress)
            self.model.train()
        self.pose_corrections = corrections
        return True

    @property
    def n_gaussians(self) -> Optional[int]:
        return len(self.model.face) + len(self.model.mouth)

    def preview(self) -> tuple[Tensor, Tensor]:
        """The last step's render and its ground truth."""
        return self._last_out["rgb"], self._last_frame.image

    def save(self) -> None:
        extra = self.random_state()
        for layer, state in self.strategy_state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    extra[f"strategy/{layer}/{key}"] = value
        if self.pose_corrections is not None:
            extra[POSE_CORRECTIONS] = self.pose_corrections
        save_checkpoint(self.paths, self.step, self.model, self.optimizers, extra,
                        {"scene_scale": self.scene_scale, "n_face": len(self.model.face),
                         "n_mouth": len(self.model.mouth)})


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
    model: str = "gaussian",
) -> TrainResult:
    """Train a talking head of kind ``model`` (``gaussian`` or ``ngp``) on a subject into a run directory.

    Validation metrics are not this function's business: the command line and the demo call
    :func:`avatar.eval.evaluate_run` on the finished run.

    Args:
        overrides: nested options over the preset, e.g. ``{"iterations": 500}``.
        resume: continue the run in ``run_dir`` from its newest complete checkpoint, exactly (from
            step 0 when it has none yet).
        force: replace the run in ``run_dir`` (only a run: a directory holding anything else is
            refused), once every option has been checked.
        model: the avatar kind of a new run (a resumed run keeps its own).

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
    config = _resumed_config(paths, overrides) if resume else _new_config(subject_dir, paths, preset, overrides, force, model)
    config = dataclasses.replace(config, device=str(dev))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    trainer = (NGPTrainer if config.model_kind == "ngp" else _Trainer)(config, paths, dev, progress)
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
                if trainer.n_gaussians is not None:
                    writer.add_scalar("train/n_gaussians", trainer.n_gaussians, step)
                log.info("step %d loss %.4f psnr %.2f %s", step, parts["loss"], psnr_avg, trainer.size())
            if step % config.preview_every == 0 or step == config.iterations:
                _write_preview(trainer, writer, step)
            if _checkpoint_due(config, step, time.monotonic() - last_save):
                trainer.save()
                last_save = time.monotonic()
            if step % 5 == 0:
                report_status(progress, "train", f"loss {parts['loss']:.4f} psnr {psnr_avg:.2f} {trainer.size()}")
            report("train", step, config.iterations)
        if trainer.finish():
            trainer.save()
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
                       n_gaussians=trainer.n_gaussians, last_psnr=psnr_avg,
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
                force: bool, kind: str = "gaussian") -> Any:
    """The config of a new run; checks everything before ``force`` removes the old run."""
    if force:
        _check_replaceable(paths)
    else:
        _refuse_existing(paths)
    manifest = read_manifest(subject_dir)  # a clear error before anything is created
    refuse_overwrite(paths.root, *SubjectPaths(subject_dir).inputs())
    try:
        config = make_config(preset, overrides, kind)
    except ValueError as err:
        raise AvatarError(str(err)) from None
    if "iterations" not in (overrides or {}):
        config = dataclasses.replace(config, iterations=iterations_for(config, _n_train(manifest)))
    check_config(config)
    config = dataclasses.replace(config, **subject_reference(subject_dir, paths.root))
    if config.resolution > manifest.size:
        log.info("Training at the subject's %d px (the preset asks for %d).", manifest.size, config.resolution)
        config = dataclasses.replace(config, resolution=manifest.size)
    config = _fit_audio_encoder(config, manifest.audio_features)
    if force:
        _clear_run(paths)
    return config


def _n_train(manifest) -> int:
    start, stop = manifest.split["train"]
    return max(0, int(stop) - int(start))


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

    image = preview_image(*trainer.preview())
    with atomic_output(trainer.paths.previews / f"step_{step:06d}.png", fsync=False) as tmp:
        cv2.imwrite(str(tmp), image[:, :, ::-1])
    writer.add_image("preview/gt_render_error", image, step, dataformats="HWC")
