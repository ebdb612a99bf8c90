"""Training a talking head on a subject: the trainer, its losses, densification strategy and ops."""

from avatar.train.ngp_trainer import NGPTrainConfig
from avatar.train.trainer import TrainConfig, TrainResult, load_config, make_config, train

__all__ = ["NGPTrainConfig", "TrainConfig", "TrainResult", "load_config", "make_config", "train"]
