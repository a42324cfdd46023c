"""The method base class: a dataclass whose call is a context manager attaching it to a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokcomp.errors import TokcompError
from tokcomp.methods.dtome import MergeRule
from tokcomp.methods.settings import SettingsContext, field_settings, register
from tokcomp.methods.trace import TraceSpec

if TYPE_CHECKING:
    import torch

    from tokcomp.methods.attention import AttentionHook
    from tokcomp.models.adapters import VLMAdapter
    from tokcomp.models.visual import UnitTokens


@register
@dataclass
class Method:
    """No compression: the plain model. Subclasses override the hooks they need.

    ``with method(adapter):`` attaches the method's encoder-side hooks to the stock model and makes
    it the adapter's active method; ``tokcomp.pipeline.generate`` then applies its other stages.

    The dataclass holds settings only. What a method learns about one request lives in objects of
    that ``generate`` call: the ``record`` of the request's selection (kept on its account) and the
    attention hooks of the batch, both handed back to ``report`` for that request.
    """

    name: ClassVar[str] = "none"
    # The kinds of visual input the method acts on ("image", "video").
    inputs: ClassVar[frozenset[str]] = frozenset({"image", "video"})

    @property
    def label(self) -> str:
        """How the method is named in messages (a combination: its parts joined with +)."""
        return self.name

    # Whether --calib (a stored DToMe calibration) is for this method.
    uses_calibration: ClassVar[bool] = False
    # Other names a setting may be given by: the paper's letters (FastV's K for ``layer``, ...).
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def setting_names(cls) -> set[str]:
        """The names ``--set`` and presets may give (the dataclass's fields, unless a method adds more)."""
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} | set(cls.aliases)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], context: SettingsContext) -> Method:
        """The method from text or YAML settings (``--set key=value``, a preset), typed by its fields."""
        if context.calib and not cls.uses_calibration:
            raise TokcompError(f"--calib is for dymu/dtome; method '{cls.name}' does not use it")
        return cls(**field_settings(cls, settings))

    @property
    def supports_beam_search(self) -> bool:
        """False where decode hooks keep per-sequence state that beam reordering would scramble."""
        return True

    def encoder_rule(self, adapter: VLMAdapter) -> MergeRule | None:
        """Token merging inside the vision encoder, if any."""
        return None

    def encoder_trace(self, adapter: VLMAdapter) -> TraceSpec | None:
        """The encoder attention the selection reads, if any (``tokcomp.methods.trace``): while the method
        is attached it is traced, and every unit the selection gets carries it per position (``UnitTokens.trace``)."""
        return None

    @property
    def token_order(self) -> str:
        return "spatial"

    @property
    def uses_vtu(self) -> bool:
        """Whether merged tokens are virtually unmerged in the LLM (else fed with contiguous positions)."""
        return False

    def check(self, adapter: VLMAdapter) -> None:
        """Raise TokcompError if the method cannot be used with this model."""

    @property
    def keeps_positions(self) -> bool:
        """Whether tokens left after a pre-LLM selection keep their stock position ids (else contiguous)."""
        return False

    @property
    def cuts_scale_with_depth(self) -> bool:
        """Whether the LLM layers it cuts at are fractions of the depth (PyramidDrop's default stages), so
        a run with fewer decoder layers stands for the real model with the cuts scaled (``bench``)."""
        return False

    def select(self, adapter: VLMAdapter, kind: str, tokens: UnitTokens) -> UnitTokens:
        """Pre-LLM selection on one image/video's tokens (``kind``); the default keeps everything."""
        return tokens

    def select_request(
        self,
        adapter: VLMAdapter,
        kinds: list[str],
        tokens: list[UnitTokens],
        text: torch.Tensor,
        record: dict[str, Any] | None = None,
    ) -> list[UnitTokens]:
        """Pre-LLM selection over all units of one request; ``text`` holds the prompt's embeddings.

        ``record`` is this request's own dict for this call (``account.selection`` later): a method
        keeps what it decided there, under its name, for ``report``.
        """
        return [self.select(adapter, kind, unit) for kind, unit in zip(kinds, tokens, strict=True)]

    def attention_hooks(self, visual: torch.Tensor, cache) -> list[AttentionHook]:
        """Decode-time attention hooks for a batch; ``visual`` marks the visual columns of the cache."""
        return []

    def finish(self, hooks: list[AttentionHook]) -> None:
        """Called after a batch with the hooks this method created."""

    def report(self, hooks: list[AttentionHook], sample: int, account) -> dict[str, Any]:
        """Method-specific numbers for request ``sample`` of the batch ``hooks`` ran on (added to its
        ``account``, whose ``selection`` holds the request's record); only that request's numbers."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}

    @contextmanager
    def __call__(self, target: VLMAdapter | torch.nn.Module) -> Iterator[Method]:
        """Attach to a tokcomp adapter or to a stock model (``from_pretrained``): inside the block the
        model's own ``generate`` and forward run this method; on exit the model is as it was."""
        from tokcomp.models.adapters import VLMAdapter
        from tokcomp.models.families import adapter_for_model
        from tokcomp.stock import attach_stock_generate

        adapter = target if isinstance(target, VLMAdapter) else adapter_for_model(target)
        self.check(adapter)
        if adapter.active_method is not None:
            raise RuntimeError(f"{adapter.name} already has method '{adapter.active_method.name}' attached")
        model = adapter.model
        with ExitStack() as stack:
            rule = self.encoder_rule(adapter)
            family_lacks = (rule is not None and not adapter.supports_encoder_merging) or (
                self.encoder_trace(adapter) is not None and not adapter.supports_encoder_traces
            )
            if family_lacks:
                raise TokcompError(f"method '{self.label}' works inside the vision encoder, which tokcomp does not "
                                   f"support on the {adapter.family} family yet")  # fmt: skip
            if self.uses_vtu and adapter.deepstack_levels:
                raise TokcompError(f"method '{self.label}' unmerges tokens in the LLM (VTU), which tokcomp does "
                                   f"not support on DeepStack models ({adapter.family}) yet; dtome merges "
                                   "without it")  # fmt: skip
            if rule is not None:
                adapter.merging = stack.enter_context(adapter.attach_merging(rule, self.token_order))
            spec = self.encoder_trace(adapter)
            if spec is not None:
                adapter.trace = stack.enter_context(adapter.attach_trace(spec))
            stack.enter_context(attach_stock_generate(adapter, self))
            adapter.active_method = self
            model._tokcomp_adapter = adapter
            try:
                yield self
            finally:
                adapter.active_method = None
                adapter.merging = None
                adapter.trace = None
                del model._tokcomp_adapter


