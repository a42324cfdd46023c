"""tokcomp's driver: requests (prompts, PIL images, frames) -> answers and accounts, for the CLI.

Each batch is preprocessed with the VLM's own processor, its LLM input is built by
``tokcomp.assemble`` (encode -> select -> splice -> collate), and the model's own ``generate`` runs it
through the same hooks that compress a user's ``model.generate`` (``tokcomp.stock``): with VTU the
attention function expands to the full length for the prefill; decode hooks (DyCoke's DP, FastV)
act in the attention function; greedy unless ``generation`` says otherwise. Then the account:
visual tokens before and after, encoder tokens per layer, KV bytes, timings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from tokcomp.assemble import Account, Assembler, Batch, Spliced, eos_token_ids
from tokcomp.errors import TokcompError
from tokcomp.methods.base import Method
from tokcomp.models.adapters import VLMAdapter
from tokcomp.models.visual import UnitTokens


@dataclass
class Request:
    """A prompt with images (each its own unit) and/or one video (a list of frames)."""

    prompt: str
    images: Sequence[Image.Image] = ()
    video: Sequence[Image.Image] | None = None


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


PERTURB_ENV = "TOKCOMP_PERTURB_INPUTS"  # "1": every pixel one ulp up (the gate's noise study, see Makefile)


def nudge_one_ulp(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every element moved to the next representable value above it."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pipeline(Assembler):
    """Runs requests through a loaded VLM with the method attached to it (or the plain model)."""

    def __init__(
        self,
        adapter: VLMAdapter,
        method: Method | None = None,
        vtu_on_identity: bool = False,
        generation: dict | None = None,
    ) -> None:
        """``vtu_on_identity`` runs the VTU path even when nothing merged (to check it against the plain
        model); ``generation``: keyword arguments for the stock ``generate`` (greedy by default)."""
        super().__init__(adapter, method or adapter.active_method or Method())
        self.vtu_on_identity = vtu_on_identity
        self.generation = dict(generation or {})

    # --- encode + select ---------------------------------------------------------------------
    def prepare(self, requests: Sequence[Request]) -> list[list]:
        """Preprocess every request's images and video into encoder views (the VLM's own processor)."""
        units = [self.adapter.prepare_units(list(r.images), list(r.video) if r.video else None) for r in requests]
        if os.environ.get(PERTURB_ENV) == "1":
            for unit in (u for req in units for u in req):
                unit.views = nudge_one_ulp(unit.views)
        return units

    def visual_tokens(self, requests: Sequence[Request], units: list[list] | None = None) -> list[list[UnitTokens]]:
        """Per request, per visual unit: the tokens the LLM receives (before any pre-LLM selection)."""
        return self.tokens_of(self.prepare(requests) if units is None else units)

    def prompt_ids(self, request: Request) -> torch.Tensor:
        """The request's prompt in the chat template, one placeholder per image/video, as token ids."""
        adapter = self.adapter
        prompt = adapter.build_prompt(request.prompt, len(request.images), bool(request.video))
        if request.video:
            prompt = adapter.video_prompt(prompt, len(request.video))
        return adapter.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]

    def select(
        self, request: Request, kinds: list[str], tokens: list[UnitTokens], record: dict | None = None
    ) -> list[UnitTokens]:
        """The method's pre-LLM selection (TTM, pruning) on one request's units, given its prompt;
        ``record`` receives what the method decided for this request."""
        return self.select_ids(self.prompt_ids(request), kinds, tokens, record)

    # --- splice ------------------------------------------------------------------------------
    def splice(self, request: Request, units: list[UnitTokens], unit_kinds: list[str]) -> Spliced:
        return self.splice_ids(self.prompt_ids(request), units, unit_kinds)

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
        trace_before = self.adapter.trace.seconds if self.adapter.trace is not None else 0.0
        encoded = self.visual_tokens(requests, units)
        _sync(dev)
        t_enc = time.perf_counter()
        records: list[dict] = [{} for _ in requests]  # per request, for this call only
        ids = [self.prompt_ids(r) for r in requests]
        unit_tokens = [
            self.select_ids(i, k, u, rec) for i, k, u, rec in zip(ids, kinds, encoded, records, strict=True)
        ]
        _sync(dev)
        t_sel = time.perf_counter()
        merge_s = (self.adapter.merging.seconds if self.adapter.merging is not None else 0.0) - merge_before
        trace_s = (self.adapter.trace.seconds if self.adapter.trace is not None else 0.0) - trace_before
        spliced = [self.splice_ids(i, u, k) for i, u, k in zip(ids, unit_tokens, kinds, strict=True)]
        for s, rec in zip(spliced, records, strict=True):
            s.account.selection = rec
        self._check_length(spliced, max_new_tokens)
        batch = self.collate(spliced)
        use_vtu = self.method.uses_vtu and (self.vtu_on_identity or not all(s.is_identity for s in spliced))

        t1 = time.perf_counter()
        run = self._run(batch, use_vtu, max_new_tokens, spliced)
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
        hook_s = sum(h.seconds for h in self.last_hooks)
        timings = {
            "preprocess": 1000 * (t_pre - t0),
            "vision": 1000 * (t_enc - t_pre),
            "trace": 1000 * trace_s,  # part of vision: the encoder trace's recomputed attention, on one layer
            "select": 1000 * (t_sel - t_enc),
            "prefill": 1000 * run.prefill_s,
            "ttft": 1000 * (t1 - t0 + run.prefill_s),
            "decode_per_token": 1000 * decode / n_decode if n_decode > 0 else 0.0,
            "method_overhead": 1000 * (merge_s + trace_s + (t_sel - t_enc) + hook_s),
        }
        for r in results:
            r.timings_ms = dict(timings)
        self.last_prefill_logits = run.prefill_logits
        return results

    def _eos_ids(self) -> list[int]:
        return eos_token_ids(self.adapter.model.generation_config)

    def _run(self, batch: Batch, use_vtu: bool, max_new_tokens: int, spliced: Sequence[Spliced]) -> _RunResult:
        """Prefill and decoding of one batch: the stock ``generate`` of the model, through the same hooks
        that compress a user's own ``model.generate`` (``tokcomp.stock``); greedy unless ``generation``
        says otherwise."""
        adapter = self.adapter
        bridge = adapter.bridge
        bridge.prepare(batch, list(spliced), use_vtu)
        # what generate extends step by step: under VTU the full-length mask and positions (the cache is
        # full length), else the shortened sequence's own
        mask = batch.full_valid if use_vtu else batch.unique_valid
        positions = batch.position_ids(vtu=use_vtu)
        options = {"do_sample": False, "num_beams": 1, **self.generation}
        eos, pad = self._eos_ids(), adapter.tokenizer.pad_token_id
        bridge.last_call = None
        try:
            out = adapter.model.generate(
                inputs_embeds=batch.embeds, attention_mask=mask.long(), position_ids=positions,
                max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos or None,
                pad_token_id=pad if pad is not None else (eos[0] if eos else 0),
                return_dict_in_generate=True, output_logits=True, use_cache=True, **options,
            )  # fmt: skip
        finally:
            bridge.prepared = None
        call = bridge.last_call
        if call is None or not call.from_pipeline:
            raise TokcompError(f"{self.method.name}: the prefill did not run through tokcomp's hooks")
        eos_set = set(eos)
        steps: list[list[int]] = []
        for row in out.sequences.tolist():
            ids = []
            for token in row:
                ids.append(token)
                if token in eos_set:
                    break
            steps.append(ids)
        hooks = call.hooks
        self.method.finish(hooks)
        cache = out.cache
        self.last_cache, self.last_hooks = cache, hooks
        generated = out.sequences.shape[1]
        final_valid = torch.cat([mask, mask.new_ones(mask.shape[0], max(0, generated - 1))], dim=1)
        for b, ids in enumerate(steps):  # a request that ended early holds only the tokens fed before its EOS
            final_valid[b, mask.shape[1] + max(0, len(ids) - 1) :] = False
        visual = batch.visual_full if use_vtu else batch.visual_unique
        kv = _kv_bytes_per_layer(cache, final_valid.bool(), hooks, final_valid.shape[1] - mask.shape[1])
        return _RunResult(steps, out.logits[0].float(), call.timings_ms["prefill"] / 1000, kv,
                          _decode_attended(hooks, visual))  # fmt: skip


