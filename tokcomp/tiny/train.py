"""Train tokcomp-tiny from scratch on the task generators (CPU, seeded), then evaluate and save it.

The LLM input of a training example is built exactly as inference builds it: the adapter's own
preprocessing (``prepare_units``), the stock vision tower, projector, AnyRes packing and frame
pooling, and ``Pipeline.splice`` for the prompt (the chat template stored in the tokenizer). Only the
vision tower runs batched over all views of a batch. The loss covers the answer tokens and EOS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tokcomp.assemble import text_token_ids
from tokcomp.data.tasks import COLORS, KINDS, LABEL_WORDS, ORDINALS, SHAPES, TASKS, Item, make_item
from tokcomp.errors import TokcompError
from tokcomp.models.adapters import LlavaOnevisionAdapter
from tokcomp.models.visual import identity_tokens
from tokcomp.pipeline import Pipeline, Request
from tokcomp.resources import REPO_ROOT
from tokcomp.tiny.model import (
    SPECS,
    TEST_SPEC,
    TINY_SPEC,
    build_image_processor,
    build_model,
    build_tokenizer,
    save_checkpoint,
)

DEFAULT_OUT = REPO_ROOT / "checkpoints" / "tokcomp-tiny"  # the checkout's, which setup.py ships
# Items per training batch (one task per batch): video and multi-image items cost more encoder views.
BATCH_SIZES = {"tc_shapes": 16, "tc_text": 16, "tc_multi": 8, "tc_motion": 4}
# How often each task's batch comes up in the rotation.
TASK_WEIGHTS = {"tc_shapes": 3, "tc_text": 5, "tc_multi": 2, "tc_motion": 2}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_schedule(weights: dict[str, int]) -> list[str]:
    """One rotation of tasks, interleaved (a, b, a, c, ...) rather than in blocks."""
    slots = [(k / w, task) for task, w in weights.items() if w > 0 for k in range(w)]
    return [task for _, task in sorted(slots)]


def rotation_at(step: int, weights: dict[str, int], starts: dict[str, int]) -> list[str]:
    """The rotation at answer step ``step``: the tasks whose start step (``starts``, default 0) it has reached."""
    return task_schedule({task: w for task, w in weights.items() if starts.get(task, 0) <= step})


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _unit_features(adapter: LlavaOnevisionAdapter, units_per_item: list[list]) -> list[list[torch.Tensor]]:
    """Stock LLM tokens of every unit, with the vision tower run once over the batch's distinct views."""
    return _encode_batch(adapter, units_per_item)[0]


def _encode_batch(
    adapter: LlavaOnevisionAdapter, units_per_item: list[list]
) -> tuple[list[list[torch.Tensor]], torch.Tensor, list[int]]:
    """Unit features, the projected encoder output of every view run, and the rows of the pictures.

    The rows give, per image (its base view) or video frame, in order, where its hidden states are:
    the views that per-patch labels describe.
    """
    model = adapter.model.model
    views, slices, picture_rows, start = [], [], [], 0
    for units in units_per_item:
        for u in units:
            v = u.views
            shared = u.anyres and v.shape[0] == 2 and torch.equal(v[0], v[1])  # the crop is the base view
            views.append(v[:1] if shared else v)
            slices.append((start, v.shape[0], shared))
            picture_rows += list(range(start, start + v.shape[0])) if u.kind == "video" else [start]
            start += views[-1].shape[0]
    hidden = model.vision_tower(torch.cat(views), output_hidden_states=True).hidden_states[-1]
    projected = model.multi_modal_projector(hidden)
    out, k = [], 0
    for units in units_per_item:
        feats = []
        for u in units:
            start, n, shared = slices[k]
            k += 1
            f = projected[start : start + 1].expand(2, -1, -1) if shared else projected[start : start + n]
            if u.kind == "video":
                pooled = model.apply_pooling(f).flatten(0, 1)
                feats.append(torch.cat([pooled, model.image_newline[None].to(pooled)]))
            else:
                size = torch.tensor([u.image_size])
                feats.append(model.pack_image_features([f], size, image_newline=model.image_newline)[0][0])
        out.append(feats)
    return out, projected, picture_rows


# Label groups scored on the patches that show something (most patches are empty background).
FOREGROUND_ONLY = ("color", "shape", "char", "ordinal")


class PatchWords:
    """Per-patch labels as words: what the LLM reads at each patch should point at the words naming it.

    Every label group (colour, shape, character, its place in the string, object count, which half
    of the picture) scores the projected patch features against the tied word embeddings of its
    class words, and the loss is the cross-entropy among them. So the encoder learns to see from a
    dense signal, and its tokens arrive in the LLM already near the words that ask for them and the
    words that answer: looking up "the square" and copying out "red" start out easy.
    """

    def __init__(self, tokenizer, cosine_scale: float = 0.0, rms_ratio: float = 0.0):
        # cosine_scale > 0: logits are that times the cosine (the features' norm left to the anchor);
        # rms_ratio > 0: a penalty holds the features' RMS at that many times the word embeddings'.
        self.cosine_scale, self.rms_ratio = cosine_scale, rms_ratio
        self.word_ids = {
            name: torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in words])
            for name, words in LABEL_WORDS.items()
        }
        unknown = [
            w for ws in LABEL_WORDS.values() for w in ws if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id
        ]
        if unknown:
            raise ValueError(f"label words missing from the vocabulary: {unknown}")

    def loss(self, projected: torch.Tensor, embeddings: torch.Tensor, labels: Sequence[dict]) -> torch.Tensor:
        """Mean cross-entropy over groups; ``projected`` is (pictures, patches, width)."""
        flat = projected.flatten(0, 1)
        total = flat.new_zeros(())
        if self.cosine_scale:
            flat, embeddings = F.normalize(flat, dim=-1) * self.cosine_scale, F.normalize(embeddings, dim=-1)
        for name, ids in self.word_ids.items():
            logits = flat @ embeddings[ids].T
            target = torch.from_numpy(np.stack([lab[name].reshape(-1) for lab in labels])).flatten()
            if name in FOREGROUND_ONLY:  # what is on an object's patches, not the many empty ones
                target = target.masked_fill(target == 0, -100)
                if bool((target == -100).all()):
                    continue
            total = total + F.cross_entropy(logits.float(), target, ignore_index=-100)
        total = total / len(self.word_ids)
        if self.rms_ratio:
            total = total + rms_anchor(projected, embeddings, self.rms_ratio)
        return total


