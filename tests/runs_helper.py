"""Synthetic `tokcomp eval` output folders (results.json + samples.jsonl) for the report and regress tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPEC_NAMES = {"none": "none", "dymu-mid": "dymu", "dymu-low": "dymu", "tome-mid": "tome", "fastv": "fastv"}


def task_entry(
    score: float,
    full: float = 200.0,
    mean: float | None = None,
    std: float = 10.0,
    prefill_ms: float = 10.0,
    ttft_ms: float = 20.0,
    decode_ms: float = 2.0,
    samples: int = 4,
) -> dict[str, Any]:
    """One task's entry in results.json; ``mean`` defaults to ``full`` (the plain model)."""
    mean = full if mean is None else mean
    return {
        "metric": "accuracy",
        "score": score,
        "metrics": {"accuracy": score},
        "samples": samples,
        "visual_tokens": {"full": full, "mean": mean, "std": std, "p50": mean, "p95": mean + 2 * std},
        "timings": {"vision_ms": 1.0, "prefill_ms": prefill_ms, "ttft_ms": ttft_ms, "decode_ms_per_token": decode_ms},
        "memory": {"peak_bytes": 1000, "kv_bytes": 500},
    }


def suite_source(task: str, version: int = 2) -> dict[str, Any]:
    """results.json's record of a built-in suite's documents."""
    return {"kind": "builtin", "suite": task, "generator_version": version, "rows": 200,
            "path": f"/data/{task}.parquet", "sha256": "0123456789abcdef"}  # fmt: skip


def write_run(
    root: Path,
    tasks: dict[str, dict[str, Any]],
    spec: str = "none",
    model: str = "tokcomp-tiny",
    samples: dict[str, list[float]] | None = None,
    limit: int | None = None,
    name: str | None = None,
    data: dict[str, dict] | None = None,
    targets: dict[str, dict[int, str]] | None = None,
    machine: dict[str, Any] | None = None,
) -> Path:
    """Write a run folder: ``tasks`` as from ``task_entry``; ``samples`` maps a task to per-doc scores.

    ``data`` overrides a task's document source (default: the built-in suite, generator v2);
    ``targets`` a task's per-doc targets (default ``answer<doc_id>``)."""
    root.mkdir(parents=True, exist_ok=True)
    results = {
        "schema": 1,
        "model": model,
        "method": {"spec": spec, "name": name or SPEC_NAMES.get(spec, spec), "settings": {}},
        "calibration": None,
        "limit": limit,
        "tasks": tasks,
        "versions": {"tokcomp": "0.1.0", "python": "3.12"},
        "machine": machine or {"cpu": "AMD EPYC", "torch_threads": 2},
        "data": {task: suite_source(task) for task in tasks} | (data or {}),
        "git_commit": "0" * 40,
        "date": "2026-11-22T06:00:00Z",
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    lines = []
    for task, scores in (samples or {}).items():
        full = tasks[task]["visual_tokens"]["full"]
        for doc_id, score in enumerate(scores):
            row = {
                "task": task,
                "doc_id": doc_id,
                "target": (targets or {}).get(task, {}).get(doc_id, f"answer{doc_id}"),
                "response": f"answer{doc_id}" if score >= 0.5 else f"wrong{doc_id}",
                "score": score,
                "visual_tokens": {"full": full, "kept": tasks[task]["visual_tokens"]["mean"]},
                "timings": {"vision_ms": 1.0, "prefill_ms": 10.0, "ttft_ms": 20.0, "decode_ms_per_token": 2.0},
                "kv_bytes": 500,
            }
            lines.append(json.dumps(row))
    (root / "samples.jsonl").write_text("".join(line + "\n" for line in lines))
    return root
