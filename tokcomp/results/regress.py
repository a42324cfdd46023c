"""`tokcomp regress`: a current `tokcomp eval` run against a baseline, task by task and sample by sample."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokcomp import resources
from tokcomp.errors import TokcompError
from tokcomp.eval.provenance import describe, same_documents
from tokcomp.results.runs import Run, Sample, load_run, load_samples
from tokcomp.stats import paired_difference_interval

TOLERANCES_NAME = "regress-tolerances.yaml"
FLIP_DROP = 0.5  # a sample flips when its score falls by at least this much (correct → wrong)
SHOWN_FLIPS = 10
EPS = 1e-9  # a change exactly at the tolerance passes despite float rounding


@dataclass(frozen=True)
class Tolerance:
    """When a task's loss against its baseline is a regression (see configs/regress-tolerances.yaml).

    A drop fails when the paired sign test says it is beyond noise at false-alarm rate ``alpha`` and it
    is at least ``min_drop``; a drop of ``max_drop`` or more fails whatever the test says.
    """

    alpha: float = 0.01
    min_drop: float = 0.025
    max_drop: float = 0.15
    tokens_rise: float = 0.02


@dataclass(frozen=True)
class Tolerances:
    """A default tolerance and per-task overrides."""

    default: Tolerance = field(default_factory=Tolerance)
    tasks: dict[str, Tolerance] = field(default_factory=dict)

    def for_task(self, task: str) -> Tolerance:
        """The tolerance that applies to ``task``."""
        return self.tasks.get(task, self.default)


def default_tolerances_path() -> Path | None:
    """configs/regress-tolerances.yaml in the working directory, else the shipped one; None if neither."""
    return next((p for p in resources.search_paths("configs", TOLERANCES_NAME) if p.is_file()), None)


def _tolerance(data: Any, base: Tolerance, where: str) -> Tolerance:
    """``base`` with the keys given in ``data`` replaced, each checked."""
    if data is None:
        return base
    if not isinstance(data, dict):
        raise TokcompError(f"{where} must be a mapping of {', '.join(f.name for f in fields(Tolerance))}")
    known = {f.name for f in fields(Tolerance)}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise TokcompError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise TokcompError(f"{where}.{key} must be a non-negative number, got {value!r}")
        if key == "alpha" and not 0 < value < 1:
            raise TokcompError(f"{where}.alpha must be a probability between 0 and 1, got {value!r}")
        values[key] = float(value)
    return replace(base, **values)


def parse_tolerances(data: Any, where: str = "tolerances") -> Tolerances:
    """Tolerances from a parsed YAML mapping ``{default: {...}, tasks: {task: {...}}}``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokcompError(f"{where} must be a mapping with 'default' and 'tasks'")
    unknown = sorted(set(map(str, data)) - {"default", "tasks"})
    if unknown:
        raise TokcompError(f"{where}: unknown key(s) {', '.join(unknown)} (known: default, tasks)")
    default = _tolerance(data.get("default"), Tolerance(), f"{where}: default")
    tasks = data.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise TokcompError(f"{where}: 'tasks' must be a mapping of task name to tolerances")
    return Tolerances(
        default=default,
        tasks={str(name): _tolerance(value, default, f"{where}: tasks.{name}") for name, value in tasks.items()},
    )


