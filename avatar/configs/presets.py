"""Training presets.

``fast`` is sized for a laptop or CI CPU (training resolution 256, a few thousand Gaussians,
minutes); ``default`` and ``best`` are for NVIDIA GPUs at 512. Each preset is a nested dict of
overrides applied to :class:`avatar.train.trainer.TrainConfig` defaults.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "resolution": 256,
        "iterations": 3000,
        "static_iterations": 300,
        "smooth_audio_after": 1000,
        "checkpoint_every": 1000,
        "preview_every": 500,
        "model": {
            "sh_degree": 0,
            "init": {"n_face": 2500, "n_head": 3000, "n_mouth": 400},
            "face": {"color": True},
        },
        "strategy": {"refine_start_iter": 300, "refine_stop_iter": 2200, "refine_every": 100,
                     "max_gaussians": 9000},
        "mouth_max_gaussians": 1000,
    },
    "default": {
        "resolution": 512,
        "iterations": 30000,
        "static_iterations": 2000,
        "smooth_audio_after": 8000,
        "checkpoint_every": 5000,
        "preview_every": 2000,
        "model": {
            "sh_degree": 1,
            "init": {"n_face": 10000, "n_head": 12000, "n_mouth": 2000},
            "face": {"color": True},
        },
        "strategy": {"refine_start_iter": 1000, "refine_stop_iter": 20000, "refine_every": 100,
                     "max_gaussians": 120000},
        "mouth_max_gaussians": 8000,
    },
    "best": {
        "resolution": 512,
        "iterations": 60000,
        "static_iterations": 3000,
        "smooth_audio_after": 12000,
        "checkpoint_every": 5000,
        "preview_every": 5000,
        "model": {
            "sh_degree": 2,
            "init": {"n_face": 15000, "n_head": 15000, "n_mouth": 3000},
            "face": {"color": True},
        },
        "strategy": {"refine_start_iter": 1000, "refine_stop_iter": 40000, "refine_every": 100,
                     "max_gaussians": 250000},
        "mouth_max_gaussians": 15000,
    },
}


NGP_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "resolution": 256,
        "iterations": 3000,
        "smooth_audio_after": 1000,
        "checkpoint_every": 1000,
        "preview_every": 500,
        "rays": 2048,
        "patch": 16,
        "grid_warmup": 128,
        "model": {"grid_resolution": 48},
    },
    "default": {
        "resolution": 512,
        "iterations": 30000,
        "smooth_audio_after": 8000,
        "checkpoint_every": 5000,
        "preview_every": 2000,
        "rays": 16384,
        "patch": 64,
        "model": {"grid_resolution": 128, "steps_per_box": 384, "view_dependent": True,
                  "face_encoding": {"n_levels": 12, "max_resolution": 1024, "log2_hashmap_size": 17}},
    },
    "best": {
        "resolution": 512,
        "iterations": 60000,
        "smooth_audio_after": 12000,
        "checkpoint_every": 5000,
        "preview_every": 5000,
        "rays": 32768,
        "patch": 64,
        "model": {"grid_resolution": 128, "steps_per_box": 512, "view_dependent": True, "hidden": 128,
                  "face_encoding": {"n_levels": 16, "max_resolution": 2048, "log2_hashmap_size": 19}},
    },
}
"""The NGP kind's presets (``--model ngp``), overrides of :class:`avatar.train.ngp_trainer.NGPTrainConfig`."""

PRESETS_OF_KIND = {"gaussian": PRESETS, "ngp": NGP_PRESETS}


def preset_overrides(name: str, kind: str = "gaussian") -> dict[str, Any]:
    """A copy of the preset's overrides for a model kind.

    Raises:
        ValueError: unknown preset or kind name (the message lists the valid ones).
    """
    if kind not in PRESETS_OF_KIND:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(PRESETS_OF_KIND)}")
    presets = PRESETS_OF_KIND[kind]
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return copy.deepcopy(presets[name])