def rms(x: torch.Tensor) -> torch.Tensor:
    """Mean over vectors of their root mean square."""
    return x.float().pow(2).mean(-1).sqrt().mean()


def rms_anchor(projected: torch.Tensor, embeddings: torch.Tensor, ratio: float) -> torch.Tensor:
    """Squared log-ratio of the visual tokens' RMS to ``ratio`` times the word embeddings' (held fixed):
    visual tokens far larger than the words leave the LLM no way to write into their positions."""
    return torch.log(rms(projected) / (ratio * rms(embeddings).detach())).pow(2)


def picture_labels(items: Sequence[Item]) -> list[dict[str, np.ndarray]]:
    """Per-patch labels of every image and frame of the items, in the order ``_encode_batch`` runs them."""
    return [lab for it in items for lab in it.labels]


def request_of(item: Item) -> Request:
    return Request(item.prompt, images=list(item.images), video=list(item.video) if item.video else None)


PROBE_ATTENTION = "tokcomp_tiny_probe"
# Question words that name what to look up (the first hop of a lookup: the answer position gathers them).
KEY_WORDS = frozenset([*COLORS, *SHAPES, *ORDINALS, "appears", "disappears"])


class AttentionProbe:
    """The language model's attention for training: stock sdpa everywhere, except chosen layers computed
    explicitly so that their attention weights can be supervised (the same math as sdpa)."""

    def __init__(self) -> None:
        self.layers: frozenset[int] = frozenset()
        self.probs: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx not in self.layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)  # fmt: skip
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        queries, length = scores.shape[-2], scores.shape[-1]
        if attention_mask is None:  # causal, the queries being the last ones
            causal = torch.ones(queries, length, dtype=torch.bool, device=scores.device).tril(length - queries)
            scores = scores.masked_fill(~causal, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
        probs = scores.float().softmax(-1)
        self.probs[module.layer_idx] = probs
        out = probs.to(value.dtype) @ value
        return out.transpose(1, 2).contiguous(), None


PROBE = AttentionProbe()
AttentionInterface.register(PROBE_ATTENTION, PROBE)
AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)


@contextmanager
def probing(adapter: LlavaOnevisionAdapter, layers: Sequence[int]) -> Iterator[None]:
    """Inside the block the language model's ``layers`` run the probe (none: nothing changes); on exit
    the probe is off and the model's own attention back."""
    if not layers:
        yield
        return
    stock = adapter.language_model.config._attn_implementation
    PROBE.layers, PROBE.probs = frozenset(layers), {}
    adapter.language_model.set_attn_implementation(PROBE_ATTENTION)
    try:
        yield
    finally:
        PROBE.layers, PROBE.probs = frozenset(), {}
        adapter.language_model.set_attn_implementation(stock)


def unit_evidence(adapter: LlavaOnevisionAdapter, unit, masks: list[np.ndarray]) -> torch.Tensor:
    """Which of a unit's LLM tokens hold evidence, from per-picture patch masks, through the stock
    layout (AnyRes packing with newlines, frame pooling): a token holds evidence if any patch it
    stands for does."""
    model = adapter.model.model
    flat = torch.from_numpy(np.stack(masks).reshape(len(masks), -1, 1)).float()  # (pictures, P, 1)
    zero = torch.zeros(1)
    if unit.kind == "video":
        pooled = model.apply_pooling(flat).flatten(0, 1)[:, 0]
        return torch.cat([pooled, zero]) > 0
    if unit.anyres:  # every view shows the whole picture (tokcomp-tiny's one pinpoint is its own size)
        views = flat.expand(unit.views.shape[0], -1, -1)
        packed = model.pack_image_features([views], torch.tensor([unit.image_size]), image_newline=zero)[0][0]
        return packed[:, 0] > 0
    return torch.cat([flat[0, :, 0], zero]) > 0


def item_evidence(adapter, item: Item, units: list, visual: torch.Tensor) -> list[torch.Tensor]:
    """Per answer step, the (L,) positions of the spliced prompt that hold the evidence for it."""
    steps = []
    for masks in item.evidence:
        pieces, k = [], 0
        for unit in units:
            n = unit.views.shape[0] if unit.kind == "video" else 1
            pieces.append(unit_evidence(adapter, unit, masks[k : k + n]))
            k += n
        row = torch.zeros(visual.shape[0], dtype=torch.bool)
        row[visual.cpu()] = torch.cat(pieces)
        steps.append(row)
    return steps


