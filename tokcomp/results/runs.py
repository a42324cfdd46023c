"""Reading the output folder of one `tokcomp eval` run: results.json and samples.jsonl, checked."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokcomp.errors import TokcompError

RESULTS_NAME = "results.json"
SAMPLES_NAME = "samples.jsonl"
SCHEMA = 1


@dataclass(frozen=True)
class TaskResult:
    """One task's aggregate numbers; an absent measurement is None."""

    name: str
    metric: str
    score: float
    samples: int | None = None
    tokens_full: float | None = None
    tokens_mean: float | None = None
    tokens_std: float | None = None
    vision_ms: float | None = None
    prefill_ms: float | None = None
    ttft_ms: float | None = None
    decode_ms_per_token: float | None = None
    peak_bytes: float | None = None
    kv_bytes: float | None = None
    paired_ratios: dict[str, float] | None = None  # method / plain, timed in the same run (--paired-timing)


@dataclass(frozen=True)
class Sample:
    """One scored sample of samples.jsonl."""

    task: str
    doc_id: int | str
    score: float
    target: str
    response: str
    tokens_kept: float | None = None


@dataclass(frozen=True)
class Run:
    """One `tokcomp eval` run: where it lives and what its results.json says."""

    root: Path
    results_path: Path
    model: str
    spec: str
    method_name: str
    settings: dict[str, Any]
    calibration: str | None
    limit: int | None
    tasks: dict[str, TaskResult]
    data: dict[str, dict] = field(default_factory=dict)  # per task, where its documents came from
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def is_uncompressed(self) -> bool:
        """Whether this is the plain model (method name ``none``)."""
        return self.method_name == "none"


def _number(value: Any, where: str, required: bool = False) -> float | None:
    """A finite number (bool excluded), None when absent and allowed."""
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokcompError(f"{where} must be a finite number, got {json.dumps(value)}")
    return float(value)


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokcompError(f"{where}: '{key}' must be an object")
    return value


def _task_result(name: str, data: Any, where: str) -> TaskResult:
    where = f"{where}: task '{name}'"
    if not isinstance(data, dict):
        raise TokcompError(f"{where} must be an object")
    score = _number(data.get("score"), f"{where} score", required=True)
    assert score is not None
    if not 0.0 <= score <= 1.0:
        raise TokcompError(f"{where} score must be a fraction in [0, 1], got {score}")
    samples = data.get("samples")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 0):
        raise TokcompError(f"{where} samples must be a count, got {json.dumps(samples)}")
    tokens = _section(data, "visual_tokens", where)
    timings = _section(data, "timings", where)
    memory = _section(data, "memory", where)
    paired = _section(data, "paired_timings", where)
    return TaskResult(
        name=name,
        metric=str(data.get("metric") or "score"),
        score=score,
        samples=samples,
        tokens_full=_number(tokens.get("full"), f"{where} visual_tokens.full"),
        tokens_mean=_number(tokens.get("mean"), f"{where} visual_tokens.mean"),
        tokens_std=_number(tokens.get("std"), f"{where} visual_tokens.std"),
        vision_ms=_number(timings.get("vision_ms"), f"{where} timings.vision_ms"),
        prefill_ms=_number(timings.get("prefill_ms"), f"{where} timings.prefill_ms"),
        ttft_ms=_number(timings.get("ttft_ms"), f"{where} timings.ttft_ms"),
        decode_ms_per_token=_number(timings.get("decode_ms_per_token"), f"{where} timings.decode_ms_per_token"),
        peak_bytes=_number(memory.get("peak_bytes"), f"{where} memory.peak_bytes"),
        kv_bytes=_number(memory.get("kv_bytes"), f"{where} memory.kv_bytes"),
        paired_ratios={str(k): _number(v, f"{where} paired_timings.{k}", required=True) for k, v in paired.items()}
        or None,
    )


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokcompError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TokcompError(f"{path} is not UTF-8 text") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokcompError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc


