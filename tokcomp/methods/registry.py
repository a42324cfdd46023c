"""Method names, presets in configs/, settings from --set, stored calibrations in calib/ (see tokcomp.resources)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tokcomp import resources
from tokcomp.config import Calibration
from tokcomp.errors import TokcompError
from tokcomp.methods.base import Composed, Method
from tokcomp.methods.dycoke import DyCoke
from tokcomp.methods.dymu import DToMeOnly, DyMU, ToMe
from tokcomp.methods.pruning import Adaptive, DivPrune, FastV, RandomPruning
from tokcomp.methods.visionzip import VisionZip

METHODS: dict[str, type[Method]] = {
    "none": Method,
    "dymu": DyMU,
    "dtome": DToMeOnly,
    "tome": ToMe,
    "dycoke": DyCoke,
    "adaptive": Adaptive,
    "fastv": FastV,
    "random": RandomPruning,
    "divprune": DivPrune,
    "visionzip": VisionZip,
}


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


def calibration_name(model: str) -> str:
    """The folder of calib/ that holds a model's stored calibrations: a committed checkpoint by its name
    whether given by name or path, another checkpoint folder by its folder name, a hub id as it is."""
    path = Path(model)
    if not path.exists():
        return model
    from tokcomp.models.loading import COMMITTED

    resolved = path.resolve()
    for name, folder in COMMITTED.items():
        if resolved == folder.resolve():
            return name
    return resolved.name


def stored_calibration(model: str, budget: str) -> Path | None:
    for path in resources.search_paths("calib", calibration_name(model), f"{budget}.yaml"):
        if path.is_file():
            return path
    return None


def _coerce(value: Any, kind: Any, key: str) -> Any:
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


def _floats(value: Any, key: str) -> list[float]:
    """A list of numbers from ``a,b,c`` (``--set``) or a YAML list; ``inf`` allowed."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TokcompError(f"setting {key}: expected comma-separated numbers, got '{value}'")
    try:
        return [float(str(item).strip()) for item in items]
    except ValueError:
        raise TokcompError(f"setting {key}: expected comma-separated numbers (or inf), got '{value}'") from None


def build_method(
    spec: str, model_name: str, num_layers: int, calib: str | None = None, sets: dict | None = None
) -> Method:
    """Resolve ``--method``, ``--calib`` and ``--set`` into a method instance.

    A combination ``a+b`` takes per-part settings as ``a.key=value`` (or nested mappings in a
    preset); a plain ``key`` goes to the one part that has such a setting.
    """
    name, settings = _load_preset(spec)
    settings.update(sets or {})
    if "+" not in name:
        return _build_single(name, settings, model_name, num_layers, calib)
    names = name.split("+")
    if len(set(names)) != len(names):
        raise TokcompError(f"method '{name}' names a method twice")
    per_part: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in settings.items():
        if isinstance(value, dict) and key in per_part:
            per_part[key].update(value)
            continue
        part, dot, field_name = key.partition(".")
        if dot:
            if part not in per_part:
                raise TokcompError(f"setting {key}: '{part}' is not part of {name}")
            per_part[part][field_name] = value
            continue
        owners = [n for n in names if key in _setting_names(n)]
        if len(owners) != 1:
            where = "none" if not owners else " and ".join(owners)
            raise TokcompError(f"setting {key} matches {where} of {name}: write it as <method>.{key}")
        per_part[owners[0]][key] = value
    uses_calib = [n for n in names if issubclass(METHODS[n], DyMU)]
    if calib and not uses_calib:
        raise TokcompError(f"--calib is for dymu/dtome; {name} does not use it")
    parts = [_build_single(n, per_part[n], model_name, num_layers, calib if n in uses_calib else None) for n in names]
    return Composed(parts=parts)


def _setting_names(name: str) -> set[str]:
    cls = METHODS[name]
    names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    if issubclass(cls, DyMU):
        names |= {"budget", "threshold", "calib"}
    return names


def _build_single(name: str, settings: dict, model_name: str, num_layers: int, calib: str | None) -> Method:
    cls = METHODS[name]
    if issubclass(cls, DyMU):
        settings = _dymu_settings(name, settings, model_name, num_layers, calib)
    elif calib:
        raise TokcompError(f"--calib is for dymu/dtome; method '{name}' does not use it")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise TokcompError(f"method '{name}' has no setting {', '.join(unknown)} (settings: {allowed})")
    kwargs = {key: _coerce(value, hints[key], key) for key, value in settings.items()}
    return cls(**kwargs)


def _dymu_settings(name: str, settings: dict, model_name: str, num_layers: int, calib: str | None) -> dict:
    settings = dict(settings)
    calib = calib or settings.pop("calib", None)
    budget = settings.pop("budget", None)
    threshold = settings.pop("threshold", None)
    if "thresholds" in settings:
        settings["thresholds"] = _floats(settings["thresholds"], "thresholds")
    if threshold is not None:
        try:
            settings["thresholds"] = [float(threshold)] * num_layers
        except ValueError:
            raise TokcompError(f"setting threshold: expected a number or inf, got '{threshold}'") from None
    elif "thresholds" not in settings:
        if calib is None:
            if budget is None:
                raise TokcompError(
                    f"{name} needs thresholds: pass --calib PATH, --set budget=low|mid|high, or --set threshold=X"
                )
            found = stored_calibration(model_name, str(budget))
            if found is None:
                raise TokcompError(
                    f"no stored calibration for {model_name} at budget {budget}; make one with: tokcomp calibrate "
                    f"--model {model_name} --budget {budget} --data builtin:skimage "
                    f"--out calib/{calibration_name(model_name)}/{budget}.yaml"
                )
            calib = str(found)
        calibration = Calibration.load(calib)
        settings["thresholds"] = list(calibration.thresholds)
        settings.setdefault("order", calibration.token_order)
        settings["budget"] = calibration.budget
        settings["calibration"] = str(calib)
        settings["vision_hash"] = calibration.provenance.vision_hash
        settings["calibration_dtype"] = calibration.provenance.dtype
    if any(math.isnan(t) for t in settings["thresholds"]):
        raise TokcompError("thresholds must be numbers")
    return settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a method: its name, type, default and what it does (from the class's comments)."""

    name: str
    kind: str
    default: Any


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
            settings.append(Setting(f.name, _kind_name(hints.get(f.name, f.type)), default))
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
