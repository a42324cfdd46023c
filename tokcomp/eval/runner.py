"""``tokcomp eval``: lmms-eval's ``simple_evaluate`` with the tokcomp model, then results.json and samples.jsonl."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokcomp.defaults import DEFAULT_FRAMES
from tokcomp.errors import TokcompError
from tokcomp.io import atomic_write_text
from tokcomp.machine import machine_info, versions

SCHEMA = 1


@dataclass
class EvalRequest:
    tasks: list[str]
    model: str
    method: str = "none"
    calib: str | None = None
    settings: dict | None = None
    limit: int | None = None
    data_files: Path | None = None
    batch_size: int = 1
    frames: int = DEFAULT_FRAMES
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    progress: bool = True
    verbose: bool = False  # lmms-eval's own log lines and progress bars
    paired_timing: bool = False  # also time the plain model on every sample, interleaved
    label: str | None = None  # the run's name in reports (default: the method spec)


def sample_score(value) -> float | None:
    """A per-sample metric as a number in [0, 1] (lmms-eval tasks return numbers or dicts with a score)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict) and isinstance(value.get("score"), (int, float)):
        return float(value["score"])
    return None


def as_fraction(aggregate: float, per_sample_mean: float | None) -> float:
    """The task score in [0, 1]: percent-valued aggregates (MVBench, VideoMME) are divided by 100."""
    if per_sample_mean is not None and aggregate > 1.0 + 1e-9:
        return aggregate / 100.0
    return aggregate