@dataclass
class Composed(Method):
    """Several methods applied together, each at its own stage (``dymu+dycoke``).

    At most one may merge inside the encoder; pre-LLM selections run in the order given; VTU is on
    if any part asks for it; decode-time hooks of all parts are chained.
    """

    name: ClassVar[str] = "composed"
    parts: list[Method] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def inputs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(p.inputs for p in self.parts))

    def encoder_rule(self, adapter: VLMAdapter) -> MergeRule | None:
        rules = [r for r in (p.encoder_rule(adapter) for p in self.parts) if r is not None]
        if len(rules) > 1:
            from tokcomp.errors import TokcompError

            raise TokcompError(f"{self.label}: only one method may merge inside the vision encoder")
        return rules[0] if rules else None

    def encoder_trace(self, adapter: VLMAdapter) -> TraceSpec | None:
        specs = {s for s in (p.encoder_trace(adapter) for p in self.parts) if s is not None}
        if len({s.layer for s in specs}) > 1:
            from tokcomp.errors import TokcompError

            raise TokcompError(f"{self.label}: the parts read the encoder attention of different layers")
        if not specs:
            return None
        return TraceSpec(next(iter(specs)).layer, keys=any(s.keys for s in specs))

    @property
    def token_order(self) -> str:
        orders = {p.token_order for p in self.parts if p.encoder_rule.__func__ is not Method.encoder_rule}
        return orders.pop() if len(orders) == 1 else "spatial"

    @property
    def uses_vtu(self) -> bool:
        return any(p.uses_vtu for p in self.parts)

    @property
    def supports_beam_search(self) -> bool:
        return all(p.supports_beam_search for p in self.parts)

    def check(self, adapter: VLMAdapter) -> None:
        for part in self.parts:
            part.check(adapter)
        self.encoder_rule(adapter)
        self.encoder_trace(adapter)

    @property
    def keeps_positions(self) -> bool:
        return any(p.keeps_positions for p in self.parts)

    def select_request(
        self,
        adapter: VLMAdapter,
        kinds: list[str],
        tokens: list[UnitTokens],
        text: torch.Tensor,
        record: dict[str, Any] | None = None,
    ) -> list[UnitTokens]:
        for part in self.parts:
            tokens = part.select_request(adapter, kinds, tokens, text, record)
        return tokens

    def attention_hooks(self, visual: torch.Tensor, cache) -> list[AttentionHook]:
        return [hook for part in self.parts for hook in part.attention_hooks(visual, cache)]

    def finish(self, hooks: list[AttentionHook]) -> None:
        for part in self.parts:
            part.finish(hooks)

    def report(self, hooks: list[AttentionHook], sample: int, account) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts:
            out.update(part.report(hooks, sample, account))
        return out

    def settings(self) -> dict[str, Any]:
        return {"method": self.label, **{p.name: p.settings() for p in self.parts}}
