"""Stock ``model.generate`` with a method attached: tokcomp's stages as hooks on the stock model.

``with method(model): model.generate(**processor_inputs, **gen_kwargs)`` compresses. Attaching adds
a forward pre-hook and a forward hook to the stock VLM (and wraps its ``generate`` to record one
account per request):

* **prefill** (the call carrying ``pixel_values`` / ``pixel_values_videos``): the visual inputs are
  cut back into units, each request's image-token runs collapse to one placeholder per unit, and
  tokcomp's own encode → select → splice builds the shortened LLM input. The call then goes on
  with ``inputs_embeds``, the shortened mask and the LLM positions instead of the stock ids;
  VTU and prefill hooks (FastV) swap the attention function for this call only.
* **decode**: ``generate`` keeps the stock ids, mask and positions, so its output is the stock
  prompt plus the answer. Each step's mask is mapped onto the shortened cache and its positions
  shifted by the tokens the method removed (under VTU the cache is full length and nothing
  changes); decode hooks (DyCoke's pruning, FastV) run inside the attention function.

Per-call state lives in a ``_Call`` made for each prefill, never on the method's settings.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokcomp.assemble import Account, Assembler, Batch, Spliced, eos_token_ids
from tokcomp.errors import TokcompError
from tokcomp.methods.attention import LLMRun, use_attention
from tokcomp.methods.vtu import VTUState

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tokcomp.methods.base import Method
    from tokcomp.models.adapters import VLMAdapter

VISUAL_INPUTS = (
    "pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images",
    "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids",
)  # fmt: skip


@dataclass
class _Call:
    """One prefill of the stock model and the decode steps that follow it."""

    batch: Batch
    spliced: list[Spliced]
    use_vtu: bool
    hooks: list
    input_length: int  # the stock mask's length at prefill (decode masks grow from it)
    shift: torch.Tensor  # (B,) stock next position minus tokcomp's next position (M-RoPE: of the text row;
    # the three rotary rows keep the stock positions, so decoding continues where the stock model would)
    timings_ms: dict[str, float] = field(default_factory=dict)
    context: ExitStack = field(default_factory=ExitStack)
    started: float = 0.0
    prefill_done: bool = False
    from_pipeline: bool = False  # built by tokcomp's pipeline, which does its own accounting


def collapse_placeholders(
    ids: torch.Tensor, image_counts: list[int], video_counts: list[int], image_id: int, video_id: int | None,
    video_runs: list[int] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Ids with each unit's run of stock placeholder tokens cut to one placeholder, and the units' kinds
    in order; ``image_counts``/``video_counts`` give each unit's stock token count, in order, and
    ``video_runs`` in how many equal runs a video's tokens come (Qwen3-VL: one per frame group, with text
    between them; each run becomes one placeholder)."""
    out, kinds, i = [], [], 0
    images, videos = list(image_counts), list(video_counts)
    runs = list(video_runs) if video_runs is not None else [1] * len(videos)
    values = ids.tolist()
    left, per_run = 0, 0  # runs of the current video still to come, and tokens per run
    while i < len(values):
        token = values[i]
        if token == image_id or (video_id is not None and token == video_id):
            kind = "image" if token == image_id else "video"
            if kind == "video" and left:
                count, left = per_run, left - 1
            else:
                pending = images if kind == "image" else videos
                if not pending:
                    raise TokcompError(f"the input ids hold more {kind} tokens than the {kind}s given")
                count = pending.pop(0)
                if kind == "video":
                    parts = runs.pop(0)
                    count, left, per_run = count // parts, parts - 1, count // parts
                kinds.append(kind)
            if values[i : i + count] != [token] * count:
                raise TokcompError(f"an {kind} needs {count} consecutive {kind} tokens in the input ids")
            out.append(token)
            i += count
        else:
            out.append(token)
            i += 1
    if images or videos or left:
        raise TokcompError("the input ids hold fewer image/video tokens than the images and videos given")
    return torch.tensor(out, dtype=ids.dtype), kinds


