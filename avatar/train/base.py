"""What every model kind's trainer shares: the subject's frames, the conditions of a step, the audio
code's mouth read-out, the initial head points and the random generators of a checkpoint.

A kind's trainer subclasses :class:`TrainerBase` and adds its model, optimizers and step; the
loop in :func:`avatar.train.trainer.train` drives any of them the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from avatar.errors import AvatarError
from avatar.models import FrameCondition
from avatar.models.gaussians import GaussianInitConfig, HeadInit, init_head
from avatar.models.talking_head import BLINK_NAMES
from avatar.progress import Progress, null_progress
from avatar.run import RunPaths, discard_checkpoints_after, find_subject, load_checkpoint, write_config
from avatar.subject_data import HEAD_LABELS, SubjectData
from avatar.train.config import BaseTrainConfig
from avatar.train.losses import mouth_batch_picks, mouth_readout_loss


def initial_head(data: SubjectData, init: GaussianInitConfig, seed: int) -> HeadInit:
    """Initial head and mouth points (and colours) from the face model and a few train frames
    (see :func:`avatar.models.gaussians.init_head`): the Gaussian kind's first Gaussians, the NGP
    kind's boxes."""
    train_idx = data.split("train")
    picks = train_idx[np.linspace(0, len(train_idx) - 1, num=min(init.reference_frames, len(train_idx))).astype(int)]
    frames = np.stack([np.asarray(data.frames[i]) for i in picks])
    labels = np.stack([np.asarray(data.masks[i]) for i in picks])
    head = np.isin(labels, HEAD_LABELS)
    names = [str(n) for n in data.subject.tracks["blendshape_names"]]
    jaw = data.subject.tracks["blendshapes"][picks, names.index("jaw_open")] if "jaw_open" in names else None
    return init_head(
        data.face_mean, data.viewmats[picks].cpu().numpy().astype(np.float64), data.K.cpu().numpy().astype(np.float64),
        frames, head, int(np.argmax(jaw)) if jaw is not None else None, init, seed=seed,
    )


class TrainerBase:
    """The subject, the train frames and the per-step conditions of one training run.

    Subclasses set ``self.model`` (with ``conditions``, ``audio_codes``, ``predict_mouth`` and
    ``mouth_readout``), ``self.optimizers``, ``self.step`` and ``self.sampler`` in ``setup``, and
    implement ``train_step``, ``save``, ``preview`` and ``size``.
    """

    def __init__(self, config: BaseTrainConfig, paths: RunPaths, device: torch.device, progress: Optional[Progress]):
        self.config: Any = config  # the kind's own config class, with ``model``, ``lr`` and ``loss``
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
        self.blink_idx = blink_frames(self.data, self.train_idx)
        """Train frames with the eyes closed: :attr:`BaseTrainConfig.blink_share` of the steps."""
        self.step = 0
        self.sampler = torch.Generator().manual_seed(config.seed)

    def start(self, resume: bool) -> tuple[Optional[dict[str, Tensor]], Optional[dict[str, Any]]]:
        """Seed the random generators and, when resuming a run that has a checkpoint, load the
        newest complete one (dropping newer broken ones): its tensors and JSON, or (None, None) for
        a run that starts at step 0."""
        torch.manual_seed(self.config.seed)
        self.sampler = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        if not resume or self.paths.latest_checkpoint() is None:  # none yet: start the run at step 0
            return None, None
        tensors, meta = load_checkpoint(self.paths)  # the newest complete one (broken newer ones: warned)
        self.step = int(meta["step"])
        discard_checkpoints_after(self.paths, self.step)
        return tensors, meta

    def save_config(self) -> None:
        write_config(self.paths.root, self.config.to_dict())

    def condition(self, index: int, motion: Tensor) -> Optional[FrameCondition]:
        """Frame ``index``'s condition at this step: None in the static stage, single-frame audio
        codes until ``smooth_audio_after``, smoothed ones after."""
        if self.step < self.config.static_iterations:
            return None
        smooth = self.step >= self.config.smooth_audio_after
        idx = torch.tensor([index], device=self.device)
        return self.model.conditions(self.data.audio_features, idx, motion[None], smooth=smooth)[0]

    def mouth_loss(self) -> Optional[Tensor]:
        """The audio code's mouth read-out error on ``mouth_batch`` train frames (runs of consecutive
        frames from random starts, :func:`avatar.train.losses.mouth_batch_picks`), or None when
        switched off (no read-out, a zero weight, no frame with a tracked mouth)."""
        cfg = self.config
        if self.model.mouth_readout is None or cfg.loss.audio_mouth <= 0 or len(self.mouth_idx) == 0:
            return None
        idx = self.mouth_idx[mouth_batch_picks(len(self.mouth_idx), cfg.mouth_batch, self.sampler)].to(self.device)
        codes = self.model.audio_codes(self.data.audio_features, idx, smooth=self.step >= cfg.smooth_audio_after)
        return mouth_readout_loss(self.model.predict_mouth(codes), self.data.mouth_targets[idx])

    def finish(self) -> bool:
        """Work once the steps are done (True: a checkpoint of it is due). Nothing by default."""
        return False

    @property
    def n_gaussians(self) -> Optional[int]:
        """The model's Gaussians; None for a kind that has none."""
        return None

    def random_state(self) -> dict[str, Tensor]:
        """The random generators, for a checkpoint (reading them does not advance them)."""
        return {"rng/torch": torch.get_rng_state(), "rng/sampler": self.sampler.get_state()}

    def restore_random_state(self, tensors: dict[str, Tensor]) -> None:
        torch.set_rng_state(tensors["rng/torch"])
        self.sampler.set_state(tensors["rng/sampler"])

    @property
    def extra_blink_share(self) -> float:
        """The probability of drawing from the blink frames alone that makes them ``blink_share``
        of the draws in all (0 when they are that share of the train frames already, or none)."""
        natural = len(self.blink_idx) / max(len(self.train_idx), 1)
        if not len(self.blink_idx) or natural >= self.config.blink_share:
            return 0.0
        return (self.config.blink_share - natural) / (1.0 - natural)

    def pick_frame(self) -> int:
        """A random train frame's index: after the static stage, blink frames make at least
        ``blink_share`` of the draws (when the subject has any); otherwise uniform."""
        pool = self.train_idx
        if (self.extra_blink_share > 0 and self.step >= self.config.static_iterations
                and float(torch.rand((), generator=self.sampler)) < self.extra_blink_share):
            pool = self.blink_idx
        return int(pool[int(torch.randint(len(pool), (1,), generator=self.sampler))])


BLINK_CLOSED = 0.5
"""Mean of the two eye-blink tracks above which a frame counts as a blink frame."""


def blink_frames(data: SubjectData, frames: np.ndarray) -> np.ndarray:
    """The ``frames`` whose eyes are closed (both blink tracks' mean above :data:`BLINK_CLOSED`);
    empty when the model is not conditioned on blinks or the subject never blinks."""
    names = list(data.motion_features)
    columns = [names.index(n) for n in BLINK_NAMES if n in names]
    if len(columns) != len(BLINK_NAMES) or len(frames) == 0:
        return frames[:0]
    closed = data.motion[torch.from_numpy(frames).to(data.device)][:, columns].mean(dim=1) > BLINK_CLOSED
    return frames[closed.cpu().numpy()]