def _token_summary(full: list[int], kept: list[int]) -> dict:
    arr = np.asarray(kept, dtype=float)
    return {
        "full": round(float(np.mean(full)), 2),
        "mean": round(float(arr.mean()), 2),
        "std": round(float(arr.std()), 2),
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p95": round(float(np.percentile(arr, 95)), 2),
    }


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _quiet_lmms_eval() -> None:
    """lmms-eval logs every step with loguru at INFO: keep errors only (its tqdm bars: see the CLI)."""
    with contextlib.suppress(ImportError):
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="ERROR")
    for name in ("lmms-eval", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


@contextlib.contextmanager
def _without_lmms_eval_bars():
    """lmms-eval's evaluator draws its own tqdm bars whatever TQDM_DISABLE says: switch them off while it runs."""
    import lmms_eval.evaluator as evaluator

    original = evaluator.tqdm

    def quiet(*args, **kwargs):
        kwargs["disable"] = True
        return original(*args, **kwargs)

    evaluator.tqdm = quiet
    try:
        yield
    finally:
        evaluator.tqdm = original


def publish_folder(staging: Path, out_dir: Path) -> None:
    """Move a finished staging folder to ``out_dir`` in one rename; a previous run there is replaced."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except OSError:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def staging_folder(out_dir: Path) -> Path:
    """An empty hidden folder beside ``out_dir`` to write the run into."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise TokcompError(f"cannot write the run folder {out_dir}: {exc.strerror or exc}") from exc


def run_eval(request: EvalRequest, out_dir: Path, log=print) -> dict:
    """Evaluate, write ``out_dir/results.json`` and ``out_dir/samples.jsonl``, and return the results.

    Both files are written into a staging folder that replaces ``out_dir`` in one rename: a failed or
    killed run leaves the previous folder (or none) as it was, never one file of each run.
    """
    if not request.verbose:
        _quiet_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate

    from tokcomp.distributed import join_world
    from tokcomp.eval.model import TokcompLMM
    from tokcomp.eval.tasks import SUITES, ensure_suite_files, plan_tasks, suites_data_dir, task_manager

    if request.limit is not None and request.limit < 1:
        raise TokcompError("--limit must be at least 1")
    manager = task_manager(request.tasks)
    plans = plan_tasks(request.tasks, request.data_files, manager=manager)
    suites = sorted({leaf for p in plans for leaf in p.leaves if leaf in SUITES})
    if suites and request.data_files is None:
        ensure_suite_files(suites, suites_data_dir(), log=log)
    world, _ = join_world(request.device)
    model = TokcompLMM(
        pretrained=request.model,
        method=request.method,
        calib=request.calib,
        batch_size=request.batch_size,
        max_frames_num=request.frames,
        progress=request.progress,
        dtype=request.dtype,
        paired_timing=request.paired_timing,
        device=request.device,
        device_map=request.device_map,
        **(request.settings or {}),
    )
    configs = [c for p in plans for c in p.configs]
    sources = _data_sources(plans, manager)
    if not world.is_main:  # lmms-eval gathers the samples to rank 0, which alone writes the run
        _simple_evaluate(simple_evaluate, model, configs, manager, request, None, world)
        return {}
    staging = staging_folder(out_dir)
    try:
        results = _evaluate(simple_evaluate, model, configs, manager, request, staging, plans, world)
        results["data"] = sources
        atomic_write_text(staging / "results.json", json.dumps(results, indent=2) + "\n")
        publish_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def _data_sources(plans, manager) -> dict[str, dict]:
    """Per leaf task, where its documents come from (see tokcomp.eval.provenance)."""
    from tokcomp.data.tasks import GENERATOR_VERSION
    from tokcomp.eval.provenance import data_source
    from tokcomp.eval.tasks import SUITES

    sources = {}
    for plan in plans:
        # A stock group asked for by name is one config for many leaves: each leaf is its own stock task.
        configs = plan.configs if len(plan.configs) == len(plan.leaves) else plan.leaves
        for leaf, config in zip(plan.leaves, configs, strict=True):
            builtin = isinstance(config, dict) and leaf in SUITES and _is_suite_file(config)
            sources[leaf] = data_source(leaf, config, manager, GENERATOR_VERSION if builtin else None)
    return sources


def _is_suite_file(config: dict) -> bool:
    from tokcomp.eval.tasks import suites_data_dir

    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return any(Path(p).resolve().is_relative_to(suites_data_dir()) for p in files.values())


def _simple_evaluate(simple_evaluate, model, configs, manager, request: EvalRequest, staging: Path | None, world):
    """lmms-eval's run (in every process of a multi-process run); the per-sample records of every
    process are gathered into ``model.records`` afterwards."""
    from tokcomp.distributed import gather_dicts, leave_world

    bars = contextlib.nullcontext() if request.verbose else _without_lmms_eval_bars()
    try:
        with bars:
            raw = simple_evaluate(
                model=model,
                tasks=configs,
                limit=request.limit,
                bootstrap_iters=0,
                log_samples=True,
                task_manager=manager,
                batch_size=request.batch_size,
                cli_args=argparse.Namespace(output_path=str(staging or ""), process_with_media=False),
                verbosity="INFO" if request.verbose else "ERROR",
                distributed_executor_backend="torchrun",
            )
    except SystemExit as exc:  # some stock tasks exit when a video is missing
        raise TokcompError(f"lmms-eval stopped: {exc.code}") from None
    except FileNotFoundError as exc:
        raise TokcompError(f"missing data: {exc}") from None
    model.records = gather_dicts(model.records, world)
    leave_world(world)  # the last collective: rank 0 writes the run alone
    return raw


def _evaluate(simple_evaluate, model, configs, manager, request: EvalRequest, staging: Path, plans, world) -> dict:
    """lmms-eval's run, samples.jsonl written into ``staging``; returns results.json's content."""
    raw = _simple_evaluate(simple_evaluate, model, configs, manager, request, staging, world)
    if raw is None:
        raise TokcompError("lmms-eval returned no results")
    results, samples = assemble(raw, model, request, [leaf for p in plans for leaf in p.leaves])
    results["processes"] = world.size
    atomic_write_text(staging / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    return results


def assemble(raw: dict, model, request: EvalRequest, leaves: list[str]) -> tuple[dict, list[dict]]:
    """results.json's content and the samples.jsonl rows, from lmms-eval's output."""
    tasks, rows = {}, []
    for task in leaves:
        if task not in raw["results"]:
            continue
        metric_names = [m["metric"] for m in raw["configs"][task].get("metric_list", []) if m["metric"] != "submission"]
        primary = metric_names[0] if metric_names else None
        metrics = {}
        for key, value in raw["results"][task].items():
            name = key.partition(",")[0]
            if isinstance(value, (int, float)) and "stderr" not in name:
                metrics[name] = value
        task_samples = raw.get("samples", {}).get(task, [])
        scores, records = [], []
        for sample in task_samples:
            doc_id = int(sample["doc_id"])
            record = model.records.get((task, doc_id))
            score = sample_score(sample.get(primary)) if primary else None
            response = sample.get("filtered_resps") or sample.get("resps") or [""]
            while isinstance(response, list):
                response = response[0] if response else ""
            row = {"task": task, "doc_id": doc_id, "target": sample.get("target"), "response": response, "score": score}
            if record is not None:
                row |= {
                    "visual_tokens": {"full": record.visual_full, "kept": record.visual_kept},
                    "timings": record.timings_ms,
                    **({"plain_timings": record.plain_timings_ms} if record.plain_timings_ms else {}),
                    "kv_bytes": record.kv_bytes,
                }
                records.append(record)
            if score is not None:
                scores.append(score)
            rows.append(row)
        per_sample_mean = statistics.fmean(scores) if scores else None
        aggregate = metrics.get(primary) if primary else None
        if aggregate is None:
            aggregate = per_sample_mean
        entry = {
            "metric": primary,
            "score": round(as_fraction(aggregate, per_sample_mean), 6) if aggregate is not None else None,
            "metrics": metrics,
            "samples": len(task_samples),
        }
        if records:
            entry["visual_tokens"] = _token_summary([r.visual_full for r in records], [r.visual_kept for r in records])
            entry["timings"] = {
                key: round(statistics.median(r.timings_ms[key] for r in records), 3) for key in records[0].timings_ms
            }
            paired = [r for r in records if r.plain_timings_ms]
            if paired:  # same samples, same process: ratios of medians that compare
                entry["paired_timings"] = {
                    key: round(
                        statistics.median(r.timings_ms[key] for r in paired)
                        / max(statistics.median(r.plain_timings_ms[key] for r in paired), 1e-9),
                        4,
                    )
                    for key in records[0].timings_ms
                }
            entry["memory"] = {
                "peak_bytes": _peak_bytes(),
                "kv_bytes": int(statistics.fmean(r.kv_bytes for r in records)),
            }
        tasks[task] = entry
    if not tasks:
        raise TokcompError("lmms-eval produced no results for " + ", ".join(leaves))
    return {
        "schema": SCHEMA,
        "model": request.model,
        "method": {
            "spec": request.label or request.method, "name": model.method.name,
            "settings": _jsonable(model.method.settings()),
        },
        "calibration": request.calib,
        "dtype": model.adapter.dtype_name,
        "limit": request.limit,
        "batch_size": request.batch_size,
        "tasks": tasks,
        "versions": versions(),
        "machine": machine_info(next(model.adapter.model.parameters()).device),
        "git_commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }, rows


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
