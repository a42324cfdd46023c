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

import inspect
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from tokcomp.errors import TokcompError
from tokcomp.methods.attention import LLMRun, use_attention
from tokcomp.methods.base import Method
from tokcomp.methods.vtu import VTUState
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
    """What compression did to one request.

    ``visual_full``: visual tokens of the stock model. ``visual_kept``: distinct visual embeddings
    the LLM computes on in prefill. ``visual_positions``: visual positions the LLM's sequence has
    (more than ``visual_kept`` under VTU, where merged tokens keep all their positions).
    """

    visual_full: int
    visual_kept: int
    visual_positions: int
    per_image: list[dict]
    per_layer: list[int]  # visual tokens after each encoder layer, summed over the request's units
    prompt_tokens_full: int
    prompt_tokens_kept: int
    kv_bytes: int = 0  # this request's KV cache at the end of generation
    kv_bytes_per_layer: list[int] = field(default_factory=list)  # the same, per decoder layer
    decode_visual_attended: float = 0.0  # visual keys attended per layer and decode step (mean)
    methods: dict = field(default_factory=dict)  # method-specific numbers (DyCoke's retained ratio, ...)


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
            "visual_tokens": {
                "full": acc.visual_full,
                "kept": acc.visual_kept,
                "positions": acc.visual_positions,
                "per_image": acc.per_image,
                "decode_attended": round(acc.decode_visual_attended, 2),
            },
            "prompt_tokens": {"full": acc.prompt_tokens_full, "kept": acc.prompt_tokens_kept},
            "per_layer": acc.per_layer,
            "kv_cache_bytes": acc.kv_bytes,
            **acc.methods,
            "timings_ms": self.timings_ms,
            "token_ids": self.token_ids,
        }


@dataclass
class Spliced:
    """One request's LLM input: unique embeddings and the full-length map (text included)."""

    embeds: torch.Tensor  # (L_un, H)
    mapping: torch.Tensor  # (L_full,)
    account: Account
    visual_unique: torch.Tensor  # (L_un,) bool: visual entries of the LLM input
    visual_full: torch.Tensor  # (L_full,) bool: visual positions of the full-length sequence
    positions: torch.Tensor  # (L_un,) position ids of the LLM input when VTU is off

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
    visual_unique: torch.Tensor  # (B, L_un)
    visual_full: torch.Tensor  # (B, L_full)
    positions: torch.Tensor  # (B, L_un) position ids without VTU (1 on padding, as HF does)


PERTURB_ENV = "TOKCOMP_PERTURB_INPUTS"  # "1": every pixel one ulp up (the gate's noise study, see Makefile)


