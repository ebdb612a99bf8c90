"""The GPU check's planning helpers (benchmarks/gpu.py), which otherwise run only on a lent GPU:
a renamed config option or a changed log would break the check where nobody can fix it."""

from __future__ import annotations

import pytest

from avatar.configs import merge
from avatar.train.trainer import make_config
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu():
    yield from load_benchmark("gpu")


def test_fitted_steps_rounds_down_and_clamps(gpu):
    assert gpu._fitted_steps(1377.9, 30000) == 1300
    assert gpu._fitted_steps(12.0, 30000) == 200
    assert gpu._fitted_steps(1e9, 30000) == 30000


def _nested(flat: dict[str, int]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *groups, key = name.split(".")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = value
    return out


@pytest.mark.parametrize("preset", ["fast", "default", "best"])
def test_scaled_schedule_shrinks_every_step_count_in_proportion(gpu, preset):
    base = make_config(preset)
    steps = base.iterations // 10
    scaled = gpu._scaled_schedule(preset, steps)
    config = merge(base, _nested(scaled))  # every name is a real option
    assert config.static_iterations == round(base.static_iterations / 10)
    assert config.smooth_audio_after == round(base.smooth_audio_after / 10)
    assert config.strategy.refine_start_iter == round(base.strategy.refine_start_iter / 10)
    assert config.strategy.refine_stop_iter == round(base.strategy.refine_stop_iter / 10)
    assert config.checkpoint_every == steps
    assert 0 < config.static_iterations < config.strategy.refine_stop_iter < steps


def test_steps_per_second_reads_the_training_log(gpu, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(0, 101, 10):  # 10 steps a second after a slow start
        writer.add_scalar("train/loss", 1.0, step, walltime=1000.0 + (step / 10.0 if step else -30.0))
    writer.close()
    assert gpu._steps_per_second(tmp_path, first_step=10) == pytest.approx(10.0)
    assert gpu._steps_per_second(tmp_path / "missing") is None
