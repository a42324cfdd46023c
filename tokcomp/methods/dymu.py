"""DyMU (DToMe + VTU), its DToMe-only ablation, and fixed-r ToMe as method dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from tokcomp.config import Calibration, check_calibration_dtype
from tokcomp.errors import TokcompError
from tokcomp.methods.base import Method
from tokcomp.methods.calibrations import calibration_name, stored_calibration
from tokcomp.methods.dtome import FixedRRule, MergeRule, ThresholdRule
from tokcomp.methods.settings import SettingsContext, field_settings, floats, register

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


@register
@dataclass
class DyMU(Method):
    """Dynamic merging in the encoder (per-layer thresholds) and virtual unmerging in the LLM."""

    name: ClassVar[str] = "dymu"
    thresholds: list[float] = field(default_factory=list)
    vtu: bool = True
    order: str = "spatial"
    budget: str | None = None
    calibration: str | None = None
    vision_hash: str | None = None
    calibration_dtype: str | None = None  # the dtype the calibration was measured in

    uses_calibration: ClassVar[bool] = True

    @classmethod
    def setting_names(cls) -> set[str]:
        return super().setting_names() | {"budget", "threshold", "calib"}

    @classmethod
    def from_settings(cls, settings: dict, context: SettingsContext) -> DyMU:
        resolved = dymu_settings(cls.name, settings, context.model_name, context.num_layers, context.calib,
                                 context.encoder_merging)  # fmt: skip
        return cls(**field_settings(cls, resolved))

    def encoder_rule(self, adapter: VLMAdapter) -> MergeRule | None:
        return ThresholdRule(self.thresholds)

    @property
    def token_order(self) -> str:
        return self.order

    @property
    def uses_vtu(self) -> bool:
        return self.vtu

    def check(self, adapter: VLMAdapter) -> None:
        if len(self.thresholds) != adapter.num_layers:
            raise TokcompError(
                f"{self.name} has {len(self.thresholds)} thresholds but {adapter.name}'s encoder has "
                f"{adapter.num_layers} layers (calibration made for another encoder?)"
            )
        if self.calibration_dtype is not None:
            check_calibration_dtype(self.calibration_dtype, adapter.dtype_name, self.calibration or "")
        if self.vision_hash and self.vision_hash != adapter.vision_weights_hash():
            source = self.calibration or "the calibration"
            raise TokcompError(f"{source} was made for other vision weights than {adapter.name}'s: recalibrate")

    @property
    def does_nothing(self) -> bool:
        return all(math.isinf(t) and t > 0 for t in self.thresholds)


@register
@dataclass
class DToMeOnly(DyMU):
    """The ablation: DToMe's merged tokens fed to the LLM with contiguous positions, no VTU."""

    name: ClassVar[str] = "dtome"
    vtu: bool = False


@register
@dataclass
class ToMe(Method):
    """ToMe: a fixed number of merges per encoder layer, the same for every image.

    ``r`` merges in each layer the LLM reads, or ``budget`` (low/mid/high/N tokens) for the schedule
    that lands every image on that token count (DyMU's fixed-r comparison). Merged tokens are fed
    with contiguous positions unless ``vtu`` is set.
    """

    name: ClassVar[str] = "tome"
    r: int | None = None
    budget: str | None = None
    vtu: bool = False

    def schedule(self, adapter: VLMAdapter) -> list[int]:
        from tokcomp.calibrate import merge_schedule, resolve_budget

        merging = adapter.feature_layer
        if self.budget is not None:
            if self.r is not None:
                raise TokcompError("tome: give r or budget, not both")
            target = resolve_budget(self.budget, adapter.num_patches).target_tokens
            rs, _ = merge_schedule(adapter.num_patches, target, merging, adapter.protected)
        else:
            r = 4 if self.r is None else self.r
            if r < 0:
                raise TokcompError("tome: r must be >= 0")
            rs = [r] * merging
        return rs + [0] * (adapter.num_layers - merging)

    def encoder_rule(self, adapter: VLMAdapter) -> MergeRule | None:
        return FixedRRule(self.schedule(adapter))

    def check(self, adapter: VLMAdapter) -> None:
        self.schedule(adapter)

    @property
    def uses_vtu(self) -> bool:
        return self.vtu


def dymu_settings(
    name: str, settings: dict, model_name: str, num_layers: int, calib: str | None, encoder_merging: bool = True
) -> dict:
    """Thresholds from ``threshold``/``thresholds``, a calibration file, or a budget's stored calibration
    (which a family without merging inside its vision encoder has none of)."""
    settings = dict(settings)
    calib = calib or settings.pop("calib", None)
    budget = settings.pop("budget", None)
    threshold = settings.pop("threshold", None)
    if "thresholds" in settings:
        settings["thresholds"] = floats(settings["thresholds"], "thresholds")
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
            if not encoder_merging:
                raise TokcompError(f"method '{name}' works inside the vision encoder, which tokcomp does not "
                                   f"support on {model_name}'s family yet")  # fmt: skip
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
