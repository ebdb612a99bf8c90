"""Which train frames a step draws: blink frames get their share once the conditions are on."""

from types import SimpleNamespace

import numpy as np
import torch

from avatar.models.talking_head import BLINK_NAMES, MOTION_FEATURES
from avatar.train.base import TrainerBase, blink_frames
from avatar.train.config import BaseTrainConfig


def _data(blinks: np.ndarray, names=MOTION_FEATURES) -> SimpleNamespace:
    motion = torch.zeros(len(blinks), len(names))
    for name in BLINK_NAMES:
        if name in names:
            motion[:, list(names).index(name)] = torch.from_numpy(blinks).float()
    return SimpleNamespace(motion_features=tuple(names), motion=motion, device=torch.device("cpu"))


def test_blink_frames_are_the_closed_eyes_among_the_given_frames():
    blinks = np.array([0.0, 0.9, 0.2, 1.0, 0.6, 0.0])
    np.testing.assert_array_equal(blink_frames(_data(blinks), np.array([0, 1, 2, 3, 5])), [1, 3])
    without = tuple(n for n in MOTION_FEATURES if n not in BLINK_NAMES)
    assert len(blink_frames(_data(blinks, without), np.arange(6))) == 0


def _trainer(blinks: np.ndarray, share: float, step: int) -> TrainerBase:
    trainer = object.__new__(TrainerBase)
    trainer.config = BaseTrainConfig(blink_share=share, static_iterations=10)
    trainer.data = _data(blinks)
    trainer.train_idx = np.arange(len(blinks))
    trainer.blink_idx = blink_frames(trainer.data, trainer.train_idx)
    trainer.sampler = torch.Generator().manual_seed(0)
    trainer.step = step
    return trainer


def test_blink_frames_get_their_share_of_the_conditioned_steps_only():
    blinks = np.zeros(200)
    blinks[[7, 8]] = 1.0
    conditioned = _trainer(blinks, 0.25, step=10)
    picks = np.array([conditioned.pick_frame() for _ in range(4000)])
    share = np.isin(picks, [7, 8]).mean()
    assert 0.22 < share < 0.28  # blink frames make a quarter of the draws
    static = _trainer(blinks, 0.25, step=9)  # no conditions yet: a blink would be baked into the head
    assert np.isin([static.pick_frame() for _ in range(4000)], [7, 8]).mean() < 0.03
    never = _trainer(np.zeros(200), 0.25, step=10)
    assert len({never.pick_frame() for _ in range(2000)}) > 150


def test_a_subject_that_blinks_often_enough_is_drawn_uniformly():
    blinks = np.zeros(100)
    blinks[:30] = 1.0  # 30 % of the frames: more than the share asked for
    trainer = _trainer(blinks, 0.25, step=10)
    assert trainer.extra_blink_share == 0.0
    assert 0.26 < np.mean(np.array([trainer.pick_frame() for _ in range(4000)]) < 30) < 0.34
    few = _trainer(np.r_[np.ones(10), np.zeros(90)], 0.25, step=10)  # 10 %: topped up to 25 %
    assert abs(few.extra_blink_share - (0.25 - 0.1) / 0.9) < 1e-9