def _text_words(adapter, ids: torch.Tensor, visual: torch.Tensor) -> dict[int, str]:
    """The spliced prompt's text positions with their words (``visual`` marks the pictures' positions)."""
    words = adapter.tokenizer.convert_ids_to_tokens(text_token_ids(adapter, ids).tolist())
    return dict(zip((~visual).nonzero().flatten().tolist(), words, strict=True))


def key_positions(adapter, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(L,) bool: the spliced prompt's question words that name what to look up (``KEY_WORDS`` after
    the last picture; the pictures' own names in a multi-image prompt are not the question)."""
    last_picture = int(visual.nonzero().max()) if visual.any() else -1
    keys = torch.zeros_like(visual)
    for position, word in _text_words(adapter, ids, visual).items():
        if position > last_picture and word in KEY_WORDS:
            keys[position] = True
    return keys


def binding_pairs(adapter, ids: torch.Tensor, visual: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """In a multi-image prompt ("first <image> second <image> ..."), each picture's token positions with
    the position of the ordinal word that names it (the text token right before the picture)."""
    word_at = _text_words(adapter, ids, visual)
    edges = torch.diff(F.pad(visual.long(), (1, 1)))  # +1 where a picture starts, -1 just after it ends
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return [(torch.arange(start, end), start - 1) for start, end in zip(starts, ends, strict=True)
            if word_at.get(start - 1) in ORDINALS]  # fmt: skip


def _binding_loss(probs: torch.Tensor, targets: list[list[tuple[torch.Tensor, int]]]) -> torch.Tensor:
    """Minus the log of the attention each picture's tokens pay to the word naming the picture, in the
    first half of the heads, averaged over tokens, then pictures (zero without pictures to bind)."""
    heads = max(1, probs.shape[1] // 2)
    attention = probs[:, :heads].mean(dim=1)
    terms = [
        -torch.log(attention[b, rows, key] + 1e-6).mean() for b, pairs in enumerate(targets) for rows, key in pairs
    ]
    return torch.stack(terms).mean() if terms else probs.new_zeros(())


def _attention_loss(probs: torch.Tensor, targets: list[list[tuple[int, torch.Tensor]]]) -> torch.Tensor:
    """Minus the log of the attention mass each (query row, key mask) pays to its keys, averaged over the
    first half of the heads (the others stay free), then over the pairs (zero without pairs)."""
    heads = max(1, probs.shape[1] // 2)
    attention = probs[:, :heads].mean(dim=1)  # (B, L, L)
    terms = [
        -torch.log(attention[b, row, : where.shape[0]][where].sum() + 1e-6)
        for b, pairs in enumerate(targets)
        for row, where in pairs
        if where.any()
    ]
    return torch.stack(terms).mean() if terms else probs.new_zeros(())


def batch_loss(
    adapter: LlavaOnevisionAdapter,
    items: Sequence[Item],
    words: PatchWords | None = None,
    evidence_layer: int | None = None,
    query_layer: int | None = None,
    bind_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the answer tokens (and EOS) given the pictures and the prompt, and four
    training-only terms (zero where off): the per-patch word loss (``words``); the evidence loss, the
    attention each answer step pays in ``evidence_layer`` to the tokens holding its evidence; the
    query loss, the attention the first answer step pays in ``query_layer`` to the question's key words
    (the two hops of a lookup: gather what is asked, then find it); and the binding loss, the attention
    each picture of a multi-image prompt pays in ``bind_layer`` to the word naming it (so that its
    tokens carry "first", "second", ... to whoever reads them). The probe must be on those layers."""
    pipe = Pipeline(adapter)
    tok = adapter.tokenizer
    requests = [request_of(it) for it in items]
    units = [adapter.prepare_units(list(r.images), list(r.video) if r.video else None) for r in requests]
    features, projected, picture_rows = _encode_batch(adapter, units)
    embeddings = adapter.model.get_input_embeddings().weight
    patch_loss = (
        words.loss(projected[picture_rows], embeddings, picture_labels(items))
        if words is not None
        else projected.new_zeros(())
    )
    seqs, targets, evidence, queries, bindings = [], [], [], [], []
    for item, req, unit_list, feats in zip(items, requests, units, features, strict=True):
        tokens = [identity_tokens(f, []) for f in feats]
        ids = pipe.prompt_ids(req)
        spliced = pipe.splice_ids(ids, tokens, [u.kind for u in unit_list])
        answer = [*tok(item.target, add_special_tokens=False).input_ids, tok.eos_token_id]
        answer_ids = torch.tensor(answer)
        start = spliced.embeds.shape[0]
        pieces, spans = [spliced.embeds, adapter.embed_tokens(answer_ids)], [(start, answer_ids)]
        end = start + len(answer)
        for question, reply in item.follow_ups:
            turn = turn_ids(tok, question)
            reply_ids = torch.tensor([*tok(reply, add_special_tokens=False).input_ids, tok.eos_token_id])
            pieces += [adapter.embed_tokens(turn), adapter.embed_tokens(reply_ids)]
            spans.append((end + len(turn), reply_ids))
            end += len(turn) + len(reply_ids)
        seqs.append(torch.cat(pieces))
        targets.append(spans)
        steps = []
        if evidence_layer is not None and item.evidence:
            if len(item.evidence) != len(answer):
                raise ValueError(f"{item.task}: {len(item.evidence)} evidence steps for {len(answer)} answer tokens")
            masks = item_evidence(adapter, item, unit_list, spliced.visual_unique)
            steps = [(start - 1 + k, where) for k, where in enumerate(masks)]
        evidence.append(steps)
        queries.append([(start - 1, key_positions(adapter, ids, spliced.visual_unique))] if query_layer is not None
                       else [])  # fmt: skip
        bindings.append(binding_pairs(adapter, ids, spliced.visual_unique) if bind_layer is not None else [])
    length = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), length, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        embeds[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
    positions = torch.arange(length)[None].expand(len(seqs), -1)
    hidden = adapter.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    spans = [(b, start, ids) for b, item_spans in enumerate(targets) for start, ids in item_spans]
    rows = torch.cat([torch.full((len(ids),), b) for b, _, ids in spans])
    cols = torch.cat([torch.arange(len(ids)) + start - 1 for _, start, ids in spans])
    logits = adapter.lm_head(hidden[rows, cols])
    answer_loss = F.cross_entropy(logits.float(), torch.cat([ids for _, _, ids in spans]))
    zero = answer_loss.new_zeros(())
    evidence_loss = _attention_loss(PROBE.probs[evidence_layer], evidence) if evidence_layer is not None else zero
    query_loss = _attention_loss(PROBE.probs[query_layer], queries) if query_layer is not None else zero
    bind_loss = _binding_loss(PROBE.probs[bind_layer], bindings) if bind_layer is not None else zero
    return answer_loss, patch_loss, evidence_loss, query_loss, bind_loss


def turn_ids(tokenizer, question: str) -> torch.Tensor:
    """The tokens of one more user turn after an answer's EOS, through the chat template: "USER: ... ASSISTANT:"."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


def encoder_loss(adapter: LlavaOnevisionAdapter, items: Sequence[Item], words: PatchWords) -> torch.Tensor:
    """Per-patch word loss of the encoder and projector alone on every image and frame of the items."""
    model = adapter.model.model
    units = [adapter.prepare_units(list(it.images), list(it.video) if it.video else None) for it in items]
    views = torch.cat([u.views if u.kind == "video" else u.views[:1] for us in units for u in us])
    hidden = model.vision_tower(views, output_hidden_states=True).hidden_states[-1]
    projected = model.multi_modal_projector(hidden)
    return words.loss(projected, adapter.model.get_input_embeddings().weight, picture_labels(items))


LANGUAGE_MODEL_PREFIX = "model.language_model."
WORD_EMBEDDINGS = "model.language_model.embed_tokens.weight"


def seed_from_state(adapter: LlavaOnevisionAdapter, path: str | Path, patch_rms: float, log=print) -> dict:
    """Take the seeing half of another run's state (vision tower, projector, image newline, word
    embeddings) into ``adapter``'s model, whose language model stays freshly initialised; with
    ``patch_rms`` the projector's output (and the image newline) is rescaled to that many times the word
    embeddings' RMS. Returns the source's time and runs, and a record of what was taken."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init-from: {path} does not exist")
    source = torch.load(path, weights_only=False)
    model = adapter.model
    seeing = {k: v for k, v in source["model"].items()
              if not k.startswith(LANGUAGE_MODEL_PREFIX) or k == WORD_EMBEDDINGS}  # fmt: skip
    if "lm_head.weight" in source["model"] and model.config.tie_word_embeddings:
        seeing.pop("lm_head.weight", None)
    missing = [k for k in seeing if k not in model.state_dict()]
    if missing:
        raise TokcompError(f"--init-from: {path} does not fit this model's sizes ({missing[0]} unknown)")
    model.load_state_dict(seeing, strict=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    record = {"state": path.name, "sha256": digest, "from": f"{source['stage']}:{source['step']}",
              "kept": "vision tower, projector, image newline, word embeddings"}  # fmt: skip
    if patch_rms:
        factor = rescale_projector(adapter, patch_rms)
        record["projector_scaled_by"] = round(factor, 6)
        log(f"projector output rescaled by {factor:.4f} to {patch_rms} x the word embeddings' RMS")
    return {"record": record, "cpu_seconds": source["cpu_seconds"], "wall_seconds": source["wall_seconds"],
            "runs": source["runs"]}  # fmt: skip


def rescale_projector(adapter: LlavaOnevisionAdapter, ratio: float, probe_items: int = 8) -> float:
    """Scale the projector's last layer (and the image newline) so that the visual tokens' RMS on a few
    training scenes is ``ratio`` times the word embeddings'; returns the factor."""
    model = adapter.model.model
    items = [make_item("tc_shapes", "train", i) for i in range(probe_items)]
    units = [adapter.prepare_units(list(it.images), None) for it in items]
    with torch.no_grad():
        projected = _encode_batch(adapter, units)[1]
        factor = float(ratio * rms(adapter.model.get_input_embeddings().weight) / rms(projected))
        projector = model.multi_modal_projector
        projector.linear_2.weight.mul_(factor)
        projector.linear_2.bias.mul_(factor)
        model.image_newline.mul_(factor)
    return factor


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


STATE_FILE = "state.pt"
# The defaults of the settings the command line may leave out (and of those a state older than them lacks).
DEFAULTS = {
    "steps": 5000, "lr": 2e-3, "patch_weight": 0.5, "evidence_weight": 0.0, "query_weight": 0.0, "query_layer": 1,
    "curriculum_steps": 0, "bind_weight": 0.0, "bind_layer": 0, "kind_weights": {},
    "task_weights": {}, "task_start": {}, "follow_ups": 0, "patch_cosine": 0.0, "patch_rms": 0.0,
}  # fmt: skip
# Settings a resumed run may change (the loss weights, the data mix, the peak learning rate of the cosine
# schedule and the length of the answer stage).
RESUME_OVERRIDES = ("steps", "lr", "evidence_weight", "query_weight", "query_layer", "patch_weight", "curriculum_steps",
                    "bind_weight", "bind_layer", "kind_weights", "task_weights", "task_start", "follow_ups",
                    "patch_cosine", "patch_rms")  # fmt: skip
STAGES = ("encoder", "answer")


def state_dir_for(out_dir: str | Path) -> Path:
    """Where a run keeps its resumable state: beside the checkpoint folder (``<out>.train/``)."""
    out = Path(out_dir)
    return out.parent / f"{out.name}.train"


def _save_state(path: Path, state: dict) -> None:
    """Write the resumable state atomically (a killed run leaves the previous state intact).

    The optimizer's moment estimates are stored in bfloat16 (the optimizer casts them back to the
    parameters' float32 on resume): a third smaller, so a run in progress can travel with the checkout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "optimizer": _compact_optimizer(state["optimizer"])} if "optimizer" in state else state, tmp)
    tmp.replace(path)


def _compact_optimizer(optimizer_state: dict) -> dict:
    """An optimizer state dict with its floating-point per-parameter tensors (not the step) in bfloat16."""
    def compact(value):
        is_moment = isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim > 0
        return value.to(torch.bfloat16) if is_moment else value

    states = {key: {name: compact(v) for name, v in entry.items()} for key, entry in optimizer_state["state"].items()}
    return {**optimizer_state, "state": states}


def _validation_accuracy(adapter, items_per_task: int, seed: int) -> dict[str, float]:
    """Accuracy on the "val" split (never the eval split), for the training curve."""
    from tokcomp.data.tasks import generate
    from tokcomp.tiny.evaluate import answer_items, score

    was_training, probed = adapter.model.training, PROBE.layers
    adapter.model.eval()
    PROBE.layers = frozenset()  # every layer on sdpa while answering
    out = {}
    try:
        with torch.no_grad():
            for task in TASKS:
                items = generate(task, "val", items_per_task, seed)
                out[task] = score(items, answer_items(adapter, items))["accuracy"]
    finally:
        adapter.model.train(was_training)
        PROBE.layers = probed
    return out


def train(
    out_dir: str | Path,
    steps: int,
    seed: int = 0,
    lr: float = 2e-3,
    warmup: int = 100,
    spec: dict | None = None,
    batch_scale: float = 1.0,
    encoder_steps: int = 600,
    patch_weight: float = 0.5,
    evidence_weight: float = 0.0,
    query_weight: float = 0.0,
    query_layer: int = 1,
    curriculum_steps: int = 0,
    bind_weight: float = 0.0,
    bind_layer: int = 0,
    kind_weights: dict[str, float] | None = None,
    task_weights: dict[str, int] | None = None,
    task_start: dict[str, int] | None = None,
    follow_ups: int = 0,
    patch_cosine: float = 0.0,
    patch_rms: float = 0.0,
    init_from: str | Path | None = None,
    eval_items: int = 200,
    log_every: int = 20,
    threads: int = 2,
    save_minutes: float = 5.0,
    curve_every: int = 0,
    curve_items: int = 40,
    resume: bool = False,
    stop_after_minutes: float = 0.0,
    overrides: dict | None = None,
    log=print,
) -> dict:
    """Train, evaluate on ``eval_items`` per task (0: skip) and save the checkpoint with training.json.

    First ``encoder_steps`` steps teach the encoder alone from per-patch labels; then the whole model learns to
    answer, with the per-patch loss kept at ``patch_weight`` and the evidence loss (the last layer's attention
    from each answer step onto the tokens that hold its answer) at ``evidence_weight``, and the query loss
    (layer ``query_layer``'s attention from the first answer step onto the question's key words) at
    ``query_weight``, and the binding loss (layer ``bind_layer``'s attention from each picture of a multi-image
    prompt onto the word naming it) at ``bind_weight``; ``kind_weights`` asks some question types more often and
    ``task_weights`` (over ``TASK_WEIGHTS``) gives some tasks more batches of the rotation, ``task_start`` holds
    a task out of it until that answer step (a task learnt quickly joins after the slower ones have formed);
    ``follow_ups`` asks up to that many more questions about the same pictures in the same conversation
    (tc_shapes, tc_multi). ``patch_cosine`` scores the per-patch words by cosine (times it) instead of the dot
    product and ``patch_rms`` holds the visual tokens' RMS at that many times the word embeddings'.
    ``init_from`` (a state file of another run) starts the answer stage from that run's vision tower, projector,
    image newline and word embeddings with a freshly initialised language model (with ``patch_rms``, the
    projector's output rescaled to it first); its time counts in this run's total. With ``curriculum_steps`` the
    scenes grow from the fewest objects to full difficulty over that many answer steps (counted from where the
    curriculum was switched on). Every ``save_minutes`` the whole state (weights, optimizer, data cursor,
    history, time spent) goes to ``<out>.train/state.pt``; ``resume`` continues from it with the settings it was
    started with, except ``overrides`` (any of ``RESUME_OVERRIDES``), which the run's record keeps.
    ``stop_after_minutes`` ends this run early (state saved, no checkpoint) so that a long training can span
    several runs.
    """
    from tokcomp.tiny.evaluate import evaluate_tasks

    torch.set_num_threads(threads)
    state_path = state_dir_for(out_dir) / STATE_FILE
    settings = {
        "seed": seed, "steps": steps, "lr": lr, "warmup": warmup, "spec": spec or TINY_SPEC,
        "batch_scale": batch_scale, "encoder_steps": encoder_steps, "patch_weight": patch_weight,
        "evidence_weight": evidence_weight, "query_weight": query_weight, "query_layer": query_layer,
        "curriculum_steps": curriculum_steps, "curriculum_from": 0, "bind_weight": bind_weight,
        "bind_layer": bind_layer, "kind_weights": dict(kind_weights or {}), "task_weights": dict(task_weights or {}),
        "task_start": dict(task_start or {}), "follow_ups": follow_ups, "patch_cosine": patch_cosine,
        "patch_rms": patch_rms,
    }  # fmt: skip
    saved = None
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        saved = torch.load(state_path, weights_only=False)
        settings = {**DEFAULTS, "curriculum_from": 0, **saved["settings"]}
        log(f"resuming {saved['stage']} step {saved['step']} from {state_path}")
    changed = {k: v for k, v in (overrides or {}).items() if v is not None and settings.get(k) != v}
    if changed and not resume:
        raise TokcompError("overrides apply to a resumed run only")
    unknown = sorted(set(changed) - set(RESUME_OVERRIDES))
    if unknown:
        raise TokcompError(f"cannot change {', '.join(unknown)} on resume (only {', '.join(RESUME_OVERRIDES)})")
    settings = {**settings, **changed}
    if "curriculum_steps" in changed:  # a curriculum switched on mid-run starts where the run resumes
        settings["curriculum_from"] = saved["step"] if saved["stage"] == "answer" else 0
    if changed:
        log(f"changed on resume: {changed}")
    seed_everything(settings["seed"])
    spec = settings["spec"]
    tokenizer = build_tokenizer()
    processor = build_image_processor(spec)
    model = build_model(spec, tokenizer, settings["seed"])
    if saved is not None:
        model.load_state_dict(saved["model"])
    adapter = LlavaOnevisionAdapter(model, tokenizer, processor, "tokcomp-tiny")
    source = None
    if init_from is not None and saved is None:
        source = seed_from_state(adapter, init_from, settings["patch_rms"], log)
        settings["init_from"] = source["record"]
    words = PatchWords(tokenizer, settings["patch_cosine"], settings["patch_rms"])
    evidence_layer = spec["text"]["num_hidden_layers"] - 1 if settings.get("evidence_weight", 0.0) else None
    query_layer = settings["query_layer"] if settings["query_weight"] else None
    bind_layer = settings["bind_layer"] if settings["bind_weight"] else None
    model.train()
    task_weights = {**TASK_WEIGHTS, **settings["task_weights"]}
    task_start = settings["task_start"]
    if not rotation_at(0, task_weights, task_start):
        raise TokcompError("no task trains from answer step 0: lower a --task-start or raise a --task-weight")
    progress = saved or {
        "stage": STAGES[0], "step": 0, "cursor": dict.fromkeys(TASKS, 0), "history": [], "curve": [],
        "cpu_seconds": 0.0, "wall_seconds": 0.0, "runs": [],
    }  # fmt: skip
    if source is not None:  # the encoder has learnt already: on to the answer stage, its time carried over
        progress.update(stage="answer", cpu_seconds=source["cpu_seconds"], wall_seconds=source["wall_seconds"],
                        runs=source["runs"])  # fmt: skip
    cursor = progress["cursor"]
    run_started, cpu_started = time.perf_counter(), time.process_time()
    base_wall, base_cpu = progress["wall_seconds"], progress["cpu_seconds"]
    run_record = {"machine": _machine(), "threads": threads, "from": f"{progress['stage']}:{progress['step']}"}
    if changed:
        run_record["changed"] = changed

    def spent() -> tuple[float, float]:
        return base_wall + time.perf_counter() - run_started, base_cpu + time.process_time() - cpu_started

    def this_run(to: str) -> dict:
        """This run's record for training.json: machine, threads, from where to where, its wall time."""
        return {**run_record, "to": to, "wall_seconds": round(spent()[0] - base_wall, 1)}

    def difficulty() -> float:
        if progress["stage"] != "answer" or not settings["curriculum_steps"]:
            return 1.0
        return min(1.0, max(0.0, (progress["step"] - settings["curriculum_from"]) / settings["curriculum_steps"]))

    def next_items(task: str, scale: float) -> list[Item]:
        size = max(1, round(BATCH_SIZES[task] * settings["batch_scale"] * scale))
        level = difficulty()
        kinds = settings["kind_weights"] or None
        items = [make_item(task, "train", cursor[task] + i, settings["seed"], level, kinds, settings["follow_ups"])
                 for i in range(size)]  # fmt: skip
        cursor[task] += size
        return items

    def encoder_step(task: str):
        loss = encoder_loss(adapter, next_items(task, 2.0), words)
        return loss, {f"patch/{task}": loss.item()}

    def answer_step(task: str):
        weight, evidence_weight = settings["patch_weight"], settings.get("evidence_weight", 0.0)
        items = next_items(task, 1.0)
        answer, patch, evidence, query, bind = batch_loss(adapter, items, words if weight else None, evidence_layer,
                                                          query_layer, bind_layer)  # fmt: skip
        loss = answer + weight * patch + evidence_weight * evidence + settings["query_weight"] * query
        loss = loss + settings["bind_weight"] * bind
        parts = {task: answer.item(), "patch": patch.item(), f"evidence/{task}": evidence.item()}
        if query_layer is not None:
            parts[f"query/{task}"] = query.item()
        if bind_layer is not None and task == "tc_multi":
            parts["bind"] = bind.item()
        return loss, parts

    seeing = torch.nn.ModuleList(
        [model.model.vision_tower, model.model.multi_modal_projector, model.get_input_embeddings()]
    )
    stage_plan = {
        "encoder": (settings["encoder_steps"], _parameter_groups(seeing, 0.05), encoder_step),
        "answer": (settings["steps"], _parameter_groups(model, 0.05), answer_step),
    }

    def checkpoint_state(optimizer) -> None:
        wall, cpu = spent()
        record = this_run(f"{progress['stage']}:{progress['step']}")
        _save_state(state_path, {
            **progress, "settings": settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "wall_seconds": wall, "cpu_seconds": cpu, "runs": [*progress["runs"], record],
        })  # fmt: skip

    last_save = time.perf_counter()
    with probing(adapter, [layer for layer in (evidence_layer, query_layer, bind_layer) if layer is not None]):
        for name in STAGES[STAGES.index(progress["stage"]) :]:
            n, params, step_loss = stage_plan[name]
            optimizer = torch.optim.AdamW(params, lr=settings["lr"], betas=(0.9, 0.98))
            if saved is not None and saved["stage"] == name and progress["step"] > 0:
                optimizer.load_state_dict(saved["optimizer"])
            if progress["stage"] != name:
                progress.update(stage=name, step=0)
            running: dict[str, list[float]] = {}
            while progress["step"] < n:
                step = progress["step"]
                starts = task_start if name == "answer" else {}  # the encoder stage sees every task
                rotation = rotation_at(step, task_weights, starts)
                task = rotation[step % len(rotation)]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, n, settings["lr"], min(settings["warmup"], n))
                loss, parts = step_loss(task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
                optimizer.step()
                progress["step"] = step = step + 1
                for key, value in parts.items():
                    running.setdefault(key, []).append(value)
                if step % log_every == 0 or step == n:
                    means = {k: round(sum(v) / len(v), 4) for k, v in running.items()}
                    wall, cpu = spent()
                    progress["history"].append({"stage": name, "step": step, "seconds": round(wall, 1), "loss": means})
                    losses = " ".join(f"{k}={v:.3f}" for k, v in means.items())
                    log(f"{name} {step}/{n} {wall:.0f}s difficulty={difficulty():.2f} {losses}")
                    running = {}
                if name == "answer" and curve_every and (step % curve_every == 0 or step == n):
                    accuracy = _validation_accuracy(adapter, curve_items, settings["seed"])
                    progress["curve"].append({"step": step, "accuracy": accuracy})
                    log(f"val accuracy at {step}: {accuracy}")
                stopping = stop_after_minutes and time.perf_counter() - run_started > 60 * stop_after_minutes
                if save_minutes and (time.perf_counter() - last_save > 60 * save_minutes or stopping) and step < n:
                    checkpoint_state(optimizer)
                    last_save = time.perf_counter()
                if stopping and step < n:
                    log(f"stopping after {stop_after_minutes} minutes; continue with --resume")
                    return {"stopped": f"{name}:{step}"}
        if save_minutes:  # the finished state too: a later --resume --steps N trains on from here exactly
            checkpoint_state(optimizer)
    model.eval()
    wall, cpu = spent()
    last_run = this_run(f"answer:{settings['steps']}")
    report = {
        **{k: v for k, v in settings.items() if k != "batch_scale"},
        "evidence_layer": evidence_layer,
        "query_layer": query_layer,
        "bind_layer": bind_layer,
        "batch_sizes": {t: max(1, round(b * settings["batch_scale"])) for t, b in BATCH_SIZES.items()},
        "task_weights": task_weights,
        "items_seen": cursor,
        "train_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "runs": [*progress["runs"], last_run],
        "threads": threads,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_history": progress["history"],
        "curve": progress["curve"],
    }
    if eval_items:
        t0 = time.perf_counter()
        report["eval"] = evaluate_tasks(adapter, eval_items, seed=settings["seed"])
        report["eval_seconds"] = round(time.perf_counter() - t0, 1)
        log(json.dumps(report["eval"]))
    out = save_checkpoint(model, tokenizer, processor, out_dir)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    from tokcomp.tiny.card import plot_curve, write_model_card

    plot_curve(report, out / "training-curve.png")
    write_model_card(report, out / "README.md")
    return report


KIND_NAMES = tuple(sorted({k for kinds in KINDS.values() for k in kinds}))  # "count": tc_shapes' and tc_multi's


def parse_weights(values: Sequence[str], flag: str, known: Sequence[str], kind: type) -> dict:
    """``["position=3", "which=2"]`` as {name: weight}; names from ``known``, weights of type ``kind``, >= 0."""
    weights = {}
    for value in values:
        name, sep, weight = value.partition("=")
        if not sep or name not in known:
            raise TokcompError(f"{flag} takes NAME=W with NAME one of {', '.join(known)}; got '{value}'")
        try:
            weights[name] = kind(weight)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise TokcompError(f"{flag} {value}: the weight must be {what}") from None
        if weights[name] < 0:
            raise TokcompError(f"{flag} {value}: the weight must not be negative")
    return weights


def _machine() -> str:
    from tokcomp.machine import machine_description

    return machine_description()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokcomp train-tiny", description="Train tokcomp-tiny on CPU (resumable).")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint folder (default: checkpoints/tokcomp-tiny)")
    parser.add_argument("--steps", type=int, help=f"answer-stage optimizer steps (default {DEFAULTS['steps']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--encoder-steps", type=int, default=600, help="encoder-only steps on per-patch words first")
    parser.add_argument(
        "--patch-weight",
        type=float,
        help=f"weight of the per-patch loss afterwards (default {DEFAULTS['patch_weight']})",
    )
    parser.add_argument(
        "--evidence-weight",
        type=float,
        help="weight of the evidence loss on the last layer's attention (default 0: off)",
    )
    parser.add_argument(
        "--query-weight",
        type=float,
        help="weight of the query loss: the first answer step's attention onto the question's "
        "key words in --query-layer (default 0: off)",
    )
    parser.add_argument("--query-layer", type=int, help=f"layer of the query loss (default {DEFAULTS['query_layer']})")
    parser.add_argument("--curriculum-steps", type=int,
                        help="grow the scenes from the fewest objects to full difficulty over N answer steps "
                             "(default 0: full difficulty throughout)")  # fmt: skip
    parser.add_argument("--bind-weight", type=float,
                        help="weight of the binding loss: each picture of a multi-image prompt attends to the word "
                             "naming it in --bind-layer (default 0: off)")  # fmt: skip
    parser.add_argument("--bind-layer", type=int, help=f"layer of the binding loss (default {DEFAULTS['bind_layer']})")
    parser.add_argument("--kind-weight", action="append", metavar="KIND=W", dest="kind_weights",
                        help="ask this question type W times as often in training (repeatable; e.g. position=3)")
    parser.add_argument("--task-weight", action="append", metavar="TASK=N", dest="task_weights",
                        help=f"give this task N batches per rotation (repeatable; default {TASK_WEIGHTS})")
    parser.add_argument("--task-start", action="append", metavar="TASK=STEP", dest="task_start",
                        help="keep this task out of the answer stage until that step (repeatable; e.g. tc_text=2000)")
    parser.add_argument("--follow-ups", type=int,
                        help="ask up to N more questions about the same pictures in one conversation (tc_shapes, "
                             "tc_multi; default 0)")  # fmt: skip
    parser.add_argument("--patch-cosine", type=float,
                        help="score the per-patch words by cosine times this instead of the dot product (default 0: "
                             "dot product)")  # fmt: skip
    parser.add_argument("--patch-rms", type=float,
                        help="hold the visual tokens' RMS at this many times the word embeddings' (default 0: off)")
    parser.add_argument("--init-from", metavar="STATE",
                        help="start the answer stage from another run's state.pt: its vision tower, projector and "
                             "word embeddings, with a fresh language model")  # fmt: skip
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply every task's batch size")
    parser.add_argument("--eval-items", type=int, default=200, help="eval items per task after training (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=20, help="print mean losses every N steps")
    parser.add_argument("--save-minutes", type=float, default=5.0, help="save the resumable state every N minutes")
    parser.add_argument("--curve-every", type=int, default=1000, help="validation accuracy every N steps (0: never)")
    parser.add_argument("--curve-items", type=int, default=40, help="validation items per task for the curve")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>.train/state.pt with its settings; --steps and the loss weights "
        "given with it change them from here on (recorded)",
    )
    parser.add_argument("--stop-after-minutes", type=float, default=0.0, help="save the state and stop after N minutes")
    parser.add_argument("--size", choices=sorted(SPECS), default="v1",
                        help="model sizes: v1 (2 M parameters), v2 (6 M) or test (tiny, for smoke tests)")
    parser.add_argument("--test-config", action="store_true", help="the same as --size test")
    args = parser.parse_args(argv)
    try:
        if args.kind_weights is not None:
            args.kind_weights = parse_weights(args.kind_weights, "--kind-weight", KIND_NAMES, float)
        if args.task_weights is not None:
            args.task_weights = parse_weights(args.task_weights, "--task-weight", TASKS, int)
        if args.task_start is not None:
            args.task_start = parse_weights(args.task_start, "--task-start", TASKS, int)
        given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
        chosen = {**DEFAULTS, **given}
        train(
            args.out, chosen["steps"], seed=args.seed, lr=chosen["lr"], warmup=args.warmup,
            spec=TEST_SPEC if args.test_config else SPECS[args.size], batch_scale=args.batch_scale,
            encoder_steps=args.encoder_steps, patch_weight=chosen["patch_weight"],
            evidence_weight=chosen["evidence_weight"], query_weight=chosen["query_weight"],
            query_layer=chosen["query_layer"], curriculum_steps=chosen["curriculum_steps"],
            bind_weight=chosen["bind_weight"], bind_layer=chosen["bind_layer"], kind_weights=chosen["kind_weights"],
            task_weights=chosen["task_weights"], task_start=chosen["task_start"], follow_ups=chosen["follow_ups"],
            patch_cosine=chosen["patch_cosine"], patch_rms=chosen["patch_rms"], init_from=args.init_from,
            eval_items=args.eval_items, log_every=args.log_every,
            threads=args.threads, save_minutes=args.save_minutes, curve_every=args.curve_every,
            curve_items=args.curve_items, resume=args.resume, stop_after_minutes=args.stop_after_minutes,
            overrides=given if args.resume else None, log=lambda m: print(m, flush=True),
        )  # fmt: skip
    except (FileNotFoundError, TokcompError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
