"""Presets as data: named sets of overrides of the training configuration."""

from avatar.configs.presets import PRESETS, preset_overrides

__all__ = ["PRESETS", "preset_overrides"]
