"""Calibration files: dataclasses <-> YAML, with validation against the model they are used on."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tokcomp.errors import TokcompError
from tokcomp.io import atomic_write_text

CALIBRATION_DTYPES = ("float32", "bfloat16", "float16")


def check_calibration_dtype(calibrated: str, loaded: str, source: str = "") -> None:
    """Thresholds hold for the dtype they were measured in: refuse a model loaded in another."""
    if calibrated != loaded:
        where = f" {source}" if source else ""
        raise TokcompError(
            f"calibration{where} was made with the model in {calibrated}, this model is loaded in {loaded}: "
            f"pass --dtype {calibrated} or recalibrate with --dtype {loaded}"
        )


@dataclass
class Achieved:
    """Tokens per image at the layer the VLM reads, over the calibration images, final thresholds."""

    mean: float
    std: float
    min: int
    max: int


@dataclass
class Provenance:
    model: str
    vision_hash: str
    encoder: str
    data: str
    dtype: str
    tokcomp_version: str
    date: str
    seed: int
    batch_size: int


@dataclass
class Calibration:
    """Per-layer DToMe thresholds for one vision encoder and one token budget."""

    thresholds: list[float]
    budget: str
    target_tokens: int
    achieved: Achieved
    num_layers: int
    feature_layer: int
    num_patches: int
    num_images: int
    r_per_layer: list[int]
    schedule: str
    token_order: str
    provenance: Provenance
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["thresholds"] = [float(t) for t in self.thresholds]
        if not data["extra"]:
            data.pop("extra")
        return data

    def save(self, path: str | Path) -> Path:
        text = "# tokcomp calibration: DToMe thresholds per encoder layer (.inf = layer never merges)\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise TokcompError(f"calibration file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise TokcompError(f"calibration file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict):
            raise TokcompError(f"calibration file {path} is not a tokcomp calibration (not a mapping)")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - set(data) if n != "extra")
        if missing:
            raise TokcompError(f"calibration file {path} lacks {', '.join(missing)}")
        try:
            data["achieved"] = Achieved(**data["achieved"])
            data["provenance"] = Provenance(**data["provenance"])
            data["thresholds"] = [float(t) for t in data["thresholds"]]
            calib = cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise TokcompError(f"calibration file {path} is malformed: {exc}") from exc
        if len(calib.thresholds) != calib.num_layers or any(math.isnan(t) for t in calib.thresholds):
            raise TokcompError(f"calibration file {path}: need one threshold per layer ({calib.num_layers})")
        vision_hash = str(calib.provenance.vision_hash or "")
        if not re.fullmatch(r"[0-9a-f]{16}", vision_hash) or set(vision_hash) == {"0"}:
            raise TokcompError(
                f"calibration file {path} has no usable vision hash ({calib.provenance.vision_hash!r}), so it cannot "
                "be matched to a model: recalibrate"
            )
        if calib.provenance.dtype not in CALIBRATION_DTYPES:
            raise TokcompError(
                f"calibration file {path}: unknown dtype {calib.provenance.dtype!r} "
                f"(one of {', '.join(CALIBRATION_DTYPES)})"
            )
        return calib

    def check_compatible(self, num_layers: int, vision_hash: str, dtype: str, source: str = "") -> None:
        """Refuse a calibration made for another encoder (layer count, weight hash) or in another dtype."""
        where = f" ({source})" if source else ""
        if num_layers != self.num_layers:
            raise TokcompError(
                f"calibration{where} is for an encoder with {self.num_layers} layers, this model has {num_layers}"
            )
        check_calibration_dtype(self.provenance.dtype, dtype, source)
        if vision_hash != self.provenance.vision_hash:
            raise TokcompError(
                f"calibration{where} was made for other vision weights ({self.provenance.model}, hash "
                f"{self.provenance.vision_hash}); this model's hash is {vision_hash}: recalibrate"
            )