def results_file(path: str | Path) -> Path:
    """The results.json of a run folder, or the file itself when one is given."""
    path = Path(path)
    if path.is_dir():
        found = path / RESULTS_NAME
        if not found.is_file():
            raise TokcompError(f"{path} has no {RESULTS_NAME}; expected the output folder of `tokcomp eval`")
        return found
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise TokcompError(f"{path} is neither a run folder nor a results.json")
        return path
    raise TokcompError(f"{path} does not exist")


def load_run(path: str | Path) -> Run:
    """Read and check one run's results.json (``path`` is the run folder or the file)."""
    file = results_file(path)
    data = _read_json(file)
    if not isinstance(data, dict):
        raise TokcompError(f"{file}: expected a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise TokcompError(f"{file}: unsupported schema {json.dumps(schema)} (this tokcomp reads schema {SCHEMA})")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise TokcompError(f"{file}: 'model' must be a non-empty string")
    method = data.get("method")
    if (
        not isinstance(method, dict)
        or not isinstance(method.get("spec"), str)
        or not isinstance(method.get("name"), str)
    ):
        raise TokcompError(f"{file}: 'method' must be an object with 'spec' and 'name' strings")
    settings = method.get("settings") or {}
    if not isinstance(settings, dict):
        raise TokcompError(f"{file}: 'method.settings' must be an object")
    limit = data.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TokcompError(f"{file}: 'limit' must be an integer or null")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise TokcompError(f"{file}: 'tasks' must be a non-empty object")
    calibration = data.get("calibration")
    sources = data.get("data") or {}
    if not isinstance(sources, dict) or not all(isinstance(v, dict) for v in sources.values()):
        raise TokcompError(f"{file}: 'data' must be an object of task name to document source")
    extras = {}
    for key in ("machine", "versions"):
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise TokcompError(f"{file}: '{key}' must be an object")
        extras[key] = value
    return Run(
        root=file.parent,
        results_path=file,
        model=model,
        spec=method["spec"],
        method_name=method["name"],
        settings=settings,
        calibration=None if calibration is None else str(calibration),
        limit=limit,
        tasks={str(name): _task_result(str(name), value, str(file)) for name, value in tasks.items()},
        data={str(name): value for name, value in sources.items()},
        **extras,
    )


def _as_text(value: Any) -> str:
    """A target or response as one line of text (lists of reference answers joined)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " | ".join(dict.fromkeys(value))
    return json.dumps(value, ensure_ascii=False)


def _doc_id(value: Any, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TokcompError(f"{where}: 'doc_id' must be an integer or a string, got {json.dumps(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise TokcompError(f"{where}: 'doc_id' must be an integer or a string, got {value}")
        return int(value)
    return value


def load_samples(run: Run) -> dict[tuple[str, int | str], Sample]:
    """The run's samples.jsonl keyed by (task, doc_id); every line is checked."""
    path = run.root / SAMPLES_NAME
    if not path.is_file():
        raise TokcompError(f"{run.root} has no {SAMPLES_NAME}; expected the output folder of `tokcomp eval`")
    samples: dict[tuple[str, int | str], Sample] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokcompError(f"{where} is not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise TokcompError(f"{where}: expected a JSON object")
                task = row.get("task")
                if not isinstance(task, str) or not task:
                    raise TokcompError(f"{where}: 'task' must be a non-empty string")
                score = _number(row.get("score"), f"{where}: 'score'", required=True)
                assert score is not None
                tokens = row.get("visual_tokens")
                kept = (
                    _number(tokens.get("kept"), f"{where}: 'visual_tokens.kept'") if isinstance(tokens, dict) else None
                )
                sample = Sample(
                    task=task,
                    doc_id=_doc_id(row.get("doc_id"), where),
                    score=score,
                    target=_as_text(row.get("target")),
                    response=_as_text(row.get("response")),
                    tokens_kept=kept,
                )
                key = (sample.task, sample.doc_id)
                if key in samples:
                    raise TokcompError(f"{where}: task '{task}' doc_id {sample.doc_id!r} appears twice")
                samples[key] = sample
    except OSError as exc:
        raise TokcompError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TokcompError(f"{path} is not UTF-8 text") from exc
    return samples
