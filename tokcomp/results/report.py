"""`tokcomp report`: runs side by side, each against the uncompressed run of the same task and model."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.markup import escape
from rich.table import Table

from tokcomp.errors import TokcompError
from tokcomp.results.runs import Run
from tokcomp.visualize import save_png

FORMATS = ("table", "md", "csv", "html")
SUFFIX_FORMATS = {".md": "md", ".markdown": "md", ".csv": "csv", ".html": "html", ".htm": "html"}
KEYS = ["task", "model", "method"]
# Timings compared with the uncompressed run: (column, ratio column).
TIMINGS = [("prefill_ms", "prefill_ratio"), ("ttft_ms", "ttft_ratio"), ("decode_ms_per_token", "decode_ratio")]
# The numeric table (CSV columns), in order.
COLUMNS = [
    "task",
    "model",
    "method",
    "method_name",
    "metric",
    "samples",
    "accuracy_pct",
    "accuracy_ci_low_pct",
    "accuracy_ci_high_pct",
    "accuracy_vs_none_pct",
    "delta_vs_none_pts",
    "delta_ci_low_pts",
    "delta_ci_high_pts",
    "agreement_pct",
    "tokens_mean",
    "tokens_std",
    "tokens_full",
    "tokens_pct_full",
    "prefill_ratio",
    "ttft_ratio",
    "decode_ratio",
    "timing",
    "prefill_ms",
    "ttft_ms",
    "decode_ms_per_token",
    "run",
]
MISSING = "—"


def resolve_format(fmt: str | None, out_path: Path | None) -> str:
    """The output format: as given, else from ``--out``'s suffix, else ``table``."""
    if fmt is None:
        if out_path is None:
            return "table"
        found = SUFFIX_FORMATS.get(out_path.suffix.lower())
        if found is None:
            raise TokcompError(f"cannot tell the format from {out_path.name}; add --format md, csv or html")
        return found
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise TokcompError(f"unknown format '{fmt}' (use {', '.join(FORMATS)})")
    if fmt == "table" and out_path is not None:
        raise TokcompError("--out writes md, csv or html; the table format only prints")
    return fmt


def _runs_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (run, task) with the raw numbers."""
    rows = []
    for run in runs:
        for task in run.tasks.values():
            rows.append(
                {
                    "task": task.name,
                    "model": run.model,
                    "method": run.spec,
                    "method_name": run.method_name,
                    "metric": task.metric,
                    "samples": task.samples,
                    "accuracy_pct": 100.0 * task.score,
                    "tokens_mean": task.tokens_mean,
                    "tokens_std": task.tokens_std,
                    "tokens_full": task.tokens_full,
                    "prefill_ms": task.prefill_ms,
                    "ttft_ms": task.ttft_ms,
                    "decode_ms_per_token": task.decode_ms_per_token,
                    "_paired": task.paired_ratios,
                    "_machine": machine_fingerprint(run.machine),
                    "run": str(run.root),
                }
            )
    frame = pd.DataFrame(rows)
    numeric = ["accuracy_pct", "tokens_mean", "tokens_std", "tokens_full", *(c for c, _ in TIMINGS)]
    frame[numeric] = frame[numeric].astype("float64")
    frame["samples"] = frame["samples"].astype("Int64")
    return frame


# What makes two runs' timings comparable at all: the same CPU (or GPU), kernels, threads and torch.
FINGERPRINT_KEYS = ("cpu", "gpu", "aten_capability", "torch_threads", "torch", "device")


def machine_fingerprint(machine: dict) -> str:
    """The parts of a run's recorded machine that timings depend on, as one string ("" if unrecorded)."""
    return "|".join(str(machine.get(key, "")) for key in FINGERPRINT_KEYS) if machine else ""


def _refuse_duplicates(frame: pd.DataFrame, keys: list[str], what: str) -> None:
    twice = frame[frame.duplicated(keys, keep=False)]
    if not twice.empty:
        first = twice.iloc[0]
        where = twice[(twice[keys] == first[keys]).all(axis=1)]["run"].tolist()
        label = " / ".join(str(first[k]) for k in keys)
        raise TokcompError(f"{what} {label} appears in more than one run ({', '.join(where)}); give one of them")


