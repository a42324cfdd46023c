"""Method names, presets in configs/, settings from --set, stored calibrations in calib/ (see tokcomp.resources)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from tokcomp import resources
from tokcomp.errors import TokcompError
from tokcomp.methods import (  # noqa: F401  (each registers its methods)
    cdpruner,
    dart,
    dycoke,
    dymu,
    fastv,
    fastvid,
    holitom,
    prumerge,
    pruning,
    pyramiddrop,
    vidcom2,
    visionzip,
)
from tokcomp.methods.base import Composed, Method
from tokcomp.methods.calibrations import calibration_name, stored_calibration
from tokcomp.methods.names import METHOD_NAMES
from tokcomp.methods.settings import REGISTERED, SettingsContext, resolve_aliases


def _in_catalogue_order() -> dict[str, type[Method]]:
    """The registration table with the built-in methods first, in METHOD_NAMES order, whatever
    imported them first; methods registered later (a user's own ``@register``) follow."""
    builtin = {name: REGISTERED.pop(name) for name in METHOD_NAMES if name in REGISTERED}
    rest = dict(REGISTERED)
    REGISTERED.clear()
    REGISTERED.update(builtin)
    REGISTERED.update(rest)
    return REGISTERED


# Every method by name: the registration table itself (``@register`` in each method's file).
METHODS: dict[str, type[Method]] = _in_catalogue_order()
__all__ = ["METHODS", "build_method", "calibration_name", "method_catalog", "parse_sets", "preset_catalog",
           "stored_calibration"]  # fmt: skip


def parse_sets(items: list[str] | None) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TokcompError(f"--set expects key=value, got '{item}'")
        settings[key.strip()] = value.strip()
    return settings


def _is_method_name(name: str) -> bool:
    return all(part in METHODS for part in name.split("+"))


def _load_preset(spec: str) -> tuple[str, dict[str, Any]]:
    """A method name (``dymu``, ``dymu+dycoke``), or a preset: a YAML path or a name in configs/."""
    if _is_method_name(spec):
        return spec, {}
    candidates = [Path(spec)] if spec.endswith((".yaml", ".yml")) else resources.search_paths("configs", f"{spec}.yaml")
    for path in candidates:
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise TokcompError(f"method preset {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
            if not isinstance(data, dict) or "method" not in data:
                raise TokcompError(f"method preset {path} must be a mapping with a 'method' key")
            name = str(data.pop("method"))
            if not _is_method_name(name):
                raise TokcompError(f"method preset {path} names unknown method '{name}'")
            return name, data
    known = ", ".join(METHODS)
    raise TokcompError(f"unknown method '{spec}' (methods: {known}; or a preset in configs/)")


def build_method(
    spec: str,
    model_name: str,
    num_layers: int,
    calib: str | None = None,
    sets: dict | None = None,
    encoder_merging: bool = True,
) -> Method:
    """Resolve ``--method``, ``--calib`` and ``--set`` into a method instance (``encoder_merging``: whether
    the model's family takes merging inside its vision encoder, for the error a stored budget gives).

    A combination ``a+b`` takes per-part settings as ``a.key=value`` (or nested mappings in a
    preset); a plain ``key`` goes to the one part that has such a setting.
    """
    name, settings = _load_preset(spec)
    if "+" not in name:  # the paper's letters name the same fields, so --set K=... overrides a preset's ttm_ratio
        cls = METHODS[name]
        settings = {**resolve_aliases(cls, settings), **resolve_aliases(cls, sets or {})}
        return cls.from_settings(settings, SettingsContext(model_name, num_layers, calib, encoder_merging))
    settings.update(sets or {})
    names = name.split("+")
    if len(set(names)) != len(names):
        raise TokcompError(f"method '{name}' names a method twice")
    per_part: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in settings.items():
        if isinstance(value, dict) and key in per_part:
            per_part[key].update(resolve_aliases(METHODS[key], value))
            continue
        part, dot, field_name = key.partition(".")
        if dot:
            if part not in per_part:
                raise TokcompError(f"setting {key}: '{part}' is not part of {name}")
            per_part[part][METHODS[part].aliases.get(field_name, field_name)] = value
            continue
        owners = [n for n in names if key in METHODS[n].setting_names()]
        if len(owners) != 1:
            where = "none" if not owners else " and ".join(owners)
            raise TokcompError(f"setting {key} matches {where} of {name}: write it as <method>.{key}")
        per_part[owners[0]][METHODS[owners[0]].aliases.get(key, key)] = value
    uses_calib = [n for n in names if METHODS[n].uses_calibration]
    if calib and not uses_calib:
        raise TokcompError(f"--calib is for dymu/dtome; {name} does not use it")
    contexts = {
        n: SettingsContext(model_name, num_layers, calib if n in uses_calib else None, encoder_merging) for n in names
    }
    parts = [METHODS[n].from_settings(per_part[n], contexts[n]) for n in names]
    return Composed(parts=parts)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a method: its name, type, default and what it does (from the class's comments)."""

    name: str
    kind: str
    default: Any
    alias: str | None = None  # the paper's letter for it, accepted too (``K``)


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    settings: list[Setting]


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    name: str
    method: str
    settings: dict[str, Any]
    description: str
    path: Path


def _kind_name(kind: Any) -> str:
    text = kind.__name__ if isinstance(kind, type) else str(kind)
    return text.replace("typing.", "")


def method_catalog() -> list[MethodInfo]:
    """Every method of the registry with its settings and defaults (what `tokcomp methods` prints)."""
    out = []
    for name, cls in METHODS.items():
        hints = typing.get_type_hints(cls)
        settings = []
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or not f.repr:  # state kept between calls, not a setting
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            alias = next((letter for letter, field in cls.aliases.items() if field == f.name), None)
            settings.append(Setting(f.name, _kind_name(hints.get(f.name, f.type)), default, alias))
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")
        out.append(MethodInfo(name, "the plain model: nothing is compressed" if name == "none" else summary, settings))
    return out


def preset_catalog() -> list[PresetInfo]:
    """The presets in configs/ (the working directory's first, then the shipped ones), by name."""
    found: dict[str, PresetInfo] = {}
    for folder in resources.search_paths("configs"):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            if path.stem in found or path.stem == "regress-tolerances":
                continue
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                continue
            if not isinstance(data, dict) or "method" not in data:
                continue
            comment = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
            method = str(data.pop("method"))
            found[path.stem] = PresetInfo(path.stem, method, data, comment, path)
    return list(found.values())