def load_tolerances(path: str | Path | None = None) -> tuple[Tolerances, Path | None]:
    """Tolerances from ``path``, else the shipped default file, else the built-in defaults; and the file used."""
    if path is None:
        path = default_tolerances_path()
        if path is None:
            return Tolerances(), None
    path = Path(path)
    if not path.is_file():
        raise TokcompError(f"tolerance file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokcompError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TokcompError(f"tolerance file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_tolerances(data, str(path)), path


@dataclass(frozen=True)
class Flip:
    """A sample the baseline got right and the current run gets wrong."""

    doc_id: int | str
    target: str
    baseline_response: str
    current_response: str
    baseline_score: float
    current_score: float


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test (McNemar's for right/wrong scores): the chance of at least ``worse``
    losses among the ``worse + better`` pairs that changed, were a loss and a gain equally likely."""
    changed = worse + better
    if changed == 0:
        return 1.0
    return sum(math.comb(changed, i) for i in range(worse, changed + 1)) / 2**changed


@dataclass(frozen=True)
class TaskComparison:
    """One baseline task against the current run, with the reasons it fails (none = it passes)."""

    task: str
    tolerance: Tolerance
    baseline_score: float
    current_score: float | None  # None: the task is missing from the current run
    baseline_tokens: float | None
    current_tokens: float | None
    flips: list[Flip] = field(default_factory=list)  # right → wrong (score fell by at least FLIP_DROP)
    worse: int = 0  # paired samples whose score fell
    better: int = 0  # paired samples whose score rose
    paired: int = 0  # samples found in both runs
    paired_delta: tuple[float, float, float] | None = None  # mean current − baseline and its 95 % bootstrap CI
    missing_samples: list[int | str] = field(default_factory=list)  # baseline doc_ids absent from current
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether nothing regressed."""
        return not self.failures

    @property
    def score_delta(self) -> float | None:
        """current − baseline score, in fraction points."""
        return None if self.current_score is None else self.current_score - self.baseline_score

    @property
    def p_value(self) -> float:
        """How likely a loss this lopsided is from noise alone (sign test over the changed pairs)."""
        return sign_test_p(self.worse, self.better)

    @property
    def tokens_change(self) -> float | None:
        """Relative change of the mean visual tokens (current / baseline − 1)."""
        if self.baseline_tokens is None or self.current_tokens is None or self.baseline_tokens <= 0:
            return None
        return self.current_tokens / self.baseline_tokens - 1.0


@dataclass(frozen=True)
class Comparison:
    """Every baseline task compared; ``passed`` decides the exit code."""

    baseline: Run
    current: Run
    tolerances_file: Path | None
    tasks: list[TaskComparison]
    extra_tasks: list[str]  # tasks only the current run has (reported, never a failure)
    notes: list[str]

    @property
    def passed(self) -> bool:
        """Whether every baseline task passed."""
        return all(t.passed for t in self.tasks)

    @property
    def failed(self) -> list[TaskComparison]:
        """The tasks that regressed."""
        return [t for t in self.tasks if not t.passed]


def check_comparable(baseline: Run, current: Run) -> None:
    """Refuse runs of another model, method spec, sample limit or documents: a diff would mean nothing."""
    for what, a, b in (
        ("model", baseline.model, current.model),
        ("method", baseline.spec, current.spec),
        ("limit", baseline.limit, current.limit),
    ):
        if a != b:
            raise TokcompError(
                f"the runs differ in {what}: baseline {baseline.root} has {a!r}, current {current.root} has {b!r}; "
                f"compare runs of the same model, method and limit"
            )
    for task in sorted(set(baseline.tasks) & set(current.tasks)):
        before, after = baseline.data.get(task), current.data.get(task)
        for run, source in ((baseline, before), (current, after)):
            if source is None:
                raise TokcompError(
                    f"{run.root} does not record which documents {task} used (made by an older tokcomp): re-run it"
                )
        if not same_documents(before, after):
            raise TokcompError(
                f"the runs are over different documents for {task}: baseline {describe(before)}, "
                f"current {describe(after)}"
            )


def check_same_targets(
    baseline_samples: dict[tuple[str, int | str], Sample], current_samples: dict[tuple[str, int | str], Sample]
) -> None:
    """Refuse pairs whose documents differ: the same (task, doc_id) must have the same target."""
    for key, before in baseline_samples.items():
        after = current_samples.get(key)
        if after is not None and after.target != before.target:
            raise TokcompError(
                f"{key[0]} doc_id {key[1]!r} has target {before.target!r} in the baseline but {after.target!r} "
                "in the current run: the runs are over different documents"
            )


def _changed(what: str, before: dict, after: dict) -> list[str]:
    keys = sorted(set(before) | set(after), key=str)
    return [
        f"{what} {key}: {before.get(key)!r} → {after.get(key)!r}" for key in keys if before.get(key) != after.get(key)
    ]


def compare_task(
    task: str,
    baseline: Run,
    current: Run,
    baseline_samples: dict[tuple[str, int | str], Sample],
    current_samples: dict[tuple[str, int | str], Sample],
    tolerance: Tolerance,
) -> TaskComparison:
    """One task of the baseline against the current run."""
    base = baseline.tasks[task]
    now = current.tasks.get(task)
    if now is None:
        return TaskComparison(
            task, tolerance, base.score, None, base.tokens_mean, None, failures=["missing from the current run"]
        )
    flips: list[Flip] = []
    missing: list[int | str] = []
    worse = better = paired = 0
    before_scores: list[float] = []
    after_scores: list[float] = []
    for (name, doc_id), before in baseline_samples.items():
        if name != task:
            continue
        after = current_samples.get((name, doc_id))
        if after is None:
            missing.append(doc_id)
            continue
        paired += 1
        before_scores.append(before.score)
        after_scores.append(after.score)
        if after.score < before.score - EPS:
            worse += 1
            if before.score - after.score >= FLIP_DROP - EPS:
                flips.append(Flip(doc_id, before.target, before.response, after.response, before.score, after.score))
        elif after.score > before.score + EPS:
            better += 1
    delta = paired_difference_interval(before_scores, after_scores) if paired else None
    comparison = TaskComparison(
        task, tolerance, base.score, now.score, base.tokens_mean, now.tokens_mean, flips, worse, better, paired,
        delta, missing,
    )  # fmt: skip
    return replace(comparison, failures=_failures(comparison, tolerance))


def _failures(t: TaskComparison, tolerance: Tolerance) -> list[str]:
    failures = []
    drop = -(t.score_delta or 0.0)
    change = f"{100 * drop:.1f} points ({100 * t.baseline_score:.1f}% → {100 * (t.current_score or 0):.1f}%)"
    if drop >= tolerance.max_drop - EPS:
        failures.append(f"accuracy fell {change}, at least the {100 * tolerance.max_drop:.1f} points never allowed")
    elif t.p_value < tolerance.alpha and drop >= tolerance.min_drop - EPS:
        failures.append(
            f"accuracy fell {change}: {t.worse} samples worse and {t.better} better, p = {t.p_value:.2g} "
            f"< alpha {tolerance.alpha:g} (beyond noise)"
        )
    if t.baseline_tokens is not None and t.current_tokens is None:
        failures.append("visual tokens not measured in the current run (the baseline measured them)")
    rise = t.tokens_change
    if rise is not None and rise > tolerance.tokens_rise + EPS:
        failures.append(
            f"visual tokens rose {100 * rise:.1f}% ({t.baseline_tokens:.1f} → {t.current_tokens:.1f}), "
            f"more than the allowed {100 * tolerance.tokens_rise:.1f}%"
        )
    if t.missing_samples:
        failures.append(f"{len(t.missing_samples)} baseline sample(s) missing from the current run")
    return failures


def compare_runs(
    baseline: Run,
    current: Run,
    tolerances: Tolerances,
    baseline_samples: dict[tuple[str, int | str], Sample],
    current_samples: dict[tuple[str, int | str], Sample],
    tolerances_file: Path | None = None,
) -> Comparison:
    """Compare every task of the baseline with the current run (pure: no files read)."""
    check_comparable(baseline, current)
    check_same_targets(baseline_samples, current_samples)
    tasks = [
        compare_task(task, baseline, current, baseline_samples, current_samples, tolerances.for_task(task))
        for task in sorted(baseline.tasks)
    ]
    notes = _changed("setting", baseline.settings, current.settings)
    if baseline.calibration != current.calibration:
        notes.append(f"calibration: {baseline.calibration} → {current.calibration}")
    notes += _changed("machine", baseline.machine, current.machine)
    notes += _changed("version", baseline.versions, current.versions)
    for t in tasks:
        if t.current_score is not None and t.paired == 0:
            notes.append(f"{t.task}: no samples to pair, the sign test has nothing to count")
    extra = sorted(set(current.tasks) - set(baseline.tasks))
    return Comparison(baseline, current, tolerances_file, tasks, extra, notes)


def regress(
    baseline_path: str | Path, current_path: str | Path, tolerances_path: str | Path | None = None
) -> Comparison:
    """Load both runs (results.json and samples.jsonl) and the tolerances, and compare them."""
    baseline = load_run(baseline_path)
    current = load_run(current_path)
    check_comparable(baseline, current)
    tolerances, used = load_tolerances(tolerances_path)
    return compare_runs(baseline, current, tolerances, load_samples(baseline), load_samples(current), used)


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _tokens(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _clip(text: str, width: int = 48) -> Text:
    one_line = " ".join(text.split())
    return Text(one_line if len(one_line) <= width else one_line[: width - 1] + "…")


def _verdict(ok: bool, improved: bool = False) -> str:
    if not ok:
        return "[bold red]FAIL[/]"
    return "[green]better[/]" if improved else "[green]ok[/]"


def task_table(t: TaskComparison) -> Group:
    """A rich rendering of one task: score, the paired test, tokens, and the flipped samples."""
    status = "[bold green]PASS[/]" if t.passed else "[bold red]FAIL[/]"
    table = Table(title=f"{escape(t.task)}: {status}", title_justify="left", show_header=True)
    for column in ("check", "baseline", "current", "change", "allowed", "result"):
        table.add_column(column, justify="left" if column in ("check", "result") else "right")
    tol = t.tolerance
    if t.current_score is None:
        table.add_row("accuracy (%)", _pct(t.baseline_score), "missing", "—", "—", _verdict(False))
        return Group(table)
    delta = t.score_delta or 0.0
    accuracy_failed = any(reason.startswith("accuracy") for reason in t.failures)
    table.add_row(
        "accuracy (%)",
        _pct(t.baseline_score),
        _pct(t.current_score),
        f"{_pct(delta, signed=True)} pts",
        f"-{100 * tol.max_drop:.1f} pts",
        _verdict(not accuracy_failed, delta > EPS),
    )
    table.add_row(
        "paired samples: worse / better",
        str(t.paired),
        f"{t.worse} / {t.better}",
        f"p = {t.p_value:.2g}",
        f"alpha {tol.alpha:g}, ≥{100 * tol.min_drop:.1f} pts",
        _verdict(not accuracy_failed, t.better > t.worse),
    )
    if t.paired_delta is not None:
        mean, low, high = (100 * v for v in t.paired_delta)
        table.add_row("paired change, 95% CI (pts)", "", f"{mean:+.1f}", f"[{low:+.1f}, {high:+.1f}]", "", "")
    change = t.tokens_change
    unmeasured = t.baseline_tokens is not None and t.current_tokens is None
    table.add_row(
        "visual tokens",
        _tokens(t.baseline_tokens),
        _tokens(t.current_tokens),
        "—" if change is None else f"{100 * change:+.1f}%",
        f"+{100 * tol.tokens_rise:.1f}%",
        _verdict(False) if unmeasured else "[dim]not measured[/]" if change is None
        else _verdict(change <= tol.tokens_rise + EPS, change < -EPS),
    )  # fmt: skip
    if t.missing_samples:
        shown = ", ".join(map(str, t.missing_samples[:SHOWN_FLIPS]))
        more = f" and {len(t.missing_samples) - SHOWN_FLIPS} more" if len(t.missing_samples) > SHOWN_FLIPS else ""
        table.add_row("samples missing", str(t.paired + len(t.missing_samples)), str(t.paired), "", "0",
                      _verdict(False))  # fmt: skip
        table.caption = f"missing doc_ids: {escape(shown)}{more}"
        table.caption_justify = "left"
    parts: list[Any] = [table]
    if t.flips:
        flips = Table(title=f"{escape(t.task)}: flipped samples", title_justify="left", show_header=True)
        for column in ("doc_id", "target", "baseline response", "current response", "score"):
            flips.add_column(column, justify="right" if column in ("doc_id", "score") else "left")
        for flip in t.flips[:SHOWN_FLIPS]:
            flips.add_row(
                Text(str(flip.doc_id)),
                _clip(flip.target),
                _clip(flip.baseline_response),
                _clip(flip.current_response),
                f"{flip.baseline_score:g} → {flip.current_score:g}",
            )
        if len(t.flips) > SHOWN_FLIPS:
            flips.caption = f"… and {len(t.flips) - SHOWN_FLIPS} more"
            flips.caption_justify = "left"
        parts.append(flips)
    return Group(*parts)


def print_comparison(comparison: Comparison, console: Console) -> None:
    """The readable diff: a header, one table per task, notes, and a verdict naming the failed tasks."""
    b, c = comparison.baseline, comparison.current
    console.print(f"baseline {escape(str(b.root))} · current {escape(str(c.root))}")
    limit = "all samples" if b.limit is None else f"limit {b.limit}"
    source = escape(str(comparison.tolerances_file)) if comparison.tolerances_file else "built-in defaults"
    console.print(f"model {escape(b.model)} · method {escape(b.spec)} · {limit} · tolerances: {source}")
    for t in comparison.tasks:
        console.print()
        console.print(task_table(t))
    notes = list(comparison.notes)
    if comparison.extra_tasks:
        notes.append(f"only in the current run (not compared): {', '.join(comparison.extra_tasks)}")
    if notes:
        console.print()
        for note in notes:
            console.print(f"[dim]note: {escape(note)}[/]")
    console.print()
    if comparison.passed:
        console.print(f"[bold green]no regression[/] in {len(comparison.tasks)} task(s)")
        return
    failed = comparison.failed
    console.print(f"[bold red]REGRESSION[/] in {len(failed)} of {len(comparison.tasks)} task(s):")
    for t in failed:
        for reason in t.failures:
            console.print(f"  {escape(t.task)}: {escape(reason)}")