class StockBridge:
    """The hooks that make stock ``generate`` (and forward) run the attached method."""

    def __init__(self, adapter: VLMAdapter, method: Method) -> None:
        self.adapter = adapter
        self.method = method
        self.pipe = Assembler(adapter, method)
        self.call: _Call | None = None
        self.calls: list[_Call] = []
        self.prepared: _Call | None = None  # a batch the pipeline built, waiting for its prefill
        self.last_call: _Call | None = None

    # --- prefill ----------------------------------------------------------------------------
    def _prefill(self, kwargs: dict) -> dict:
        adapter, pipe, method = self.adapter, self.pipe, self.method
        t0 = time.perf_counter()
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise TokcompError(f"{method.name}: a compressed prefill needs input_ids with the stock placeholders")
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        rows = [input_ids[b][valid[b]].cpu() for b in range(input_ids.shape[0])]
        units = adapter.units_from_inputs(rows, kwargs)
        collapsed, kinds = [], []
        for ids, (images, videos) in zip(rows, units, strict=True):
            row_ids, row_kinds = collapse_placeholders(
                ids, [n for _, n in images], [n for _, n in videos], adapter.image_token_id, adapter.video_token_id,
                [adapter.placeholder_runs("video", u.grid_thw[0] if u.grid_thw else 0) for u, _ in videos],
            )
            collapsed.append(row_ids)
            kinds.append(row_kinds)
        ordered = [_in_order(k, images, videos) for k, (images, videos) in zip(kinds, units, strict=True)]
        pipe._check_inputs(kinds)
        t_pre = time.perf_counter()
        encoded = pipe.tokens_of([[u for u, _ in row] for row in ordered])
        t_enc = time.perf_counter()
        tokens, records = [], [{} for _ in rows]  # records: what the selection decided, per request
        for ids, row_kinds, row_tokens, row, record in zip(collapsed, kinds, encoded, ordered, records, strict=True):
            for unit_tokens, (_, count), kind in zip(row_tokens, row, row_kinds, strict=True):
                if unit_tokens.original != count:
                    raise TokcompError(f"an {kind} gives {unit_tokens.original} tokens; the input ids hold {count}")
            tokens.append(pipe.select_ids(ids, row_kinds, row_tokens, record))
        t_sel = time.perf_counter()
        spliced = [pipe.splice_ids(i, t, k) for i, t, k in zip(collapsed, tokens, kinds, strict=True)]
        for one, record in zip(spliced, records, strict=True):
            one.account.selection = record
        batch = pipe.collate(spliced)
        use_vtu = method.uses_vtu and not all(s.is_identity for s in spliced)
        stock_next = valid.long().sum(dim=1)
        ours_next = batch.full_lengths if use_vtu else batch.positions[:, -1] + 1
        call = _Call(batch, spliced, use_vtu, [], input_ids.shape[1], (stock_next - ours_next).to(input_ids.device))
        call.timings_ms = {"preprocess": 1000 * (t_pre - t0), "vision": 1000 * (t_enc - t_pre),
                           "select": 1000 * (t_sel - t_enc)}  # fmt: skip
        return self._start(call, kwargs)

    def prepare(self, batch: Batch, spliced: list[Spliced], use_vtu: bool) -> None:
        """Hand over a batch tokcomp's pipeline built itself: the next ``generate(inputs_embeds=...)`` is
        its prefill (the pipeline passes the mask and positions decoding continues from)."""
        width = batch.full_valid.shape[1] if use_vtu else batch.embeds.shape[1]
        shift = torch.zeros(batch.embeds.shape[0], dtype=torch.long, device=batch.embeds.device)
        self.prepared = _Call(batch, list(spliced), use_vtu, [], width, shift, from_pipeline=True)

    def _start(self, call: _Call, kwargs: dict) -> dict:
        """The prefill's inputs for the stock forward, with the attention function this call needs."""
        adapter, method, batch, use_vtu = self.adapter, self.method, call.batch, call.use_vtu
        lm = adapter.language_model
        hooks = method.attention_hooks(batch.visual_full if use_vtu else batch.visual_unique, kwargs.get("cache"))
        call.hooks = hooks
        prefill_hooks = [h for h in hooks if h.active_in_prefill]
        if len(hooks) > 1 and any(h.cuts_sequence for h in hooks):
            raise TokcompError(f"{method.label}: a method that cuts the sequence inside the LLM (fastv, dart, "
                               "pyramiddrop) cannot be combined with other LLM-side methods yet")  # fmt: skip
        if use_vtu and any(not h.keeps_everything for h in prefill_hooks):  # keeping everything prunes nothing
            raise TokcompError(f"{method.name}: VTU cannot be combined with pruning inside the prefill")
        if use_vtu and batch.deepstack is not None:
            raise TokcompError(f"{method.name}: VTU is not supported on DeepStack models (Qwen3-VL) yet: the "
                               "LLM adds each position's own encoder features to its hidden state")  # fmt: skip
        if batch.deepstack is not None and batch.deepstack.shape[1]:
            cut = next((h for h in prefill_hooks if h.cuts_sequence), None)
            call.context.enter_context(add_deepstack(lm, batch.visual_unique, batch.deepstack, cut))
        if use_vtu:
            state = VTUState(
                mapping=batch.mapping, full_valid=batch.full_valid, positions=batch.full_positions,
                num_unique=batch.embeds.shape[1], cache=kwargs.get("cache"), rotary=lm.rotary_emb,
                rope_positions=batch.rope,
            )  # fmt: skip
            call.context.enter_context(use_attention(lm, LLMRun(vtu=state)))
            positions = torch.zeros(batch.embeds.shape[:2], dtype=torch.long, device=batch.embeds.device)
        else:
            if prefill_hooks:
                run = LLMRun(hooks=prefill_hooks, prefill_valid=batch.unique_valid)
                call.context.enter_context(use_attention(lm, run))
                for hook in prefill_hooks:
                    call.context.enter_context(hook.attach(lm))
            positions = batch.position_ids()
        self.call = call
        self.calls.append(call)
        call.started = time.perf_counter()
        new = {k: v for k, v in kwargs.items() if k not in VISUAL_INPUTS}
        new.update(input_ids=None, inputs_embeds=batch.embeds, attention_mask=batch.unique_valid.long(),
                   position_ids=positions)  # fmt: skip
        return new

    # --- decode -----------------------------------------------------------------------------
    def _decode(self, kwargs: dict) -> dict:
        call = self.call
        if call.use_vtu:  # the cache is full length: the stock mask and positions are right as they are
            return kwargs
        new = dict(kwargs)
        kept = call.batch.unique_valid.long()
        steps = _cache_length(kwargs) - kept.shape[1] + 1  # generated tokens so far, this one included
        if steps < 1 or (kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[0] != kept.shape[0]):
            raise TokcompError(f"{self.method.name}: the decode inputs do not follow the compressed prefill")
        new["attention_mask"] = torch.cat([kept, kept.new_ones(kept.shape[0], steps)], dim=1)
        if (stock := kwargs.get("position_ids")) is not None:
            shift = call.shift.to(stock.device)
            if stock.ndim == 3:  # M-RoPE (text row first when there are four): only the text row moves
                shifted = stock.clone()
                if stock.shape[0] == 4:
                    shifted[0] = stock[0] - shift[:, None]
                new["position_ids"] = shifted
            else:
                new["position_ids"] = stock - shift[:, None]
        if call.hooks:
            fed = kwargs.get("input_ids")
            active = (
                ~torch.isin(fed[:, -1], self._finished_ids().to(fed.device))
                if fed is not None
                else torch.ones(kept.shape[0], dtype=torch.bool, device=kept.device)
            )
            for hook in call.hooks:
                hook.start_step(active.to(kept.device))
            run = LLMRun(hooks=call.hooks, key_valid=new["attention_mask"].bool())
            call.context.enter_context(use_attention(self.adapter.language_model, run))
        return new

    def _finished_ids(self) -> torch.Tensor:
        """Tokens generate feeds a sequence that has ended (its EOS, then padding)."""
        config = self.adapter.model.generation_config
        ids = eos_token_ids(config)
        if config.pad_token_id is not None:
            ids.append(config.pad_token_id)
        return torch.tensor(ids or [-1], dtype=torch.long)

    # --- hooks ------------------------------------------------------------------------------
    def pre(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            raise TokcompError(f"{self.method.name}: call the model with keyword arguments (as generate does)")
        if self.prepared is not None and kwargs.get("inputs_embeds") is not None:
            call, self.prepared = self.prepared, None
            return args, self._start(call, kwargs)
        if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
            return args, self._prefill(kwargs)
        if self.call is not None and kwargs.get("inputs_embeds") is None and _cache_length(kwargs) > 0:
            return args, self._decode(kwargs)
        self.call = None  # a text-only call: the stock model as it is
        return args, kwargs

    def post(self, module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self.call
        if call is None:
            return
        call.context.close()
        if not call.prefill_done:
            call.prefill_done = True
            if call.batch.embeds.device.type == "cuda":
                torch.cuda.synchronize(call.batch.embeds.device)
            call.timings_ms["prefill"] = 1000 * (time.perf_counter() - call.started)

    # --- generate ---------------------------------------------------------------------------
    def generate(self, original, *args, **kwargs):
        """Stock generate, then one account per request of the call on ``method.accounts``."""
        config = kwargs.get("generation_config") or self.adapter.model.generation_config
        beams = int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1)
        if beams > 1 and not self.method.supports_beam_search:
            raise TokcompError(f"method '{self.method.label}' keeps per-sequence decode state: beam search "
                               "is not supported (use greedy or sampling)")  # fmt: skip
        returns = int(kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1)
        first = len(self.calls)
        model = self.adapter.model
        # transformers 5.2x runs the vision encoder inside generate, before the first forward, and hands
        # the forward its features; tokcomp's prefill needs the pixels (its encoder stages run on them).
        pre_encodes = hasattr(model, "_supports_mm_encoder_outputs")
        if pre_encodes:
            model._supports_mm_encoder_outputs = lambda: False
        try:
            output = original(*args, **kwargs)
        finally:
            if pre_encodes:
                del model._supports_mm_encoder_outputs
        calls = self.calls[first:]
        self.last_call = calls[0] if calls else None
        if calls and not calls[0].from_pipeline:
            self.method.accounts = self._accounts(calls[0], max(beams, returns))
        self.call = None
        del self.calls[first:]
        return output

    def _accounts(self, call: _Call, expand: int) -> list[Account]:
        self.method.finish(call.hooks)
        accounts = []
        for b in range(0, len(call.spliced), expand):
            account = call.spliced[b].account
            account.methods = self.method.report(call.hooks, b, account)
            account.timings_ms = dict(call.timings_ms)
            accounts.append(account)
        return accounts


@contextmanager
def add_deepstack(language_model, visual: torch.Tensor, features: torch.Tensor, cut=None) -> Iterator[None]:
    """For the call in the block, what the stock DeepStack LLM does with pixels: after each of its first
    ``len(features)`` layers, the visual entries' own encoder features (``features``: (levels, entries, H),
    the entries of ``visual`` (B, L) in row-major order) added to their hidden states. Done here, on the
    layers' outputs before any cut, because a compressed prefill passes embeddings, not pixels; after a
    cut inside the LLM (``cut``: FastV, DART, PyramidDrop) only the visual entries still in the sequence
    get theirs."""
    entry = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
    entry[visual] = torch.arange(int(visual.sum()), device=visual.device)

    def add(level: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            index = entry if cut is None or cut.order is None else entry.gather(1, cut.order.to(entry.device))
            where = index >= 0
            if cut is not None and cut.real is not None:
                where &= cut.real.to(where.device)
            hidden = hidden.clone()
            hidden[where] = hidden[where] + features[level][index[where]].to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    layers = language_model.layers
    handles = [layers[level].register_forward_hook(add(level)) for level in range(features.shape[0])]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _in_order(kinds: list[str], images: list, videos: list) -> list:
    images, videos = list(images), list(videos)
    return [images.pop(0) if kind == "image" else videos.pop(0) for kind in kinds]


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None else 0


@contextmanager
def attach_stock_generate(adapter: VLMAdapter, method: Method) -> Iterator[StockBridge]:
    """Hook ``method`` into the stock model's forward and generate for the block; remove everything on exit."""
    model = adapter.model
    bridge = StockBridge(adapter, method)
    handles = [
        model.register_forward_pre_hook(bridge.pre, with_kwargs=True),
        model.register_forward_hook(bridge.post, with_kwargs=True, always_call=True),
    ]
    had_own = "generate" in model.__dict__
    previous = model.__dict__.get("generate")
    original = model.generate

    def generate(*args, **kwargs):
        return bridge.generate(original, *args, **kwargs)

    model.generate = generate
    adapter.bridge = bridge
    try:
        yield bridge
    finally:
        adapter.bridge = None
        for handle in handles:
            handle.remove()
        if had_own:
            model.generate = previous
        else:
            del model.generate