def nudge_one_ulp(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every element moved to the next representable value above it."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def _cache_argument(lm: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The KV cache under the keyword this transformers wants (``cache`` from 5.2x, ``past_key_values``
    before; the old name warns until its removal in 5.40)."""
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    return {name: cache}


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
    def prepare(self, requests: Sequence[Request]) -> list[list]:
        """Preprocess every request's images and video into encoder views (the VLM's own processor)."""
        units = [self.adapter.prepare_units(list(r.images), list(r.video) if r.video else None) for r in requests]
        if os.environ.get(PERTURB_ENV) == "1":
            for unit in (u for req in units for u in req):
                unit.views = nudge_one_ulp(unit.views)
        return units

    @torch.no_grad()
    def visual_tokens(self, requests: Sequence[Request], units: list[list] | None = None) -> list[list[UnitTokens]]:
        """Per request, per visual unit: the tokens the LLM receives (before any pre-LLM selection)."""
        adapter = self.adapter
        units = self.prepare(requests) if units is None else units
        merging = adapter.merging is not None and self.method.encoder_rule(adapter) is not None
        if not merging:
            return [adapter.stock_unit_tokens(req) for req in units]
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

    def select(self, request: Request, kinds: list[str], tokens: list[UnitTokens]) -> list[UnitTokens]:
        """The method's pre-LLM selection (TTM, pruning) on one request's units, given its prompt."""
        ids = self.adapter.tokenizer(request.prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
        text = self.adapter.embed_tokens(ids.to(self.device))
        return self.method.select_request(self.adapter, kinds, tokens, text)

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
        pieces, maps, vis_un, vis_full = [], [], [], []
        offset, start = 0, 0
        for slot, unit in zip([*slots, len(ids)], [*units, None], strict=True):
            n_text = slot - start
            pieces.append(text_embeds[start:slot])
            maps.append(torch.arange(n_text, device=self.device) + offset)
            vis_un.append(torch.zeros(n_text, dtype=torch.bool))
            vis_full.append(torch.zeros(n_text, dtype=torch.bool))
            offset += n_text
            if unit is not None:
                pieces.append(unit.unique.to(text_embeds.dtype))
                maps.append(unit.mapping.to(self.device) + offset)
                vis_un.append(torch.ones(unit.kept, dtype=torch.bool))
                vis_full.append(torch.ones(unit.full, dtype=torch.bool))
                offset += unit.kept
            start = slot + 1
        embeds = torch.cat(pieces)
        mapping = torch.cat(maps)
        per_image = [
            {
                "kind": kind,
                "full": u.original,
                "kept": u.kept,
                "positions": u.full,
                "views": u.views,
                "per_layer": u.layer_counts,
            }
            for kind, u in zip(unit_kinds, units, strict=True)
        ]
        per_layer = [sum(c) for c in zip(*(u.layer_counts for u in units), strict=True)] if units else []
        account = Account(
            visual_full=sum(u.original for u in units),
            visual_kept=sum(u.kept for u in units),
            visual_positions=sum(u.full for u in units),
            per_image=per_image,
            per_layer=per_layer,
            prompt_tokens_full=int(mapping.shape[0]) - sum(u.full for u in units) + sum(u.original for u in units),
            prompt_tokens_kept=int(embeds.shape[0]),
        )
        dev = self.device
        positions = self._llm_positions(len(ids), slots, units, embeds.shape[0])
        return Spliced(
            embeds, mapping, account, torch.cat(vis_un).to(dev), torch.cat(vis_full).to(dev), positions.to(dev)
        )

    def _llm_positions(self, num_ids: int, slots: list[int], units: list[UnitTokens], length: int) -> torch.Tensor:
        """Position ids of the LLM input without VTU: the stock sequence's own positions for methods that
        keep them (pruning), else contiguous (merging ablations, DyCoke's TTM)."""
        if not self.method.keeps_positions or any(u.kept != u.full for u in units):
            return torch.arange(length)
        pieces, stock, start = [], 0, 0
        for slot, unit in zip([*slots, num_ids], [*units, None], strict=True):
            pieces.append(torch.arange(stock, stock + slot - start))
            stock += slot - start
            if unit is not None:
                pieces.append(stock + unit.positions.cpu())
                stock += unit.original
            start = slot + 1
        return torch.cat(pieces)

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
        visual_unique = torch.zeros(bsz, l_un, dtype=torch.bool, device=dev)
        visual_full = torch.zeros(bsz, l_full, dtype=torch.bool, device=dev)
        llm_positions = torch.ones(bsz, l_un, dtype=torch.long, device=dev)
        for b, s in enumerate(spliced):
            n_un, n_full = s.embeds.shape[0], s.mapping.shape[0]
            pad_un, pad_full = l_un - n_un, l_full - n_full
            embeds[b, pad_un:] = s.embeds
            unique_valid[b, pad_un:] = True
            mapping[b, pad_full:] = s.mapping + pad_un
            full_valid[b, pad_full:] = True
            positions[b, pad_full:] = torch.arange(n_full, device=dev)
            visual_unique[b, pad_un:] = s.visual_unique
            visual_full[b, pad_full:] = s.visual_full
            llm_positions[b, pad_un:] = s.positions
        return Batch(
            embeds, unique_valid, mapping, full_valid, positions,
            torch.tensor([s.mapping.shape[0] for s in spliced], device=dev),
            torch.tensor([s.embeds.shape[0] for s in spliced], device=dev),
            visual_unique, visual_full, llm_positions,
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

    def _check_inputs(self, kinds: list[list[str]]) -> None:
        """A method that acts on none of a request's inputs (DyCoke on images) is a user error."""
        label = getattr(self.method, "label", self.method.name)
        for request_kinds in kinds:
            if request_kinds and not set(request_kinds) & self.method.inputs:
                raise TokcompError(
                    f"method '{label}' works on {' and '.join(sorted(self.method.inputs))} input; "
                    f"this request has only {' and '.join(sorted(set(request_kinds)))}"
                )

    def _check_length(self, spliced: Sequence[Spliced], max_new_tokens: int) -> None:
        """The stock sequence (the prompt with every visual token) and the answer must fit the LLM's positions.

        Checked on the stock length whatever the method, so a method never changes which requests fit.
        """
        limit = getattr(self.adapter.language_model.config, "max_position_embeddings", None)
        if not limit:
            return
        for s in spliced:
            acc = s.account
            needed = acc.prompt_tokens_full + max_new_tokens
            if needed > limit:
                raise TokcompError(
                    f"the prompt is {acc.prompt_tokens_full} tokens ({acc.visual_full} visual) and {max_new_tokens} "
                    f"new tokens are asked for: {needed} positions, more than the {limit} of "
                    f"{self.adapter.name} (max_position_embeddings); shorten the prompt or use fewer images or frames"
                )

    def _generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[Generation]:
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        kinds = [["image"] * len(r.images) + (["video"] if r.video else []) for r in requests]
        self._check_inputs(kinds)
        units = self.prepare(requests)
        t_pre = time.perf_counter()
        merge_before = self.adapter.merging.seconds if self.adapter.merging is not None else 0.0
        encoded = self.visual_tokens(requests, units)
        _sync(dev)
        t_enc = time.perf_counter()
        unit_tokens = [self.select(r, k, u) for r, k, u in zip(requests, kinds, encoded, strict=True)]
        _sync(dev)
        t_sel = time.perf_counter()
        merge_s = (self.adapter.merging.seconds if self.adapter.merging is not None else 0.0) - merge_before
        spliced = [self.splice(r, u, k) for r, u, k in zip(requests, unit_tokens, kinds, strict=True)]
        self._check_length(spliced, max_new_tokens)
        batch = self.collate(spliced)
        use_vtu = self.method.uses_vtu and (self.vtu_on_identity or not all(s.is_identity for s in spliced))

        t1 = time.perf_counter()
        run = self._run(batch, use_vtu, max_new_tokens)
        _sync(dev)
        decode = time.perf_counter() - t1 - run.prefill_s
        eos_ids = set(self._eos_ids())
        results = []
        for b, s in enumerate(spliced):
            ids = []
            for token in run.steps[b]:
                if token in eos_ids:
                    break
                ids.append(token)
            answer = self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
            s.account.kv_bytes_per_layer = run.kv_layers[b]
            s.account.kv_bytes = sum(run.kv_layers[b])
            s.account.decode_visual_attended = run.attended[b]
            s.account.methods = self.method.report(self.last_hooks, b, s.account)
            results.append(Generation(answer, ids, s.account))
        n_decode = max(len(x) for x in run.steps) - 1
        hook_s = sum(getattr(h, "seconds", 0.0) for h in self.last_hooks)
        timings = {
            "preprocess": 1000 * (t_pre - t0),
            "vision": 1000 * (t_enc - t_pre),
            "select": 1000 * (t_sel - t_enc),
            "prefill": 1000 * run.prefill_s,
            "ttft": 1000 * (t1 - t0 + run.prefill_s),
            "decode_per_token": 1000 * decode / n_decode if n_decode > 0 else 0.0,
            "method_overhead": 1000 * (merge_s + (t_sel - t_enc) + hook_s),
        }
        for r in results:
            r.timings_ms = dict(timings)
        self.last_prefill_logits = run.prefill_logits
        return results

    def _eos_ids(self) -> list[int]:
        eos = self.adapter.model.generation_config.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    def _run(self, batch: Batch, use_vtu: bool, max_new_tokens: int) -> _RunResult:
        """Prefill and greedy decoding of one batch."""
        adapter = self.adapter
        lm = adapter.language_model
        cache = DynamicCache(config=lm.config)
        cache_kwarg = _cache_argument(lm, cache)
        bsz = batch.embeds.shape[0]
        dev = batch.embeds.device
        eos_ids = torch.tensor(self._eos_ids(), dtype=torch.long, device=dev)
        pad_id = adapter.tokenizer.pad_token_id or 0
        t_start = time.perf_counter()
        attention_mask = batch.unique_valid.long()
        visual = batch.visual_full if use_vtu else batch.visual_unique
        hooks = self.method.attention_hooks(visual, cache)
        prefill_hooks = [h for h in hooks if h.active_in_prefill]
        if use_vtu and prefill_hooks:
            raise TokcompError(f"{self.method.name}: VTU cannot be combined with pruning inside the prefill")
        if use_vtu:
            state = VTUState(
                mapping=batch.mapping, full_valid=batch.full_valid, positions=batch.full_positions,
                num_unique=batch.embeds.shape[1], cache=cache, rotary=lm.rotary_emb,
            )  # fmt: skip
            prefill_context = use_attention(lm, LLMRun(vtu=state))
            position_ids = torch.zeros(bsz, batch.embeds.shape[1], dtype=torch.long, device=dev)
            next_positions = batch.full_lengths.clone()
            valid = batch.full_valid
        else:
            run = LLMRun(hooks=prefill_hooks, prefill_valid=batch.unique_valid)
            prefill_context = use_attention(lm, run) if prefill_hooks else nullcontext()
            position_ids = batch.positions
            next_positions = batch.positions[:, -1] + 1
            valid = batch.unique_valid
        with prefill_context:
            out = lm(
                inputs_embeds=batch.embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **cache_kwarg,
            )  # fmt: skip
        prefill_logits = logits = adapter.lm_head(out.last_hidden_state[:, -1:, :])[:, -1].float()
        _sync(dev)
        prefill_s = time.perf_counter() - t_start

        decode_run = LLMRun(hooks=hooks, key_valid=valid)
        decode_context = use_attention(lm, decode_run) if hooks else nullcontext()
        attention_mask = valid.long()
        steps: list[list[int]] = [[] for _ in range(bsz)]
        finished = torch.zeros(bsz, dtype=torch.bool, device=dev)
        with decode_context:
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
                ones = torch.ones(bsz, 1, dtype=attention_mask.dtype, device=dev)
                attention_mask = torch.cat([attention_mask, ones], dim=1)
                decode_run.key_valid = attention_mask.bool()
                out = lm(
                    inputs_embeds=adapter.embed_tokens(token[:, None]), attention_mask=attention_mask,
                    position_ids=next_positions[:, None], use_cache=True, **cache_kwarg,
                )  # fmt: skip
                next_positions = next_positions + 1
                logits = adapter.lm_head(out.last_hidden_state[:, -1:, :])[:, -1].float()
        self.method.finish(hooks)
        self.last_cache, self.last_hooks = cache, hooks
        attended = _decode_attended(hooks, visual)
        return _RunResult(steps, prefill_logits, prefill_s, _kv_bytes_per_layer(cache, attention_mask.bool(), hooks),
                          attended)  # fmt: skip


@dataclass
class _RunResult:
    steps: list[list[int]]
    prefill_logits: torch.Tensor
    prefill_s: float
    kv_layers: list[list[int]]  # per request, KV bytes of each decoder layer
    attended: list[float]


def _kv_bytes_per_layer(cache: DynamicCache, valid: torch.Tensor, hooks: list) -> list[list[int]]:
    """Bytes of K and V each request holds in each layer's cache (padding and evicted slots not counted)."""
    totals = [[0] * len(cache.layers) for _ in range(valid.shape[0])]
    for index, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        per_column = keys.shape[1] * keys.shape[-1] * keys.element_size() * 2
        columns = valid[:, : keys.shape[-2]]
        for hook in hooks:
            layer_valid = getattr(hook, "valid_columns", None)
            if layer_valid is not None and (override := layer_valid(index, keys.shape[-2])) is not None:
                columns = override
        for b, count in enumerate(columns.sum(dim=1).tolist()):
            totals[b][index] = int(count) * per_column
    return totals


def _decode_attended(hooks: list, visual: torch.Tensor) -> list[float]:
    """Visual keys attended per layer per decode step, per request."""
    for hook in hooks:
        per_sample = getattr(hook, "attended_per_sample", None)
        if per_sample is not None:
            return per_sample()
    return [float(v) for v in visual.sum(dim=1).tolist()]


def generate(
    adapter: VLMAdapter, requests: Sequence[Request], max_new_tokens: int = 16, method: Method | None = None
) -> list[Generation]:
    """Generate answers for ``requests`` with ``method`` (default: the one attached, else none)."""
    return Pipeline(adapter, method).generate(requests, max_new_tokens=max_new_tokens)
