"""Shared behaviour of the model configs: JSON round trip and building the module.

Configs are plain dataclasses so that ``dataclasses.asdict`` turns them into JSON-ready dicts
(the trainer writes them to ``RUN/config.json``). JSON has no tuples and no nested dataclasses, so
:meth:`ModelConfig.from_dict` rebuilds both: nested configs from their dicts, tuples from lists.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

C = TypeVar("C", bound="ModelConfig")


class ModelConfig:
    """Mixin for the ``@dataclass`` configs of :mod:`avatar.models`.

    ``setup()`` builds the module the config describes (nerfstudio's pattern, without a
    ``_target`` field so that ``asdict`` stays JSON-serialisable).
    """

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)``: nested configs become dicts, tuples stay tuples."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Rebuild a config from :meth:`to_dict` output or its JSON round trip.

        Missing keys take their defaults (older run directories keep loading when a field is
        added); unknown keys raise, because a silently ignored option would change the model.

        Raises:
            ValueError: ``data`` is not a mapping, has unknown keys, or holds invalid values.
        """
        return _from_dict(cls, data)

    def setup(self) -> nn.Module:
        """Build the module this config describes (each concrete config defines it)."""
        raise TypeError(f"{type(self).__name__} does not define setup()")


def _from_dict(cls: type[C], data: Any) -> C:
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{cls.__name__}: expected a mapping of field values, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = _from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
