"""tokcomp's attention function, registered with transformers' ``AttentionInterface``.

The pipeline switches the language model to it only for the phases that need it: a VTU prefill
(expansion to the full length, see ``vtu.py``), a prefill with attention hooks (FastV, which also
hooks the decoder layers to cut the sequence between them: ``AttentionHook.attach``), and
decoding with attention hooks (DyCoke's dynamic KV pruning, FastV). A hooked prefill starts from
the stock sdpa mask and stock sdpa call, so layers a hook leaves alone compute exactly what they
would without it; hooks that keep everything (a keep ratio of 1) still run their scoring but leave
every layer on the stock mask and the stock sdpa call, prefill and decoding alike. Everything else
runs the stock attention, so methods that do nothing stay bit-identical to the plain model. The
function receives Q/K/V after RoPE and after the cache update, as every stock attention function does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tokcomp.methods.vtu import VTUState, attend, vtu_prefill

ATTENTION_NAME = "tokcomp"


class AttentionHook:
    """Changes which keys a query sees: in prefill (FastV) or while decoding (DyCoke's DP, FastV).

    A hook lives for one batch (one ``generate`` call), so everything it learns about a request
    (what it kept, its counters) belongs to that call, indexed by the request's row in the batch.
    """

    active_in_prefill: bool = False
    # Whether the hook cuts tokens out of the sequence between layers (later layers' caches are shorter)
    cuts_sequence: bool = False

    @property
    def keeps_everything(self) -> bool:
        """The hook only observes (a keep ratio of 1): its layers run the stock attention, bit for bit."""
        return False

    seconds: float = 0.0  # the hook's own work (probes, masks, gathers), for the account's method overhead

    def attended_per_sample(self) -> list[float] | None:
        """Visual keys attended per layer and decode step, per request (None: every visual key)."""
        return None

    def valid_columns(self, index: int, length: int) -> torch.Tensor | None:
        """Occupied cache slots of layer ``index`` where the hook changed the cache (None: unchanged)."""
        return None

    def start_step(self, active: torch.Tensor) -> None:
        """Called before each decoding step with the requests (B,) still generating; per-request
        statistics count only those steps, so a request reports the same numbers in any batch."""

    def attach(self, language_model: nn.Module) -> AbstractContextManager:
        """Hooks on the language model's decoder layers for this call's prefill (FastV's cut of the
        sequence between layers); removed when the prefill's forward returns. Default: none."""
        return nullcontext()

    def prefill(self, module: nn.Module, query, key, value, mask, scaling, valid):
        """Return the boolean mask (B, 1, Q, K) for this layer's prefill; ``mask`` may be None (causal)."""
        return mask

    def decode(self, module: nn.Module, query, key, value, key_valid, scaling):
        """Return (key, value, key_valid) for this layer and step; the default changes nothing."""
        return key, value, key_valid


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, L): causal, padded keys hidden, every query sees at least itself."""
    length = valid.shape[1]
    tril = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((tril[None] & valid[:, None, :]) | eye[None])[:, None]


@dataclass
class LLMRun:
    """The state of one batch in the language model."""

    vtu: VTUState | None = None
    hooks: list[AttentionHook] = field(default_factory=list)
    key_valid: torch.Tensor | None = None  # (B, L_cache) while decoding: False on left padding
    prefill_valid: torch.Tensor | None = None  # (B, L) in a hooked prefill: False on left padding

    @property
    def prefill(self) -> bool:
        return self.key_valid is None

    @property
    def observing(self) -> bool:
        """Every hook keeps everything, so the layers compute exactly what the stock attention would."""
        return bool(self.hooks) and all(h.keeps_everything for h in self.hooks)


_ACTIVE: ContextVar[LLMRun | None] = ContextVar("tokcomp_llm_run", default=None)


def tokcomp_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    run = _ACTIVE.get()
    if run is None:
        raise RuntimeError("the tokcomp attention function ran outside tokcomp's pipeline")
    if run.prefill:
        if run.vtu is not None:
            return vtu_prefill(module, query, key, value, scaling, run.vtu), None
        mask = attention_mask
        for hook in run.hooks:
            mask = hook.prefill(module, query, key, value, mask, scaling, run.prefill_valid)
        if run.observing:
            mask = attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    key_valid = run.key_valid
    stock_key, stock_value = key, value
    for hook in run.hooks:
        key, value, key_valid = hook.decode(module, query, key, value, key_valid, scaling)
    if run.observing:  # the hooks looked and changed nothing: the stock attention call
        return sdpa_attention_forward(
            module, query, stock_key, stock_value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    mask = key_valid[:, None, None, :]
    window = getattr(module, "sliding_window", None)
    if window and mask.shape[-1] > window:
        mask = mask.clone()
        mask[..., : mask.shape[-1] - window] = False
    out = attend(query, key, value, mask, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, tokcomp_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the stock sdpa masks, for hooked prefills


@contextmanager
def use_attention(language_model: nn.Module, run: LLMRun) -> Iterator[LLMRun]:
    """Run the language model's attention through tokcomp inside the block; restore it on exit."""
    previous = language_model.config._attn_implementation
    token = _ACTIVE.set(run)
    language_model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield run
    finally:
        language_model.set_attn_implementation(previous)
        _ACTIVE.reset(token)


@contextmanager
def attach_vtu(language_model: nn.Module, state: VTUState) -> Iterator[VTUState]:
    """Route the language model's attention through VTU (prefill) inside the block; restore on exit."""
    with use_attention(language_model, LLMRun(vtu=state)):
        yield state
