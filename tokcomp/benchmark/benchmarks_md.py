"""``BENCHMARKS.md`` from the JSON reports ``tokcomp bench`` writes (``make benchmarks``).

A report's file name (without ``.json``) names its case; the cases in ``CASES`` carry the project's
targets, each a bound on a method/full ratio, and the "met?" column is computed from the numbers.
Other reports are rendered without targets. Nothing here measures anything: every number comes from
the reports, and the machine described is the one the reports were measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokcomp.errors import TokcompError

REQUIRED = ("model", "method", "input", "metrics")


@dataclass(frozen=True)
class Target:
    """``method / full`` of the first of ``metrics`` the report has must be at most ``limit``.

    With ``against``, the method's value is divided by the *full* value of that metric instead
    (the methods' own work against the uncompressed prefill)."""

    label: str
    metrics: tuple[str, ...]
    limit: float
    against: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    setting: str  # what the targets were set for
    targets: tuple[Target, ...]


OVERHEAD = Target(
    "methods' own work (matching, selection, probes) / uncompressed LLM prefill",
    ("method_overhead_ms",), 0.05, against=("prefill_whole_model_ms", "prefill_ms"),
)  # fmt: skip
PREFILL = ("prefill_ms",)  # the whole-model extrapolation has the same ratio
CASES: dict[str, Case] = {
    "dymu-low": Case("DyMU at the low budget on LLaVA-1.5-7B, one image", (
        Target("vision encoder time", ("vision_ms",), 0.70),
        Target("LLM prefill per decoder layer", ("prefill_per_layer_ms",), 0.40),
        Target("time to first token", ("ttft_whole_model_ms", "ttft_ms"), 0.45),
        OVERHEAD,
    )),
    "dycoke": Case("DyCoke (K=0.7) on LLaVA-OneVision-0.5B, 32 frames", (
        Target("LLM prefill", PREFILL, 0.60),
        OVERHEAD,
    )),
    # VidCom2 keeps a quarter of the video's tokens before the LLM: a bound below DyCoke's (which keeps 30 %
    # of all but every fourth frame), with room for the prompt and the per-frame rounding
    "vidcom2": Case("VidCom2 (25 % of the tokens) on LLaVA-OneVision-0.5B, 32 frames", (
        Target("LLM prefill", PREFILL, 0.40),
        OVERHEAD,
    )),
    # FastVID keeps a quarter of every frame's tokens: VidCom2's bound (the same share of the video)
    "fastvid": Case("FastVID (25 % of every frame) on LLaVA-OneVision-0.5B, 32 frames", (
        Target("LLM prefill", PREFILL, 0.40),
        OVERHEAD,
    )),
    # HoliTom keeps a quarter of the video before the LLM and merges half of it away at 18/28 of the depth
    # (here layer 3 of the 4 run): VidCom2's bound, which its outer stage alone meets
    "holitom": Case("HoliTom (25 % of the video, half merged inside the LLM) on LLaVA-OneVision-0.5B, 32 frames", (
        Target("LLM prefill", PREFILL, 0.40),
        OVERHEAD,
    )),
    "dycoke-evict": Case("DyCoke (K=0.7, evict mode) on LLaVA-OneVision-0.5B, 32 frames", (
        Target("LLM prefill", PREFILL, 0.60),
        Target("KV cache at the end", ("kv_cache_bytes_whole_model", "kv_cache_bytes"), 0.55),
        OVERHEAD,
    )),
    "adaptive-20": Case("adaptive pruning at rho=0.2 on 4 images", (
        Target("LLM prefill", PREFILL, 0.35),
        OVERHEAD,
    )),
    # FastV's paper setting; the cut layers run on the kept half of the image, so the whole model's
    # prefill (2 full layers + 30 shortened ones of LLaMA-7B) should fall well below two thirds
    "fastv": Case("FastV (K=2, R=0.5) on LLaVA-1.5-7B, one image", (
        Target("LLM prefill, whole model (32 layers)", ("prefill_whole_model_ms",), 0.65),
        OVERHEAD,
    )),
    # DART's paper setting keeps 128 of 576 tokens from layer 2 on: about a third of the plain prefill
    # (2 full layers + 30 at a quarter of the length), with no attention weights to compute
    "dart": Case("DART (K=2, R=0.222, 4+4 pivots) on LLaVA-1.5-7B, one image", (
        Target("LLM prefill, whole model (32 layers)", ("prefill_whole_model_ms",), 0.45),
        OVERHEAD,
    )),
    # PyramidDrop at lambda 0.5 in four equal stages: the visual part of a layer's work falls to 1/2, 1/4, 1/8
    # (their mean 0.47); the stages are quarters of the depth in the 4 layers run as in the real 32
    "pyramiddrop": Case("PyramidDrop (lambda 0.5, four stages) on LLaVA-1.5-7B, one image", (
        Target("LLM prefill, whole model (32 layers)", ("prefill_whole_model_ms",), 0.60),
        OVERHEAD,
    )),
    # CDPruner before the LLM at DART's budget: the adaptive row's prefill target, with its DPP inside 5 %
    "cdpruner": Case("CDPruner (128 of 576 tokens, theta 0.5) on LLaVA-1.5-7B, one image", (
        Target("LLM prefill", PREFILL, 0.35),
        OVERHEAD,
    )),
    # Qwen2.5-VL: the LLaVA rows' targets, for the same methods and inputs on the other family
    "qwen-adaptive-20": Case("adaptive pruning at rho=0.2 on 4 images, Qwen2.5-VL-7B", (
        Target("LLM prefill", PREFILL, 0.35),
        OVERHEAD,
    )),
    # the LLaVA row's targets: the low budget keeps about the same share of tokens on both (15.6 %)
    "qwen-dymu-low": Case("DyMU at the low budget on Qwen2.5-VL-7B, 4 images at their own resolution", (
        Target("vision encoder time", ("vision_ms",), 0.70),
        Target("LLM prefill per decoder layer", ("prefill_per_layer_ms",), 0.40),
        Target("time to first token", ("ttft_whole_model_ms", "ttft_ms"), 0.45),
        OVERHEAD,
    )),
    "qwen-dycoke": Case("DyCoke (K=0.7) on Qwen2.5-VL-7B, 16 frames (8 temporal patches)", (
        Target("LLM prefill", PREFILL, 0.60),
        OVERHEAD,
    )),
}  # fmt: skip


@dataclass(frozen=True)
class Check:
    """One target evaluated on one report."""

    target: Target
    metric: str
    full_metric: str
    full: float
    method: float
    ratio: float | None

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio <= self.target.limit


def load_report(path: str | Path) -> dict:
    """A ``tokcomp bench`` JSON report, checked enough to render; TokcompError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TokcompError(f"{path}: no such benchmark report (run `make benchmarks` or `tokcomp bench --out`)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokcompError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokcompError(f"cannot read {path}: {exc}") from None
    if not isinstance(report, dict) or any(key not in report for key in REQUIRED):
        raise TokcompError(f"{path} is not a `tokcomp bench` report (needs {', '.join(REQUIRED)})")
    metrics = report["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise TokcompError(f"{path}: 'metrics' is empty or not an object")
    for name, entry in metrics.items():
        if not isinstance(entry, dict) or not all(_is_number(entry.get(k)) for k in ("full", "method")):
            raise TokcompError(f"{path}: metric '{name}' needs numeric 'full' and 'method' values")
    return report


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first(metrics: dict, names: tuple[str, ...], where: str, label: str) -> str:
    for name in names:
        if name in metrics:
            return name
    raise TokcompError(f"{where}: the target '{label}' needs one of the metrics {', '.join(names)}")


def evaluate(report: dict, targets: tuple[Target, ...], where: str = "report") -> list[Check]:
    """The targets' ratios and verdicts, computed from the report's medians."""
    metrics = report["metrics"]
    checks = []
    for target in targets:
        name = _first(metrics, target.metrics, where, target.label)
        full_name = _first(metrics, target.against, where, target.label) if target.against else name
        full, method = float(metrics[full_name]["full"]), float(metrics[name]["method"])
        checks.append(Check(target, name, full_name, full, method, method / full if full else None))
    return checks


# --- formatting ------------------------------------------------------------------------------------
def kind(entry: dict) -> str:
    """measured | extrapolated | analytic, from the label the report gives the metric."""
    note = entry.get("note", "")
    for word in ("extrapolated", "analytic"):
        if note.startswith(word):
            return word
    return "measured"


def fmt_value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:,.2f} ms" if abs(value) < 100 else f"{value:,.0f} ms"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB" if abs(value) >= 2**20 else f"{value / 2**10:,.1f} KiB"
    if unit == "FLOPs":
        return f"{value / 1e12:,.2f} TFLOP" if abs(value) >= 1e12 else f"{value / 1e9:,.2f} GFLOP"
    if unit in ("tokens", "positions"):
        return f"{value:,.0f}"
    return f"{value:,.4g} {unit}".strip()


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}×"


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]], right: tuple[int, ...] = ()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


MACHINE_FIELDS = [("cpu", "CPU"), ("logical_cpus", "logical CPUs"), ("torch_threads", "torch threads (timed runs)"),
                  ("gpu", "GPU"), ("torch", "torch"), ("transformers", "transformers"), ("python", "Python"),
                  ("platform", "OS")]  # fmt: skip


def machine_section(named: list[tuple[str, dict]]) -> list[str]:
    """One column per distinct machine the reports were measured on."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for case, report in named:
        info = report.get("machine_info") or {"cpu": report.get("machine", "not recorded")}
        key = json.dumps(info, sort_keys=True)
        groups.setdefault(key, (info, []))[1].append(case)
    lines = ["## Machine", ""]
    if len(groups) > 1:
        lines += ["The cases ran on different machines.", ""]
    columns = list(groups.values())
    header = ["", *(", ".join(cases) for _, cases in columns)] if len(columns) > 1 else ["", "value"]
    rows = []
    for key, label in MACHINE_FIELDS:
        values = [info.get(key) for info, _ in columns]
        if key == "gpu":
            values = [v or ("none (CPU run)" if info.get("device", "cpu") != "cuda" else "?") for v, (info, _) in
                      zip(values, columns, strict=True)]  # fmt: skip
        if any(v is not None for v in values):
            rows.append([label, *("not recorded" if v is None else v for v in values)])
    lines += _table(header, rows)
    if any("peak_rss_bytes" in report["metrics"] for _, report in named):
        lines += ["", "Peak RSS is measured in separate fresh processes that run with 1 torch thread."]
    return lines


def _setup(report: dict) -> list[str]:
    """What ran: model, layers, method settings, repeats, tool and date."""
    method = report["method"] if isinstance(report["method"], dict) else {"method": str(report["method"])}
    settings = ", ".join(f"{k}={_short(v)}" for k, v in method.items() if k != "method") or "defaults"
    layers = f"LLM layers run: {report.get('llm_layers_run', '?')} of {report.get('llm_layers_real', '?')}"
    if "vision_layers_run" in report:
        layers += f"; encoder layers run: {report['vision_layers_run']} of {report['vision_layers_real']}"
    items = [
        f"model `{report['model']}`, input `{report['input']}`",
        layers,
        f"method `{method.get('method', '?')}` ({settings})",
        f"medians of {report.get('repeat', '?')} measured runs each after {report.get('warmup', '?')} warm-up, "
        f"{report.get('new_tokens', '?')} new tokens per run",
        f"{report.get('tool', 'tokcomp')}, {report.get('date', 'date not recorded')}",
    ]
    return [f"- {item}" for item in items]


def _short(value: object) -> str:
    """A setting for a bullet list: long lists (per-layer thresholds) as their length."""
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values]"
    return str(value)


