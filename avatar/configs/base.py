"""The base of every typed config: JSON round trip, building what it describes, overrides by name.

Configs are plain dataclasses so that ``dataclasses.asdict`` turns them into JSON-ready dicts
(the trainer writes them to ``RUN/config.json``). JSON has no tuples and no nested dataclasses, so
:meth:`Config.from_dict` rebuilds both: nested configs from their dicts, tuples from lists.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any, Sequence, TypeVar

from torch import nn

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for the ``@dataclass`` configs of the toolkit (models, training, rendering).

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
            value = kind.from_dict(value) if issubclass(kind, Config) else _from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def merge(config: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """``config`` with nested ``overrides`` applied.

    Raises:
        ValueError: an unknown option, or a value of the wrong kind for its option (a string
            for a number, a fraction for a count), named by its dotted path.
    """
    changes = {}
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        path = prefix + key
        if key not in names:
            raise ValueError(f"{type(config).__name__} has no option {path!r}; options: {sorted(names)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"option {path!r} is a group of options; set its members ({path}.NAME)")
            changes[key] = merge(current, value, path + ".")
        else:
            changes[key] = _checked_value(path, current, value)
    return dataclasses.replace(config, **changes)


def _checked_value(path: str, current: Any, value: Any) -> Any:
    """``value`` for an option whose default is ``current``, if it is of the same kind."""
    if current is None:
        return value
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, str):
        ok = isinstance(value, str)
    elif isinstance(current, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(current)(value) if ok else value
    else:
        ok = True
    if not ok:
        raise ValueError(f"option {path!r} takes a {type(current).__name__} (like {current!r}), got {value!r}")
    return value


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """Nested overrides from ``NAME.NAME=VALUE`` strings (the command line's ``--set``).

    VALUE is read as JSON when it parses (``0.1``, ``true``, ``["a", "b"]``), else as a string,
    so ``device=cuda`` needs no quotes. Names are checked later, by :func:`merge`.
    """
    out: dict[str, Any] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        keys = name.strip().split(".")
        if not sep or not all(keys):
            raise ValueError(f"expected NAME=VALUE (e.g. loss.mouth=2.0), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{item!r} sets a member of {key!r}, which is also given a value")
        node[keys[-1]] = value
    return out
