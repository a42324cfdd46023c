"""The method base class: a dataclass whose call is a context manager attaching it to a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tokcomp.methods.dtome import MergeRule, attach_merging

if TYPE_CHECKING:
    from tokcomp.models.adapters import VLMAdapter


@dataclass
class Method:
    """No compression: the plain model. Subclasses override the hooks they need.

    ``with method(adapter):`` attaches the method's encoder-side hooks to the stock model and makes
    it the adapter's active method; ``tokcomp.pipeline.generate`` then applies its other stages.
    """

    name: ClassVar[str] = "none"

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
