"""How a method gets its settings: the registration table, and typed values from text (``--set``, YAML)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from tokcomp.errors import TokcompError

# name -> class, filled by ``@register`` as each method's module is imported (see registry.METHODS)
REGISTERED: dict[str, type] = {}


def check_ratio(name: str, value: float) -> None:
    """A keep share must be in (0, 1]: one clear error otherwise."""
    if not 0 < value <= 1:
        raise TokcompError(f"{name}: keep ratio must be in (0, 1], got {value}")


def register(cls: type) -> type:
    """Class decorator: make a method available by its ``name`` (CLI, presets, ``tokcomp.method``)."""
    name = cls.name
    if name in REGISTERED and REGISTERED[name] is not cls:
        raise ValueError(f"two methods are named '{name}'")
    REGISTERED[name] = cls
    return cls


@dataclass(frozen=True)
class SettingsContext:
    """What settings may depend on besides themselves: the model (DyMU's stored calibrations)."""

    model_name: str
    num_layers: int
    calib: str | None = None
    encoder_merging: bool = True  # whether the model's family takes merging inside its vision encoder


def coerce(value: Any, kind: Any, key: str) -> Any:
    """``value`` (text from ``--set``, or a YAML value) as the setting's type."""
    options = [k for k in typing.get_args(kind) if k is not type(None)]
    if options and typing.get_origin(kind) in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        kind = options[0]
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise TokcompError(f"setting {key}: expected true or false, got '{value}'")
        try:
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
        except ValueError:
            raise TokcompError(f"setting {key}: expected a number, got '{value}'") from None
    return value


def floats(value: Any, key: str) -> list[float]:
    """A list of numbers from ``a,b,c`` (``--set``) or a YAML list; ``inf`` allowed."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TokcompError(f"setting {key}: expected comma-separated numbers, got '{value}'")
    try:
        return [float(str(item).strip()) for item in items]
    except ValueError:
        raise TokcompError(f"setting {key}: expected comma-separated numbers (or inf), got '{value}'") from None


def resolve_aliases(cls: type, settings: dict) -> dict:
    """Settings with the paper's letters (``aliases``: letter -> field, e.g. FastV's ``K`` -> ``layer``)
    renamed to the fields they stand for; a setting given under both names is an error."""
    aliases = getattr(cls, "aliases", {})
    out = {}
    for key, value in settings.items():
        name = aliases.get(key, key)
        if name in out:
            raise TokcompError(f"setting {name} is given twice (as {name} and as {key})")
        out[name] = value
    return out


def field_settings(cls: type, settings: dict) -> dict:
    """``settings`` checked against the dataclass's fields and typed; an unknown one is a clear error."""
    settings = resolve_aliases(cls, settings)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise TokcompError(f"method '{cls.name}' has no setting {', '.join(unknown)} (settings: {allowed})")
    return {key: coerce(value, hints[key], key) for key, value in settings.items()}