@dataclass
class _RunResult:
    steps: list[list[int]]
    prefill_logits: torch.Tensor
    prefill_s: float
    kv_layers: list[list[int]]  # per request, KV bytes of each decoder layer
    attended: list[float]


def _kv_bytes_per_layer(cache: DynamicCache, valid: torch.Tensor, hooks: list, steps: int = 0) -> list[list[int]]:
    """Bytes of K and V each request holds in each layer's cache (padding and evicted slots not counted).
    ``valid``'s last ``steps`` columns are the decode steps' slots each request filled before its EOS; they
    hold where a hook changed a layer's slots too."""
    totals = [[0] * len(cache.layers) for _ in range(valid.shape[0])]
    for index, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        per_column = keys.shape[1] * keys.shape[-1] * keys.element_size() * 2
        columns = valid[:, : keys.shape[-2]]
        for hook in hooks:
            if (override := hook.valid_columns(index, keys.shape[-2])) is not None:
                columns = override
                if steps and columns.shape[1] >= steps:  # a request that ended early fills no later slots
                    decoded = valid[:, -steps:].to(columns.device)
                    columns = torch.cat([columns[:, :-steps], columns[:, -steps:] & decoded], 1)
        for b, count in enumerate(columns.sum(dim=1).tolist()):
            totals[b][index] = int(count) * per_column
    return totals


def _decode_attended(hooks: list, visual: torch.Tensor) -> list[float]:
    """Visual keys attended per layer per decode step, per request."""
    for hook in hooks:
        if (per_sample := hook.attended_per_sample()) is not None:
            return per_sample
    return [float(v) for v in visual.sum(dim=1).tolist()]


def generate(
    adapter: VLMAdapter, requests: Sequence[Request], max_new_tokens: int = 16, method: Method | None = None
) -> list[Generation]:
    """Generate answers for ``requests`` with ``method`` (default: the one attached, else none)."""
    return Pipeline(adapter, method).generate(requests, max_new_tokens=max_new_tokens)
