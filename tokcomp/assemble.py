"""One batch's LLM input, shared by tokcomp's pipeline and by stock ``generate`` (``tokcomp.stock``).

* **encode**: the units' encoder views through the stock vision tower (with the method's merging and
  trace hooks, if any) and the stock projector.
* **select**: the method's pre-LLM selection over each request's units, given its prompt's text.
* **splice**: token ids with one placeholder per unit; text embeddings from the stock table, the
  visual tokens put in place. The LLM receives the *unique* sequence; ``mapping`` sends every
  full-length position to its unique token (DyMU's ``M``).
* **collate**: left-padded, with the positions the method keeps (stock, contiguous or VTU's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tokcomp.errors import TokcompError
from tokcomp.models.adapters import VLMAdapter
from tokcomp.models.visual import UnitTokens, select_positions

if TYPE_CHECKING:
    from tokcomp.methods.base import Method


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
    # per cut inside the LLM (FastV, DART, PyramidDrop's stages): (layer, tokens), from that layer on the
    # prefill runs without that many visual tokens
    llm_drops: tuple[tuple[int, int], ...] = ()
    methods: dict = field(default_factory=dict)  # method-specific numbers (DyCoke's retained ratio, ...)
    # what the method's pre-LLM selection recorded for this request (adaptive's plan), by method name;
    # read by its report, not written out
    selection: dict = field(default_factory=dict, repr=False, compare=False)
    timings_ms: dict = field(default_factory=dict)  # under stock generate: preprocess, vision, select, prefill


@dataclass
class Spliced:
    """One request's LLM input: unique embeddings and the full-length map (text included)."""

    embeds: torch.Tensor  # (L_un, H)
    mapping: torch.Tensor  # (L_full,)
    account: Account
    visual_unique: torch.Tensor  # (L_un,) bool: visual entries of the LLM input
    visual_full: torch.Tensor  # (L_full,) bool: visual positions of the full-length sequence
    positions: torch.Tensor  # (L_un,) position ids of the LLM input when VTU is off
    # M-RoPE families: (3, L_full) the stock 3-D positions of the sequence's positions (text and visual;
    # without VTU the LLM input itself)
    rope: torch.Tensor | None = None
    # DeepStack families: (levels, visual entries of ``embeds``, H) what the LLM adds to each visual entry
    deepstack: torch.Tensor | None = None

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
    rope: torch.Tensor | None = None  # M-RoPE families: (3, B, L_full) stock 3-D positions of every position
    # DeepStack families: (levels, visual entries, H) for the entries of ``visual_unique`` in row-major order
    deepstack: torch.Tensor | None = None

    def position_ids(self, vtu: bool = False) -> torch.Tensor:
        """The ``position_ids`` decoding continues from: (B, L) (L: the LLM input, or the full length under
        VTU), or for an M-RoPE family (4, B, L), the text positions above the three rotary rows (as stock
        generate passes them)."""
        text = self.full_positions if vtu else self.positions
        return text if self.rope is None else torch.cat([text[None], self.rope])


def once_each(unit: UnitTokens) -> UnitTokens:
    """Every merged token once, at the stock position of its first copy (merging without VTU on an M-RoPE
    family: the LLM input is the unique tokens, each at one stock 3-D position)."""
    first = torch.full((unit.kept,), unit.num_positions, dtype=torch.long, device=unit.mapping.device)
    first.scatter_reduce_(0, unit.mapping, torch.arange(unit.num_positions, device=unit.mapping.device), "amin")
    return select_positions(unit, first.sort().values)


@dataclass
class Run:
    """The part of a unit that one placeholder of the prompt takes: its unique entries and full positions
    (indices into the unit's), and the stock positions it covers (``first``, ``length``)."""

    entries: torch.Tensor
    positions: torch.Tensor
    first: int
    length: int