def _source(metrics: dict, check: Check) -> str:
    """Which metric(s) a verdict reads, and how they were obtained."""
    if check.full_metric == check.metric:
        return f"`{check.metric}` ({kind(metrics[check.metric])})"
    return (
        f"method `{check.metric}` ({kind(metrics[check.metric])}) / "
        f"full `{check.full_metric}` ({kind(metrics[check.full_metric])})"
    )


def _target_rows(metrics: dict, checks: list[Check]) -> list[list[object]]:
    rows = []
    for c in checks:
        full = fmt_value(c.full, metrics[c.full_metric].get("unit", ""))
        method = fmt_value(c.method, metrics[c.metric].get("unit", ""))
        limit = f"≤ {c.target.limit:g}×"
        rows.append([c.target.label, _source(metrics, c), full, method, fmt_ratio(c.ratio), limit, verdict(c.met)])
    return rows


def case_section(case: str, report: dict, checks: list[Check]) -> list[str]:
    """A case: its command, what ran, the targets with their verdicts, and every metric."""
    method = report["method"].get("method", "?") if isinstance(report["method"], dict) else report["method"]
    lines = [f"## `{case}`: {method} on {report['model']}, input {report['input']}", ""]
    command = report.get("command")
    lines += ["```bash", command, "```", ""] if command else ["Command: not recorded in the report.", ""]
    lines += [*_setup(report), ""]
    metrics = report["metrics"]
    if checks:
        lines += [f"Targets, set for {CASES[case].setting} (ratio = method / full; met when at most the target):", ""]
        header = ["target", "metric", "full", "method", "ratio", "target", "met?"]
        lines += [*_table(header, _target_rows(metrics, checks), (2, 3, 4, 5)), ""]
    rows = [[f"`{n}`", fmt_value(e["full"], e.get("unit", "")), fmt_value(e["method"], e.get("unit", "")),
             fmt_ratio(e.get("ratio")), kind(e), e.get("note", "")] for n, e in metrics.items()]  # fmt: skip
    lines += ["All measurements (medians):", ""]
    return [*lines, *_table(["metric", "full", "method", "ratio", "how", "note"], rows, (1, 2, 3)), ""]


