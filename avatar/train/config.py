"""The options every training run holds, whatever its model kind."""

from __future__ import annotations

from dataclasses import dataclass

from avatar.configs import Config
from avatar.run import RUN_FORMAT_VERSION


@dataclass
class BaseTrainConfig(Config):
    """What every model kind's training config holds; saved to RUN/config.json with the kind's own options."""

    subject: str = ""
    """The subject directory, relative to the run directory (so both can move together)."""
    subject_absolute: str = ""
    """The subject directory's absolute path when the run was made (so the run alone can move)."""
    model_kind: str = "gaussian"
    """The avatar kind (``--model``); see :data:`avatar.models.MODEL_KINDS`."""
    preset: str = "fast"
    resolution: int = 256
    iterations: int = 3000
    iterations_per_frame: float = 0.0
    """When above 0, a new run given no iteration count trains ``iterations_per_frame`` steps per
    train frame of its subject when that is more than ``iterations``, up to ``max_iterations``:
    a minute of video has several times the frames of the 8-20 s clips the step counts were
    sized on, and each frame was otherwise seen two or three times. The count chosen is the one
    written to config.json."""
    max_iterations: int = 0
    """The most steps ``iterations_per_frame`` may ask for (0: no limit)."""
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
    render --background frame`` composites); see :data:`avatar.subject_data.BACKGROUNDS`."""
    mouth_batch: int = 64
    """Train frames per step on which the audio code's mouth read-out is taught (``loss.audio_mouth``),
    in runs of :data:`avatar.train.losses.MOUTH_RUN` consecutive frames: cheap (no rendering, and neighbours share the
    audio windows they encode), and far more than the one rendered frame, so the code sees every
    sentence of the subject many times over."""
    blink_share: float = 0.1
    """The least share of the conditioned steps (after ``static_iterations``) taken on a train
    frame with the eyes closed, when the subject has any (one that blinks more is drawn uniformly).
    Blinks are 1-3 % of a talking-head video's frames; drawn uniformly, the eyelids got so few
    steps that no avatar learned to close its eyes, even on the blink frames it trained on (and
    ``avatar render --blink`` had little to show)."""
    format_version: int = RUN_FORMAT_VERSION
