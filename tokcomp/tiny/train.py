"""Train tokcomp-tiny from scratch on the task generators (CPU, seeded), then evaluate and save it.

The LLM input of a training example is built exactly as inference builds it: the adapter's own
preprocessing (``prepare_units``), the stock vision tower, projector, AnyRes packing and frame
pooling, and ``Pipeline.splice`` for the prompt (the chat template stored in the tokenizer). Only the
vision tower runs batched over all views of a batch. The loss covers the answer tokens and EOS.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokcomp.models.adapters import LlavaOnevisionAdapter
from tokcomp.models.visual import identity_tokens
from tokcomp.pipeline import Pipeline, Request
from tokcomp.resources import REPO_ROOT
from tokcomp.tiny import TASKS
from tokcomp.tiny.model import (
    TEST_SPEC,
    TINY_SPEC,
    build_image_processor,
    build_model,
    build_tokenizer,
    save_checkpoint,
)
from tokcomp.tiny.tasks import LABEL_WORDS, Item, make_item

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

    def __init__(self, tokenizer):
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
        for name, ids in self.word_ids.items():
            logits = flat @ embeddings[ids].T
            target = torch.from_numpy(np.stack([lab[name].reshape(-1) for lab in labels])).flatten()
            if name in FOREGROUND_ONLY:  # what is on an object's patches, not the many empty ones
                target = target.masked_fill(target == 0, -100)
                if bool((target == -100).all()):
                    continue
            total = total + F.cross_entropy(logits.float(), target, ignore_index=-100)
        return total / len(self.word_ids)


def picture_labels(items: Sequence[Item]) -> list[dict[str, np.ndarray]]:
    """Per-patch labels of every image and frame of the items, in the order ``_encode_batch`` runs them."""
    return [lab for it in items for lab in it.labels]


def request_of(item: Item) -> Request:
    return Request(item.prompt, images=list(item.images), video=list(item.video) if item.video else None)


def batch_loss(
    adapter: LlavaOnevisionAdapter, items: Sequence[Item], words: PatchWords | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the answer tokens (and EOS) given the pictures and the prompt, and the
    per-patch word loss (zero without ``words``)."""
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
    seqs, targets = [], []
    for req, unit_list, feats in zip(requests, units, features, strict=True):
        tokens = [identity_tokens(f, []) for f in feats]
        spliced = pipe.splice(req, tokens, [u.kind for u in unit_list])
        answer = [*tok(items[len(seqs)].target, add_special_tokens=False).input_ids, tok.eos_token_id]
        answer_ids = torch.tensor(answer)
        seqs.append(torch.cat([spliced.embeds, adapter.embed_tokens(answer_ids)]))
        targets.append((spliced.embeds.shape[0], answer_ids))
    length = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), length, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        embeds[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
    positions = torch.arange(length)[None].expand(len(seqs), -1)
    hidden = adapter.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    rows = torch.cat([torch.full((len(ids),), b) for b, (_, ids) in enumerate(targets)])
    cols = torch.cat([torch.arange(len(ids)) + start - 1 for start, ids in targets])
    logits = adapter.lm_head(hidden[rows, cols])
    return F.cross_entropy(logits.float(), torch.cat([ids for _, ids in targets])), patch_loss


def encoder_loss(adapter: LlavaOnevisionAdapter, items: Sequence[Item], words: PatchWords) -> torch.Tensor:
    """Per-patch word loss of the encoder and projector alone on every image and frame of the items."""
    model = adapter.model.model
    units = [adapter.prepare_units(list(it.images), list(it.video) if it.video else None) for it in items]
    views = torch.cat([u.views if u.kind == "video" else u.views[:1] for us in units for u in us])
    hidden = model.vision_tower(views, output_hidden_states=True).hidden_states[-1]
    projected = model.multi_modal_projector(hidden)
    return words.loss(projected, adapter.model.get_input_embeddings().weight, picture_labels(items))


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


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
    eval_items: int = 200,
    log_every: int = 20,
    threads: int = 2,
    save_every: int = 0,
    log=print,
) -> dict:
    """Train, evaluate on ``eval_items`` per task (0: skip) and save the checkpoint with training.json.

    First ``encoder_steps`` steps teach the encoder alone from per-patch labels; then the whole model
    learns to answer, with the per-patch loss kept at ``patch_weight``.
    """
    from tokcomp.tiny.evaluate import evaluate_tasks

    torch.set_num_threads(threads)
    seed_everything(seed)
    spec = spec or TINY_SPEC
    tokenizer = build_tokenizer()
    processor = build_image_processor(spec)
    model = build_model(spec, tokenizer, seed)
    adapter = LlavaOnevisionAdapter(model, tokenizer, processor, "tokcomp-tiny")
    words = PatchWords(tokenizer)
    model.train()
    rotation = task_schedule(TASK_WEIGHTS)
    cursor = dict.fromkeys(TASKS, 0)
    history = []
    start = time.perf_counter()

    def next_items(task: str, scale: float) -> list[Item]:
        size = max(1, round(BATCH_SIZES[task] * batch_scale * scale))
        items = [make_item(task, "train", cursor[task] + i, seed) for i in range(size)]
        cursor[task] += size
        return items

    def run_stage(name: str, n: int, params: list, step_loss) -> None:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98))
        running: dict[str, list[float]] = {}
        for step in range(n):
            task = rotation[step % len(rotation)]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, n, lr, min(warmup, n))
            loss, parts = step_loss(task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
            optimizer.step()
            for key, value in parts.items():
                running.setdefault(key, []).append(value)
            if (step + 1) % log_every == 0 or step + 1 == n:
                means = {k: round(sum(v) / len(v), 4) for k, v in running.items()}
                elapsed = time.perf_counter() - start
                history.append({"stage": name, "step": step + 1, "seconds": round(elapsed, 1), "loss": means})
                log(f"{name} {step + 1}/{n} {elapsed:.0f}s " + " ".join(f"{k}={v:.3f}" for k, v in means.items()))
                running = {}
            if save_every and name == "answer" and (step + 1) % save_every == 0 and step + 1 < n:
                save_checkpoint(model, tokenizer, processor, out_dir)  # a fallback; training.json comes at the end

    def encoder_step(task: str):
        loss = encoder_loss(adapter, next_items(task, 2.0), words)
        return loss, {f"patch/{task}": loss.item()}

    def answer_step(task: str):
        answer, patch = batch_loss(adapter, next_items(task, 1.0), words if patch_weight else None)
        return answer + patch_weight * patch, {task: answer.item(), "patch": patch.item()}

    seeing = [model.model.vision_tower, model.model.multi_modal_projector, model.get_input_embeddings()]
    run_stage("encoder", encoder_steps, _parameter_groups(torch.nn.ModuleList(seeing), 0.05), encoder_step)
    all_params = _parameter_groups(model, 0.05)
    run_stage("answer", steps, all_params, answer_step)
    train_seconds = time.perf_counter() - start
    model.eval()
    report = {
        "seed": seed,
        "encoder_steps": encoder_steps,
        "steps": steps,
        "lr": lr,
        "warmup": warmup,
        "patch_weight": patch_weight,
        "batch_sizes": {t: max(1, round(b * batch_scale)) for t, b in BATCH_SIZES.items()},
        "task_weights": TASK_WEIGHTS,
        "items_seen": cursor,
        "train_seconds": round(train_seconds, 1),
        "threads": threads,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "spec": spec,
        "loss_history": history,
    }
    if eval_items:
        t0 = time.perf_counter()
        report["eval"] = evaluate_tasks(adapter, eval_items, seed=seed)
        report["eval_seconds"] = round(time.perf_counter() - t0, 1)
        log(json.dumps(report["eval"]))
    out = save_checkpoint(model, tokenizer, processor, out_dir)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokcomp.tiny.train", description="Train tokcomp-tiny on CPU.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint folder (default: checkpoints/tokcomp-tiny)")
    parser.add_argument("--steps", type=int, default=5000, help="answer-stage optimizer steps (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--encoder-steps", type=int, default=600, help="encoder-only steps on per-patch words first")
    parser.add_argument("--patch-weight", type=float, default=0.5, help="weight of the per-patch loss afterwards")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply every task's batch size")
    parser.add_argument("--eval-items", type=int, default=200, help="eval items per task after training (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=20, help="print mean losses every N steps")
    parser.add_argument("--save-every", type=int, default=0, help="also save the checkpoint every N steps")
    parser.add_argument("--test-config", action="store_true", help="a very small model (for smoke tests)")
    args = parser.parse_args(argv)
    train(
        args.out, args.steps, seed=args.seed, lr=args.lr, warmup=args.warmup,
        spec=TEST_SPEC if args.test_config else TINY_SPEC, batch_scale=args.batch_scale,
        encoder_steps=args.encoder_steps, patch_weight=args.patch_weight,
        eval_items=args.eval_items, log_every=args.log_every, threads=args.threads, save_every=args.save_every,
        log=lambda m: print(m, flush=True),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
