"""One request path for every method: encode -> select -> splice -> prefill/decode -> account.

* **encode**: all encoder views of the batch go through the stock vision tower in one call (with the
  active method's merging hooks, if any) and the stock projector.
* **select**: per visual unit, the LLM tokens: the stock features for the plain model, or unique
  merged tokens plus the full-length map ``M`` for a merging method.
* **splice**: the prompt is tokenized with one placeholder per image/video, text embeddings come
  from the stock embedding table, and the visual tokens are put in place. The sequence the LLM
  receives is the *unique* one; ``mapping`` sends every full-length position to its unique token.
* **prefill/decode**: the stock language model with a ``DynamicCache``. With VTU the attention
  function expands to the full length (true positions); without it the shortened sequence gets
  contiguous positions. Batches are left-padded; greedy decoding.
* **account**: visual tokens before/after, encoder tokens per layer, timings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from tokcomp.errors import TokcompError
from tokcomp.methods.base import Method
from tokcomp.methods.vtu import VTUState, attach_vtu
from tokcomp.models.adapters import VLMAdapter
from tokcomp.models.visual import UnitTokens


@dataclass
class Request:
    """A prompt with images (each its own unit) and/or one video (a list of frames)."""

    prompt: str
    images: Sequence[Image.Image] = ()
    video: Sequence[Image.Image] | None = None


@dataclass
class Account:
    """What compression did to one request."""

    visual_full: int
    visual_kept: int
    per_image: list[dict]
    per_layer: list[int]  # visual tokens after each encoder layer, summed over the request's units
    prompt_tokens_full: int
    prompt_tokens_kept: int


@dataclass
class Generation:
    answer: str
    token_ids: list[int]
    account: Account
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        acc = self.account
        return {
            "answer": self.answer,
            "visual_tokens": {"full": acc.visual_full, "kept": acc.visual_kept, "per_image": acc.per_image},
            "prompt_tokens": {"full": acc.prompt_tokens_full, "kept": acc.prompt_tokens_kept},
            "per_layer": acc.per_layer,
            "timings_ms": self.timings_ms,
            "token_ids": self.token_ids,
        }


@dataclass
class Spliced:
    """One request's LLM input: unique embeddings and the full-length map (text included)."""

    embeds: torch.Tensor  # (L_un, H)
    mapping: torch.Tensor  # (L_full,)
    account: Account

    @property
    def is_identity(self) -> bool:
        return self.mapping.shape[0] == self.embeds.shape[0]


