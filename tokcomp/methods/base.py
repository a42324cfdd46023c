"""The method base class: a dataclass whose call is a context manager attaching it to a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokcomp.methods.dtome import MergeRule, attach_merging

if TYPE_CHECKING:
    import torch

    from tokcomp.methods.attention import AttentionHook
    from tokcomp.models.adapters import VLMAdapter
    from tokcomp.models.visual import UnitTokens


@dataclass
class Method:
    """No compression: the plain model. Subclasses override the hooks they need.

    ``with method(adapter):`` attaches the method's encoder-side hooks to the stock model and makes
    it the adapter's active method; ``tokcomp.pipeline.generate`` then applies its other stages.
    """

    name: ClassVar[str] = "none"
    # The kinds of visual input the method acts on ("image", "video").
    inputs: ClassVar[frozenset[str]] = frozenset({"image", "video"})

    def encoder_rule(self, adapter: VLMAdapter) -> MergeRule | None:
        """Token merging inside the vision encoder, if any."""
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

    def select(self, adapter: VLMAdapter, kind: str, tokens: UnitTokens) -> UnitTokens:
        """Pre-LLM selection on one image/video's tokens (``kind``); the default keeps everything."""
        return tokens

    def select_request(
        self, adapter: VLMAdapter, kinds: list[str], tokens: list[UnitTokens], text: torch.Tensor
    ) -> list[UnitTokens]:
        """Pre-LLM selection over all units of one request; ``text`` holds the prompt's embeddings."""
        return [self.select(adapter, kind, unit) for kind, unit in zip(kinds, tokens, strict=True)]

    def attention_hooks(self, visual: torch.Tensor, cache) -> list[AttentionHook]:
        """Decode-time attention hooks for a batch; ``visual`` marks the visual columns of the cache."""
        return []

    def finish(self, hooks: list[AttentionHook]) -> None:
        """Called after a batch with the hooks this method created."""

    def report(self, hooks: list[AttentionHook], sample: int, account) -> dict[str, Any]:
        """Method-specific numbers for one request of the last batch (added to its ``account``)."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}

    @contextmanager
    def __call__(self, adapter: VLMAdapter) -> Iterator[Method]:
        self.check(adapter)
        if adapter.active_method is not None:
            raise RuntimeError(f"{adapter.name} already has method '{adapter.active_method.name}' attached")
        with ExitStack() as stack:
            rule = self.encoder_rule(adapter)
            if rule is not None:
                adapter.merging = stack.enter_context(
                    attach_merging(
                        adapter.vision_model, rule, protected=adapter.protected, token_order=self.token_order
                    )
                )
            adapter.active_method = self
            try:
                yield self
            finally:
                adapter.active_method = None
                adapter.merging = None


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

    @property
    def token_order(self) -> str:
        orders = {p.token_order for p in self.parts if p.encoder_rule.__func__ is not Method.encoder_rule}
        return orders.pop() if len(orders) == 1 else "spatial"

    @property
    def uses_vtu(self) -> bool:
        return any(p.uses_vtu for p in self.parts)

    def check(self, adapter: VLMAdapter) -> None:
        for part in self.parts:
            part.check(adapter)
        self.encoder_rule(adapter)

    @property
    def keeps_positions(self) -> bool:
        return any(p.keeps_positions for p in self.parts)

    def select_request(
        self, adapter: VLMAdapter, kinds: list[str], tokens: list[UnitTokens], text: torch.Tensor
    ) -> list[UnitTokens]:
        for part in self.parts:
            tokens = part.select_request(adapter, kinds, tokens, text)
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
