"""Accuracy of a model on the task suites: greedy answers through ``tokcomp.pipeline.Pipeline``, exact match."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokcomp.data.tasks import TASKS, Item, generate, normalize_answer, random_guess, read_eval_split
from tokcomp.methods.base import Method
from tokcomp.pipeline import Pipeline, Request

MAX_NEW_TOKENS = 8


def answer_items(adapter, items: Sequence[Item], batch_size: int = 16, method: Method | None = None) -> list[str]:
    """Generated answers, in order (requests batched)."""
    pipe = Pipeline(adapter, method)
    answers: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        requests = [Request(it.prompt, list(it.images), list(it.video) if it.video else None) for it in chunk]
        answers += [g.answer for g in pipe.generate(requests, max_new_tokens=MAX_NEW_TOKENS)]
    return answers


def score(items: Sequence[Item], answers: Sequence[str]) -> dict:
    """Exact match of normalised answers, overall and per question type, with the random-guess rate."""
    correct = [normalize_answer(a) == normalize_answer(it.answer) for it, a in zip(items, answers, strict=True)]
    kinds: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct, strict=True):
        kinds.setdefault(it.kind, []).append(ok)
    return {
        "items": len(items),
        "accuracy": round(sum(correct) / len(items), 4),
        "random_guess": round(random_guess(items), 4),
        "per_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())},
    }


def evaluate_tasks(
    adapter, n: int = 200, seed: int = 0, tasks: Sequence[str] = TASKS, data_dir: str | Path | None = None
) -> dict[str, dict]:
    """Per-task scores on the first ``n`` eval items (from ``data_dir`` files if given, else generated)."""
    results = {}
    for task in tasks:
        if data_dir is not None:
            items = read_eval_split(Path(data_dir) / task / "eval.parquet", limit=n)
        else:
            items = generate(task, "eval", n, seed)
        results[task] = score(items, answer_items(adapter, items))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from tokcomp.models.loading import load_vlm

    parser = argparse.ArgumentParser(prog="python -m tokcomp.tiny.evaluate", description=evaluate_tasks.__doc__)
    parser.add_argument("--model", default="tokcomp-tiny")
    parser.add_argument("--num-items", type=int, default=200)
    parser.add_argument("--data", default=None, help="folder written by `python -m tokcomp.data.tasks`")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    adapter = load_vlm(args.model)
    print(json.dumps(evaluate_tasks(adapter, args.num_items, tasks=args.tasks, data_dir=args.data), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