@dataclass
class Batch:
    """Left-padded batch of spliced requests."""

    embeds: torch.Tensor  # (B, L_un, H)
    unique_valid: torch.Tensor  # (B, L_un)
    mapping: torch.Tensor  # (B, L_full)
    full_valid: torch.Tensor  # (B, L_full)
    full_positions: torch.Tensor  # (B, L_full)
    full_lengths: torch.Tensor  # (B,)
    unique_lengths: torch.Tensor  # (B,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pipeline:
    """Runs requests through a loaded VLM with the method attached to it (or the plain model)."""

    def __init__(self, adapter: VLMAdapter, method: Method | None = None, vtu_on_identity: bool = False) -> None:
        """``vtu_on_identity`` runs the VTU path even when nothing merged (to check it against the plain model)."""
        self.adapter = adapter
        self.method = method or adapter.active_method or Method()
        self.vtu_on_identity = vtu_on_identity

    @property
    def device(self) -> torch.device:
        return next(self.adapter.model.parameters()).device

    # --- encode + select ---------------------------------------------------------------------
    @torch.no_grad()
    def visual_tokens(self, requests: Sequence[Request]) -> list[list[UnitTokens]]:
        """Per request, per visual unit: the tokens the LLM receives."""
        adapter = self.adapter
        units = [adapter.prepare_units(list(r.images), list(r.video) if r.video else None) for r in requests]
        merging = adapter.merging is not None and self.method.encoder_rule(adapter) is not None
        if not merging:
            return [adapter.stock_unit_tokens(u) for u in units]
        views = torch.cat([u.views for req in units for u in req]) if any(units) else None
        encoded = adapter.encode(views.to(self.device), project=True) if views is not None else []
        out, cursor = [], 0
        for req in units:
            tokens = []
            for unit in req:
                n = unit.views.shape[0]
                tokens.append(adapter.merged_unit_tokens(unit, encoded[cursor : cursor + n]))
                cursor += n
            out.append(tokens)
        return out

    # --- splice ------------------------------------------------------------------------------
    def splice(self, request: Request, units: list[UnitTokens], unit_kinds: list[str]) -> Spliced:
        adapter = self.adapter
        text = adapter.build_prompt(request.prompt, len(request.images), bool(request.video))
        ids = adapter.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        placeholder_ids = {adapter.image_token_id: "image"}
        if adapter.video_token_id is not None:
            placeholder_ids[adapter.video_token_id] = "video"
        slots = [i for i, t in enumerate(ids.tolist()) if t in placeholder_ids]
        kinds = [placeholder_ids[int(ids[i])] for i in slots]
        if kinds != unit_kinds:
            raise TokcompError(f"the prompt has placeholders {kinds} but the request has {unit_kinds}")
        text_embeds = adapter.embed_tokens(ids.to(self.device))
        pieces, maps = [], []
        offset, start = 0, 0
        for slot, unit in zip([*slots, len(ids)], [*units, None], strict=True):
            n_text = slot - start
            pieces.append(text_embeds[start:slot])
            maps.append(torch.arange(n_text, device=self.device) + offset)
            offset += n_text
            if unit is not None:
                pieces.append(unit.unique.to(text_embeds.dtype))
                maps.append(unit.mapping.to(self.device) + offset)
                offset += unit.kept
            start = slot + 1
        embeds = torch.cat(pieces)
        mapping = torch.cat(maps)
        per_image = [
            {"kind": kind, "full": u.full, "kept": u.kept, "per_layer": u.layer_counts}
            for kind, u in zip(unit_kinds, units, strict=True)
        ]
        per_layer = [sum(c) for c in zip(*(u.layer_counts for u in units), strict=True)] if units else []
        account = Account(
            visual_full=sum(u.full for u in units),
            visual_kept=sum(u.kept for u in units),
            per_image=per_image,
            per_layer=per_layer,
            prompt_tokens_full=int(mapping.shape[0]),
            prompt_tokens_kept=int(embeds.shape[0]),
        )
        return Spliced(embeds, mapping, account)

    def collate(self, spliced: Sequence[Spliced]) -> Batch:
        bsz = len(spliced)
        hidden = spliced[0].embeds.shape[-1]
        l_un = max(s.embeds.shape[0] for s in spliced)
        l_full = max(s.mapping.shape[0] for s in spliced)
        dev, dtype = self.device, spliced[0].embeds.dtype
        embeds = torch.zeros(bsz, l_un, hidden, dtype=dtype, device=dev)
        unique_valid = torch.zeros(bsz, l_un, dtype=torch.bool, device=dev)
        mapping = torch.zeros(bsz, l_full, dtype=torch.long, device=dev)
        full_valid = torch.zeros(bsz, l_full, dtype=torch.bool, device=dev)
        positions = torch.zeros(bsz, l_full, dtype=torch.long, device=dev)
        for b, s in enumerate(spliced):
            n_un, n_full = s.embeds.shape[0], s.mapping.shape[0]
            pad_un, pad_full = l_un - n_un, l_full - n_full
            embeds[b, pad_un:] = s.embeds
            unique_valid[b, pad_un:] = True
            mapping[b, pad_full:] = s.mapping + pad_un
            full_valid[b, pad_full:] = True
            positions[b, pad_full:] = torch.arange(n_full, device=dev)
        return Batch(
            embeds, unique_valid, mapping, full_valid, positions,
            torch.tensor([s.mapping.shape[0] for s in spliced], device=dev),
            torch.tensor([s.embeds.shape[0] for s in spliced], device=dev),
        )  # fmt: skip

    # --- prefill / decode --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[Request], max_new_tokens: int = 16) -> list[Generation]:
        if not requests:
            return []
        if max_new_tokens < 1:
            raise TokcompError("max new tokens must be at least 1")
        attached = self.adapter.active_method
        if attached is None:
            with self.method(self.adapter):
                return self._generate(requests, max_new_tokens)
        if attached is not self.method:
            raise TokcompError(f"method '{attached.name}' is attached; detach it before using '{self.method.name}'")
        return self._generate(requests, max_new_tokens)

    def _generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[Generation]:
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        unit_tokens = self.visual_tokens(requests)
        _sync(dev)
        t_vision = time.perf_counter() - t0
        kinds = [["image"] * len(r.images) + (["video"] if r.video else []) for r in requests]
        spliced = [self.splice(r, u, k) for r, u, k in zip(requests, unit_tokens, kinds, strict=True)]
        batch = self.collate(spliced)
        use_vtu = self.method.uses_vtu and (self.vtu_on_identity or not all(s.is_identity for s in spliced))

        t1 = time.perf_counter()
        steps, logits, state = self._run(batch, use_vtu, max_new_tokens)
        _sync(dev)
        elapsed = time.perf_counter() - t1
        prefill, decode = state["prefill_s"], elapsed - state["prefill_s"]
        eos = self.adapter.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        results = []
        for b, s in enumerate(spliced):
            ids = []
            for token in steps[b]:
                if token in eos_ids:
                    break
                ids.append(token)
            answer = self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
            results.append(Generation(answer, ids, s.account))
        n_decode = max(len(x) for x in steps) - 1
        timings = {
            "vision": 1000 * t_vision,
            "prefill": 1000 * prefill,
            "decode_per_token": 1000 * decode / n_decode if n_decode > 0 else 0.0,
        }
        for r in results:
            r.timings_ms = dict(timings)
        self.last_prefill_logits = logits
        return results

    def _run(self, batch: Batch, use_vtu: bool, max_new_tokens: int) -> tuple[list[list[int]], torch.Tensor, dict]:
        adapter = self.adapter
        lm = adapter.language_model
        cache = DynamicCache(config=lm.config)
        bsz = batch.embeds.shape[0]
        dev = batch.embeds.device
        eos = adapter.model.generation_config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [], device=dev)
        pad_id = adapter.tokenizer.pad_token_id or 0
        info: dict = {}
        t_start = time.perf_counter()
        if use_vtu:
            state = VTUState(
                mapping=batch.mapping, full_valid=batch.full_valid, positions=batch.full_positions,
                num_unique=batch.embeds.shape[1], cache=cache, rotary=lm.rotary_emb,
            )  # fmt: skip
            context = attach_vtu(lm, state)
            position_ids = torch.zeros(bsz, batch.embeds.shape[1], dtype=torch.long, device=dev)
            attention_mask = batch.unique_valid.long()
            next_positions = batch.full_lengths.clone()
        else:
            state = None
            context = nullcontext()
            attention_mask = batch.unique_valid.long()
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            next_positions = batch.unique_lengths.clone()
        steps: list[list[int]] = [[] for _ in range(bsz)]
        finished = torch.zeros(bsz, dtype=torch.bool, device=dev)
        with context:
            out = lm(
                inputs_embeds=batch.embeds, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            logits = adapter.lm_head(out.last_hidden_state[:, -1:, :])[:, -1].float()
            _sync(dev)
            info["prefill_s"] = time.perf_counter() - t_start
            prefill_logits = logits
            if state is not None:
                state.prefill = False
                state.key_valid = batch.full_valid
                attention_mask = batch.full_valid.long()
            for step in range(max_new_tokens):
                token = logits.argmax(dim=-1)
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                for b in range(bsz):
                    if not finished[b]:
                        steps[b].append(int(token[b]))
                if eos_ids.numel():
                    finished |= torch.isin(token, eos_ids)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                attention_mask = torch.cat(
                    [attention_mask, torch.ones(bsz, 1, dtype=attention_mask.dtype, device=dev)], 1
                )
                if state is not None:
                    state.key_valid = attention_mask.bool()
                out = lm(
                    inputs_embeds=adapter.embed_tokens(token[:, None]), attention_mask=attention_mask,
                    position_ids=next_positions[:, None], past_key_values=cache, use_cache=True,
                )  # fmt: skip
                next_positions = next_positions + 1
                logits = adapter.lm_head(out.last_hidden_state[:, -1:, :])[:, -1].float()
        info["cache"] = cache
        self.last_batch = batch
        self.last_cache = cache
        return steps, prefill_logits, info


def generate(
    adapter: VLMAdapter, requests: Sequence[Request], max_new_tokens: int = 16, method: Method | None = None
) -> list[Generation]:
    """Generate answers for ``requests`` with ``method`` (default: the one attached, else none)."""
    return Pipeline(adapter, method).generate(requests, max_new_tokens=max_new_tokens)


def account_dict(account: Account) -> dict:
    return asdict(account)