def _ratio(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    """numerator / denominator, blank (NaN) where the denominator is missing or zero."""
    return (numerator / denominator.where(denominator > 0)).astype("float64")


def build_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The report as numbers: one row per (task, model, method), sorted, with ratios to method ``none``."""
    if not runs:
        raise TokcompError("no results given")
    frame = _runs_frame(runs)
    _refuse_duplicates(frame, KEYS, "task / model / method")
    plain = frame[frame["method_name"] == "none"]
    _refuse_duplicates(plain, ["task", "model"], "the uncompressed run of task / model")
    base = plain[["task", "model", "accuracy_pct", "_machine", *(c for c, _ in TIMINGS)]]
    merged = frame.merge(base, on=["task", "model"], how="left", suffixes=("", "_none"))
    # timings of separate runs compare only from the same machine; same-run (paired) ratios always do
    same_machine = (merged["_machine"] == merged["_machine_none"]) & (merged["_machine"] != "")
    merged["accuracy_vs_none_pct"] = 100.0 * _ratio(merged["accuracy_pct"], merged["accuracy_pct_none"])
    merged["tokens_pct_full"] = 100.0 * _ratio(merged["tokens_mean"], merged["tokens_full"])
    for column, ratio in TIMINGS:
        merged[ratio] = _ratio(merged[column], merged[f"{column}_none"]).where(same_machine)
        paired = merged["_paired"].map(lambda p, c=column: p.get(c) if isinstance(p, dict) else None)
        merged[ratio] = paired.astype("float64").fillna(merged[ratio])  # same-run ratios win
    across = same_machine.map({True: "across runs", False: "other machine"})
    merged["timing"] = merged["_paired"].map(lambda p: "same run" if isinstance(p, dict) else None).fillna(across)
    merged.loc[merged["method_name"] == "none", "timing"] = "—"
    _add_statistics(merged, runs)
    merged["_compressed"] = merged["method_name"] != "none"
    merged = merged.sort_values(
        ["task", "model", "_compressed", "tokens_mean", "method"],
        ascending=[True, True, True, False, True],
        na_position="last",
        kind="stable",
    )
    return merged[COLUMNS].reset_index(drop=True)


def _add_statistics(frame: pd.DataFrame, runs: Sequence[Run]) -> None:
    """Per row: the accuracy's Wilson 95 % interval, and against the plain run of its task and model the
    paired difference with its bootstrap interval and the share of identical answers (from samples.jsonl)."""
    from tokcomp.results.runs import load_samples
    from tokcomp.stats import agreement, paired_difference_interval, wilson_interval

    samples = {str(run.root): load_samples(run) for run in runs if (run.root / "samples.jsonl").is_file()}
    plain = {(r.task, r.model): r.run for r in frame.itertuples() if r.method_name == "none"}
    columns: dict[str, list[float]] = {c: [] for c in ("low", "high", "delta", "dlow", "dhigh", "agree")}
    for row in frame.itertuples():
        mine = {key[1]: s for key, s in samples.get(row.run, {}).items() if key[0] == row.task}
        low, high = wilson_interval(row.accuracy_pct / 100, len(mine)) if mine else (math.nan, math.nan)
        base = {key[1]: s for key, s in samples.get(plain.get((row.task, row.model), ""), {}).items()
                if key[0] == row.task}  # fmt: skip
        paired = [doc for doc in mine if doc in base] if row.method_name != "none" else []
        delta = paired_difference_interval([base[d].score for d in paired], [mine[d].score for d in paired])
        agree = agreement([base[d].response for d in paired], [mine[d].response for d in paired])
        for key, value in zip(columns, (low, high, *delta, agree), strict=True):
            columns[key].append(100.0 * value)
    frame["accuracy_ci_low_pct"], frame["accuracy_ci_high_pct"] = columns["low"], columns["high"]
    frame["delta_vs_none_pts"], frame["delta_ci_low_pts"] = columns["delta"], columns["dlow"]
    frame["delta_ci_high_pts"], frame["agreement_pct"] = columns["dhigh"], columns["agree"]


def mismatched_samples(table: pd.DataFrame) -> list[str]:
    """Rows compared with an uncompressed run that scored a different number of samples."""
    plain = table[table["method_name"] == "none"].set_index(["task", "model"])["samples"]
    notes = []
    for row in table[table["method_name"] != "none"].itertuples():
        key = (row.task, row.model)
        if key in plain.index and not pd.isna(row.samples) and not pd.isna(plain[key]) and row.samples != plain[key]:
            notes.append(
                f"{row.task} / {row.model} / {row.method} scored {row.samples} samples, its uncompressed run "
                f"{plain[key]}: the ratios compare different samples"
            )
    return notes


def _fmt(value: object, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return MISSING
    return pattern.format(value)


def _interval(low: float, high: float, pattern: str) -> str:
    if pd.isna(low) or pd.isna(high):
        return MISSING
    return f"[{pattern.format(low)}, {pattern.format(high)}]"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The report as text cells: accuracy in %, tokens mean ± std, ratios as ×, blanks as —."""

    def tokens(row: pd.Series) -> str:
        if pd.isna(row["tokens_mean"]):
            return MISSING
        if pd.isna(row["tokens_std"]):
            return f"{row['tokens_mean']:.1f}"
        return f"{row['tokens_mean']:.1f} ± {row['tokens_std']:.1f}"

    shown = pd.DataFrame(
        {
            "task": table["task"],
            "model": table["model"],
            "method": table["method"],
            "n": [_fmt(v, "{}") for v in table["samples"]],
            "accuracy": [_fmt(v, "{:.1f}%") for v in table["accuracy_pct"]],
            "95% CI": [_interval(lo, hi, "{:.1f}") for lo, hi in zip(table["accuracy_ci_low_pct"],
                                                                    table["accuracy_ci_high_pct"], strict=True)],
            "vs none": [_fmt(v, "{:.1f}%") for v in table["accuracy_vs_none_pct"]],
            "Δ vs none (pts, 95% CI)": [
                MISSING if pd.isna(d) else f"{d:+.1f} {_interval(lo, hi, '{:+.1f}')}"
                for d, lo, hi in zip(table["delta_vs_none_pts"], table["delta_ci_low_pts"],
                                     table["delta_ci_high_pts"], strict=True)
            ],
            "agree": [_fmt(v, "{:.1f}%") for v in table["agreement_pct"]],
            "visual tokens": table.apply(tokens, axis=1) if len(table) else [],
            "% of full": [_fmt(v, "{:.1f}%") for v in table["tokens_pct_full"]],
            "prefill": [_fmt(v, "{:.2f}×") for v in table["prefill_ratio"]],
            "TTFT": [_fmt(v, "{:.2f}×") for v in table["ttft_ratio"]],
            "decode/token": [_fmt(v, "{:.2f}×") for v in table["decode_ratio"]],
            "timed": list(table["timing"]),
        }
    )
    return shown


LEFT = {"task", "model", "method"}


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned."""
    shown = display_table(table)

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in shown.columns) + " |",
        "|" + "|".join("---" if c in LEFT else "---:" for c in shown.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """The numeric table as CSV (accuracy and shares in %, ratios method/none, blanks empty)."""
    rounded = table.round(
        {
            "accuracy_pct": 2,
            "accuracy_ci_low_pct": 2,
            "accuracy_ci_high_pct": 2,
            "accuracy_vs_none_pct": 2,
            "delta_vs_none_pts": 2,
            "delta_ci_low_pts": 2,
            "delta_ci_high_pts": 2,
            "agreement_pct": 2,
            "tokens_mean": 2,
            "tokens_std": 2,
            "tokens_full": 2,
            "tokens_pct_full": 2,
            "prefill_ratio": 4,
            "ttft_ratio": 4,
            "decode_ratio": 4,
            "prefill_ms": 3,
            "ttft_ms": 3,
            "decode_ms_per_token": 3,
        }
    )
    return rounded.to_csv(index=False, lineterminator="\n")


def to_html(table: pd.DataFrame, title: str = "tokcomp report") -> str:
    """A standalone HTML page holding the table."""
    body = display_table(table).to_html(index=False, escape=True, border=0, classes="tokcomp-report")
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em}"
        "table{border-collapse:collapse}th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}"
        "th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}"
    )
    return (
        '<!doctype html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def rich_table(table: pd.DataFrame) -> Table:
    """The table for a terminal: one section per task, the model in the title when there is only one."""
    shown = display_table(table)
    models = list(shown["model"].unique())
    if len(models) == 1:
        shown = shown.drop(columns="model")
    out = Table(title=escape(f"model {models[0]}" if len(models) == 1 else "tokcomp report"))
    for column in shown.columns:
        out.add_column(column, justify="left" if column in LEFT else "right")
    rows = shown.values.tolist()
    for i, row in enumerate(rows):
        last_of_task = i + 1 == len(rows) or rows[i + 1][0] != row[0]
        out.add_row(*(escape(str(cell)) for cell in row), end_section=last_of_task)
    return out


def render(table: pd.DataFrame, fmt: str) -> str:
    """The table as md, csv or html text."""
    renderers = {"md": to_markdown, "csv": to_csv, "html": to_html}
    if fmt not in renderers:
        raise TokcompError(f"unknown format '{fmt}' (use {', '.join(renderers)})")
    return renderers[fmt](table)


def save_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy against mean visual tokens, one panel per task, one labelled point per method; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(table["task"]))
    models = list(dict.fromkeys(table["model"]))
    colours = {model: plt.get_cmap("tab10")(i % 10) for i, model in enumerate(models)}
    ncols = min(3, max(1, len(tasks)))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        rows = table[(table["task"] == task) & table["tokens_mean"].notna()]
        if rows.empty:
            ax.text(0.5, 0.5, "no visual-token counts", ha="center", va="center", transform=ax.transAxes)
        widest = float((rows["tokens_mean"] + rows["tokens_std"].fillna(0)).max()) if len(rows) else 0.0
        right = 1.1 * widest if widest > 0 else 1.0
        for row in rows.itertuples():
            plain = row.method_name == "none"
            colour = "black" if plain and len(models) == 1 else colours[row.model]
            yerr = None
            if not pd.isna(row.accuracy_ci_low_pct):  # the accuracy's 95 % interval
                yerr = [[row.accuracy_pct - row.accuracy_ci_low_pct], [row.accuracy_ci_high_pct - row.accuracy_pct]]
            ax.errorbar(
                row.tokens_mean,
                row.accuracy_pct,
                xerr=None if pd.isna(row.tokens_std) else row.tokens_std,
                yerr=yerr,
                fmt="*" if plain else "o",
                markersize=13 if plain else 7,
                color=colour,
                markeredgecolor="black",
                ecolor="lightgray",
                elinewidth=1,
                zorder=3,
            )
            if plain:
                ax.axhline(row.accuracy_pct, color=colour, linestyle=":", linewidth=1, zorder=1)
            on_right = row.tokens_mean > 0.6 * right  # labels of right-hand points go to their left
            ax.annotate(
                f"{row.method} (uncompressed)" if plain else row.method,
                (row.tokens_mean, row.accuracy_pct),
                xytext=(-6 if on_right else 6, 5),
                textcoords="offset points",
                ha="right" if on_right else "left",
                fontsize=8,
            )
        ax.set_title(task)
        ax.set_xlabel("visual tokens per sample (mean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xlim(0, right)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
    if len(models) > 1:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=colours[m], markeredgecolor="black", label=m)
            for m in models
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(models), 4), frameon=False)
    fig.suptitle("accuracy (95% interval) vs. visual tokens (± std; ★ = uncompressed)")
    fig.tight_layout(rect=(0, 0.06 if len(models) > 1 else 0, 1, 1))
    return save_png(fig, path)