def unit_runs(unit: UnitTokens, count: int) -> list[Run]:
    """A unit split into ``count`` runs of consecutive frames (one run: the whole unit). A position goes to
    its stock frame's run, an entry to the run of its first position; entries stay in order."""
    positions = unit.positions.cpu()
    if count == 1:
        return [Run(torch.arange(unit.kept), torch.arange(unit.num_positions), 0, unit.original)]
    per_run = unit.frame_tokens
    run_of_position = (positions // per_run).clamp(max=count - 1)
    mapping = unit.mapping.cpu()
    first = torch.full((unit.kept,), unit.num_positions, dtype=torch.long)
    first.scatter_reduce_(0, mapping, torch.arange(unit.num_positions), "amin")
    run_of_entry = run_of_position[first]
    if bool((run_of_entry.diff() < 0).any()):
        raise TokcompError("a unit's entries are not in frame order")
    return [Run((run_of_entry == r).nonzero().flatten(), (run_of_position == r).nonzero().flatten(), r * per_run,
                per_run) for r in range(count)]  # fmt: skip


def text_token_ids(adapter: VLMAdapter, ids: torch.Tensor) -> torch.Tensor:
    """A prompt's token ids without its image/video placeholders: its text as the LLM reads it."""
    placeholders = [t for t in (adapter.image_token_id, adapter.video_token_id) if t is not None]
    return ids[~torch.isin(ids, torch.tensor(placeholders, dtype=ids.dtype, device=ids.device))]


def eos_token_ids(generation_config) -> list[int]:
    """The ids that end a sequence, as a list (generation configs hold one id, a list, or none)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


class Assembler:
    """Builds the LLM input of a batch for a loaded VLM and a method."""

    def __init__(self, adapter: VLMAdapter, method: Method) -> None:
        self.adapter = adapter
        self.method = method

    @property
    def device(self) -> torch.device:
        return next(self.adapter.model.parameters()).device

    @torch.no_grad()
    def tokens_of(self, units: list[list]) -> list[list[UnitTokens]]:
        """Per request, per visual unit (already preprocessed): the tokens the LLM receives, before any
        pre-LLM selection (with the encoder trace on each, if the method reads one)."""
        adapter = self.adapter
        merging = adapter.merging is not None and self.method.encoder_rule(adapter) is not None
        trace = adapter.trace  # the encoder trace the method reads, if any: each unit gets it per position
        if trace is not None:
            trace.take()  # nothing traced before this call
        if not merging or adapter.merges_in_stock_features:
            out = []
            for req in units:
                tokens = adapter.stock_unit_tokens(req)
                if trace is not None:
                    adapter.add_trace(req, tokens, trace.take(), stock=True)
                if merging and adapter.uses_mrope and not self.method.uses_vtu:
                    tokens = [once_each(t) for t in tokens]
                out.append(tokens)
            return out
        views = torch.cat([u.views for req in units for u in req]) if any(units) else None
        encoded = adapter.encode(views.to(self.device), project=True) if views is not None else []
        traced = trace.take() if trace is not None else []
        out, cursor = [], 0
        for req in units:
            tokens, start = [], cursor
            for unit in req:
                n = unit.views.shape[0]
                tokens.append(adapter.merged_unit_tokens(unit, encoded[cursor : cursor + n]))
                cursor += n
            if trace is not None:
                adapter.add_trace(req, tokens, traced[start:cursor], stock=False)
            out.append(tokens)
        return out

    def select_ids(
        self, ids: torch.Tensor, kinds: list[str], tokens: list[UnitTokens], record: dict | None = None
    ) -> list[UnitTokens]:
        """The selection given the prompt's token ids: text-aware methods read the embeddings of its text
        tokens as the LLM receives them (the chat template's words included, placeholders left out)."""
        adapter = self.adapter
        text = adapter.embed_tokens(text_token_ids(adapter, ids).to(self.device))
        return self.method.select_request(adapter, kinds, tokens, text, record)

    # --- splice ------------------------------------------------------------------------------
    def splice_ids(self, ids: torch.Tensor, units: list[UnitTokens], unit_kinds: list[str]) -> Spliced:
        """The LLM input of token ids holding one placeholder per visual unit (per run of a unit the stock
        prompt splits, Qwen3-VL's video frame groups), with the units put in place."""
        adapter = self.adapter
        placeholder_ids = {adapter.image_token_id: "image"}
        if adapter.video_token_id is not None:
            placeholder_ids[adapter.video_token_id] = "video"
        slots = [i for i, t in enumerate(ids.tolist()) if t in placeholder_ids]
        kinds = [placeholder_ids[int(ids[i])] for i in slots]
        layouts = [unit_runs(u, adapter.placeholder_runs(k, u.num_frames)) for u, k in zip(units, unit_kinds,
                                                                                            strict=True)]  # fmt: skip
        if kinds != [k for k, runs in zip(unit_kinds, layouts, strict=True) for _ in runs]:
            raise TokcompError(f"the prompt has placeholders {kinds} but the request has {unit_kinds}")
        slot_runs = [(i, r) for i, runs in enumerate(layouts) for r in range(len(runs))]
        text_embeds = adapter.embed_tokens(ids.to(self.device))
        # where each unit's unique entries land in the spliced sequence (a run's full positions may use an
        # entry of another run: a merge across frame groups)
        entry_index = [torch.empty(u.kept, dtype=torch.long) for u in units]
        offset, start = 0, 0
        for slot, (i, r) in zip(slots, slot_runs, strict=True):
            offset += slot - start
            entries = layouts[i][r].entries
            entry_index[i][entries] = torch.arange(entries.numel()) + offset
            offset, start = offset + entries.numel(), slot + 1
        pieces, maps, vis_un, vis_full = [], [], [], []
        offset, start = 0, 0
        for slot, where in zip([*slots, len(ids)], [*slot_runs, None], strict=True):
            n_text = slot - start
            pieces.append(text_embeds[start:slot])
            maps.append(torch.arange(n_text, device=self.device) + offset)
            vis_un.append(torch.zeros(n_text, dtype=torch.bool))
            vis_full.append(torch.zeros(n_text, dtype=torch.bool))
            offset += n_text
            if where is not None:
                unit, run = units[where[0]], layouts[where[0]][where[1]]
                pieces.append(unit.unique[run.entries.to(unit.unique.device)].to(text_embeds.dtype))
                maps.append(entry_index[where[0]][unit.mapping.cpu()[run.positions]].to(self.device))
                vis_un.append(torch.ones(run.entries.numel(), dtype=torch.bool))
                vis_full.append(torch.ones(run.positions.numel(), dtype=torch.bool))
                offset += run.entries.numel()
            start = slot + 1
        embeds = torch.cat(pieces)
        mapping = torch.cat(maps)
        per_image = [
            {
                "kind": kind,
                "full": u.original,
                "kept": u.kept,
                "positions": u.num_positions,
                "views": u.views,
                "per_layer": u.layer_counts,
            }
            for kind, u in zip(unit_kinds, units, strict=True)
        ]
        per_layer = [sum(c) for c in zip(*(u.layer_counts for u in units), strict=True)] if units else []
        account = Account(
            visual_full=sum(u.original for u in units),
            visual_kept=sum(u.kept for u in units),
            visual_positions=sum(u.num_positions for u in units),
            per_image=per_image,
            per_layer=per_layer,
            prompt_tokens_full=int(mapping.shape[0])
            - sum(u.num_positions for u in units)
            + sum(u.original for u in units),
            prompt_tokens_kept=int(embeds.shape[0]),
        )
        dev = self.device
        placed = [(units[i], layouts[i][r]) for i, r in slot_runs]
        positions = self._llm_positions(len(ids), slots, placed, embeds.shape[0])
        rope = self._rope_positions(len(ids), slots, placed) if adapter.uses_mrope else None
        return Spliced(
            embeds, mapping, account, torch.cat(vis_un).to(dev), torch.cat(vis_full).to(dev), positions.to(dev),
            None if rope is None else rope.to(dev), self._deepstack(units, embeds),
        )  # fmt: skip

    def _deepstack(self, units: list[UnitTokens], embeds: torch.Tensor) -> torch.Tensor | None:
        """(levels, visual entries, H): the units' DeepStack features in splice order (DeepStack families)."""
        levels = self.adapter.deepstack_levels
        if not levels:
            return None
        missing = [u for u in units if u.deepstack is None or u.deepstack.shape[0] != levels]
        if missing:
            raise TokcompError(f"method '{self.method.label}' does not carry the DeepStack features this model needs")
        if not units:
            return embeds.new_zeros(levels, 0, embeds.shape[-1])
        return torch.cat([u.deepstack.to(embeds.device, embeds.dtype) for u in units], dim=1)

    def _llm_positions(self, num_ids: int, slots: list[int], placed: list[tuple[UnitTokens, Run]],
                       length: int) -> torch.Tensor:  # fmt: skip
        """Position ids of the LLM input without VTU: the stock sequence's own positions for methods that
        keep them (pruning), else contiguous (merging ablations, DyCoke's TTM)."""
        if not self.method.keeps_positions or any(u.kept != u.num_positions for u, _ in placed):
            return torch.arange(length)
        pieces, stock, start = [], 0, 0
        for slot, where in zip([*slots, num_ids], [*placed, None], strict=True):
            pieces.append(torch.arange(stock, stock + slot - start))
            stock += slot - start
            if where is not None:
                unit, run = where
                pieces.append(stock + unit.positions.cpu()[run.positions] - run.first)
                stock += run.length
            start = slot + 1
        return torch.cat(pieces)

    def _rope_positions(self, num_ids: int, slots: list[int], placed: list[tuple[UnitTokens, Run]]) -> torch.Tensor:
        """(3, L_full): M-RoPE positions as the stock model counts them (text one step at a time on all
        three rows, a unit (or each run of it) at its stock 3-D positions, the text after it moved on by its
        span), each kept visual entry at its own stock position (a merged entry at its first position's)."""
        pieces, current, start = [], 0, 0
        for slot, where in zip([*slots, num_ids], [*placed, None], strict=True):
            text = slot - start
            pieces.append(torch.arange(current, current + text).expand(3, -1))
            current += text
            if where is not None:
                unit, run = where
                if unit.rope is None:
                    raise TokcompError("an M-RoPE model's visual unit has no stock 3-D positions")
                pieces.append(current + unit.rope[:, unit.positions.cpu()[run.positions]])
                current += unit.rope_span
            start = slot + 1
        return torch.cat(pieces, dim=1)

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
        mrope = spliced[0].rope is not None
        rope = torch.ones(3, bsz, l_full, dtype=torch.long, device=dev) if mrope else None
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
            if rope is not None:
                rope[:, b, pad_full:] = s.rope
        deepstack = None if spliced[0].deepstack is None else torch.cat([s.deepstack for s in spliced], dim=1)
        return Batch(
            embeds, unique_valid, mapping, full_valid, positions,
            torch.tensor([s.mapping.shape[0] for s in spliced], device=dev),
            torch.tensor([s.embeds.shape[0] for s in spliced], device=dev),
            visual_unique, visual_full, llm_positions, rope, deepstack,
        )  # fmt: skip

    def _check_inputs(self, kinds: list[list[str]]) -> None:
        """A method that acts on none of a request's inputs (DyCoke on images) is a user error."""
        label = self.method.label
        for request_kinds in kinds:
            if request_kinds and not set(request_kinds) & self.method.inputs:
                raise TokcompError(
                    f"method '{label}' works on {' and '.join(sorted(self.method.inputs))} input; "
                    f"this request has only {' and '.join(sorted(set(request_kinds)))}"
                )
