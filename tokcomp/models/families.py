"""Which adapter serves which stock model type."""

from __future__ import annotations

from transformers import PreTrainedModel

from tokcomp.errors import TokcompError
from tokcomp.models.adapters import LlavaAdapter, LlavaOnevisionAdapter, VLMAdapter
from tokcomp.models.qwen import Qwen2_5_VLAdapter
from tokcomp.models.qwen3 import Qwen3VLAdapter

ADAPTERS: dict[str, type[VLMAdapter]] = {
    "llava": LlavaAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
}


def adapter_for_model(model: PreTrainedModel) -> VLMAdapter:
    """The adapter of a stock model loaded by the user (its family from ``config.model_type``)."""
    existing = getattr(model, "_tokcomp_adapter", None)
    if existing is not None:
        return existing
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise TokcompError(f"model type '{model_type}' is not supported (supported: {', '.join(ADAPTERS)})")
    return cls(model, None, None, getattr(config, "_name_or_path", "") or type(model).__name__)