INTRO = """\
Written by `make benchmarks` with `tokcomp bench-md` from the JSON reports of `tokcomp bench` (edit the
commands in the Makefile and rerun; do not edit this file by hand). Each case runs the plain model and
the method on the same request in one process, alternating which goes first, after warm-up runs; every
time is the median of the repeats, and every ratio is method / full from the same run.

The models are the released models' layer shapes with random weights (`*-shape` presets). They may run
only some decoder or encoder layers: per-layer numbers are measured; whole-model times and KV bytes
marked *extrapolated* scale the measured per-layer values to the real layer count (the label in each
row says how); FLOPs are *analytic*, for the real layer counts and the token counts the run had. Random
weights make token counts of content-dependent methods (DyMU, adaptive) differ from a trained model's.

The `vllm-*` cases are vLLM on CPU with tokcomp's plugin (`make bench-vllm`, `tools/vllm/bench.py`): one
process holds the plain engine and one with `video_pruning_rate`, whose selection is vLLM's EVS or a
plugin method; each request gets a video of its own (same shape, so no prefix or encoder cache serves
it), configurations in a rotating order, and the ratios are configuration / plain from that run."""


def render(named: list[tuple[str, dict]]) -> str:
    """The whole document for (case, report) pairs, in the order given."""
    if not named:
        raise TokcompError("no benchmark reports given")
    evaluated = [(case, report, evaluate(report, CASES[case].targets, case) if case in CASES else [])
                 for case, report in named]  # fmt: skip
    lines = ["# Benchmarks", "", INTRO, ""]
    lines += [*machine_section(named), ""]
    summary = [[f"`{case}`", c.target.label, _source(report["metrics"], c), fmt_ratio(c.ratio),
                f"≤ {c.target.limit:g}×", verdict(c.met)]
               for case, report, checks in evaluated for c in checks]  # fmt: skip
    if summary:
        met = sum(1 for _, _, checks in evaluated for c in checks if c.met)
        lines += ["## Summary", "", f"{met} of {len(summary)} targets met.", ""]
        lines += [*_table(["case", "target", "metric", "ratio", "target", "met?"], summary, (3, 4)), ""]
    missing = [case for case in CASES if case not in dict(named)]
    if missing:
        lines += [f"Cases with targets but no report here: {', '.join(f'`{c}`' for c in missing)}.", ""]
    for case, report, checks in evaluated:
        lines += case_section(case, report, checks)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_benchmarks(paths: list[str | Path], out: str | Path | None) -> str:
    """Read the reports (the case is each file's stem), render, and write ``out`` atomically if given."""
    named = [(Path(p).stem, load_report(p)) for p in paths]
    text = render(named)
    if out is not None:
        from tokcomp.io import atomic_write_text

        atomic_write_text(out, text)
    return text
