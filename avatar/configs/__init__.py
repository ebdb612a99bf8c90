"""Typed configs: the public base class, overrides by dotted name, and the training presets as data."""

from avatar.configs.base import Config, merge, parse_assignments
from avatar.configs.presets import PRESETS, preset_overrides

__all__ = ["PRESETS", "Config", "merge", "parse_assignments", "preset_overrides"]
