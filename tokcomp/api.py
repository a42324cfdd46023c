"""The Python entry point: ``tokcomp.method(name, **settings)``, attached to a stock model.

    import tokcomp
    m = tokcomp.method("dymu-mid")            # a method or preset name, as on the CLI
    with m(model):                            # a stock model from from_pretrained
        out = model.generate(**inputs, max_new_tokens=32, do_sample=True)
    m.accounts[0].visual_kept                 # one account per request of that generate call
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from tokcomp.methods.base import Method


class MethodHandle:
    """A method named as on the CLI, resolved against the model it is attached to (a DyMU budget
    needs the model's stored calibration and layer count)."""

    def __init__(self, spec: str, calib: str | None = None, **settings: Any) -> None:
        self.spec = spec
        self.calib = calib
        self.settings = settings
        self.resolved: Method | None = None
        self._check_name()

    def _check_name(self) -> None:
        from tokcomp.methods.registry import _load_preset

        _load_preset(self.spec)  # an unknown name fails here, before any model is involved

    def resolve(self, target: Any) -> Method:
        """The method instance for this model (``target``: a stock model or a tokcomp adapter)."""
        from tokcomp.methods.registry import build_method, calibration_name
        from tokcomp.models.adapters import VLMAdapter
        from tokcomp.models.families import adapter_for_model

        adapter = target if isinstance(target, VLMAdapter) else adapter_for_model(target)
        config = adapter.model.config
        # tokcomp's own presets and tokcomp-tiny record their name; hub models go by their repo id
        model_name = getattr(config, "tokcomp_preset", None) or getattr(config, "_name_or_path", "") or adapter.name
        self.resolved = build_method(
            self.spec, calibration_name(model_name), adapter.num_layers, self.calib, dict(self.settings),
            adapter.supports_encoder_merging,
        )
        return self.resolved

    @contextmanager
    def __call__(self, target: nn.Module) -> Iterator[Method]:
        method = self.resolve(target)
        with method(target) as attached:
            yield attached

    @property
    def accounts(self) -> list:
        """One account per request of the last generate call (visual tokens full/kept/positions, ...)."""
        return [] if self.resolved is None else getattr(self.resolved, "accounts", [])

    def __repr__(self) -> str:
        return f"tokcomp.method({self.spec!r}{''.join(f', {k}={v!r}' for k, v in self.settings.items())})"


def method(spec: str, calib: str | None = None, **settings: Any) -> MethodHandle:
    """A compression method by name (``"dymu-mid"``, ``"fastv"``, ``"random"``, ``"dymu+dycoke"``, or a
    preset YAML path) with settings as on ``--set``; attach it with ``with m(model):``."""
    return MethodHandle(spec, calib, **settings)
