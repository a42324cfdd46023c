"""The gate's noise study: re-run the gated methods under other numerics and with a broken DToMe.

    .venv/bin/python tools/gate_noise.py --baselines results/baselines/tokcomp-tiny --limit 40 \
        --out results/gate-noise none:tc_suites dymu-mid:tc_suites adaptive-20:tc_suites dycoke:tc_motion

Each variant runs `tokcomp eval` in a fresh process (thread counts and kernel paths are fixed at
start-up) and is compared with the stored baselines by `tokcomp regress`'s own code. Writes
``OUT/README.md`` (the table) and ``OUT/summary.json``; exits 1 when a numerics variant fails the
gate or the broken DToMe passes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKCOMP = Path(sys.executable).parent / "tokcomp"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "threads-2": ("2 threads (as the baselines)", {"OMP_NUM_THREADS": "2"}),
    "threads-1": ("1 thread", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    "avx2": ("AVX2 kernels instead of AVX-512 (ATen, oneDNN, MKL)", AVX2),
    "ulp": ("every input pixel one ulp up", {"TOKCOMP_PERTURB_INPUTS": "1"}),
}
BROKEN = "broken-dtome"


def broken_eval(argv: list[str]) -> int:
    """`tokcomp eval ARGV` with DToMe's merge summing features instead of averaging them."""
    from tokcomp.cli import main
    from tokcomp.methods import merge

    def unnormalised(x, sizes, plan):
        new_sizes = merge.merge_sum(sizes, plan).masked_fill(~plan.new_valid, 0)
        return merge.merge_sum(x * sizes[..., None].to(x.dtype), plan), new_sizes

    merge.merge_weighted = unnormalised
    sys.argv = ["tokcomp", "eval", *argv]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def evaluate(variant: str, method: str, tasks: str, limit: int, out: Path) -> None:
    args = ["--model", "tokcomp-tiny", "--method", method, "--task", tasks, "--limit", str(limit), "--out", str(out)]
    env = os.environ | (VARIANTS[variant][1] if variant in VARIANTS else {})
    command = [sys.executable, __file__, "--broken-eval", *args] if variant == BROKEN else [str(TOKCOMP), "eval", *args]
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def row(variant: str, method: str, comparison) -> dict:
    return {
        "variant": variant,
        "method": method,
        "passed": comparison.passed,
        "tasks": {
            t.task: {"worse": t.worse, "better": t.better, "delta": t.score_delta, "p": t.p_value,
                     "tokens_change": t.tokens_change, "failures": t.failures}
            for t in comparison.tasks
        },
    }  # fmt: skip


def markdown(rows: list[dict], limit: int, machine: str) -> str:
    lines = [
        "# The gate's noise study",
        "",
        f"Written by `make gate-noise` on {machine}: each gated method re-run on the same {limit} documents per",
        "task under other numerics, and compared with the stored baselines (`results/baselines/tokcomp-tiny`)",
        "by `tokcomp regress`. Cells: samples worse / better than the baseline, accuracy change in points,",
        "the sign test's p. A numerics variant must pass; the broken DToMe (merged tokens summed instead of",
        "averaged) must fail.",
        "",
        "| variant | method | task | worse / better | change (pts) | p | tokens | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {name: label for name, (label, _) in VARIANTS.items()} | {BROKEN: "broken DToMe (must fail)"}
    for r in rows:
        for task, t in r["tasks"].items():
            tokens = "—" if t["tokens_change"] is None else f"{100 * t['tokens_change']:+.1f}%"
            verdict = "FAIL: " + "; ".join(t["failures"]) if t["failures"] else "pass"
            delta = "—" if t["delta"] is None else f"{100 * t['delta']:+.1f}"
            lines.append(
                f"| {labels[r['variant']]} | {r['method']} | {task} | {t['worse']} / {t['better']} | {delta} "
                f"| {t['p']:.2g} | {tokens} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--broken-eval"]:
        return broken_eval(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baselines", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("runs", nargs="+", help="method:tasks, as the Makefile's GATE_RUNS")
    args = parser.parse_args(argv)
    from tokcomp.io import atomic_write_text
    from tokcomp.machine import machine_description
    from tokcomp.results.regress import regress

    runs = [run.split(":", 1) for run in args.runs]
    plan = [(variant, method, tasks) for variant in VARIANTS for method, tasks in runs]
    plan += [(BROKEN, method, tasks) for method, tasks in runs if method.startswith(("dymu", "dtome"))]
    rows, status = [], 0
    for variant, method, tasks in plan:
        out = args.out / variant / method
        evaluate(variant, method, tasks, args.limit, out)
        comparison = regress(args.baselines / method, out)
        rows.append(row(variant, method, comparison))
        if comparison.passed == (variant == BROKEN):
            status = 1
        print(f"{variant:12s} {method:12s} {'pass' if comparison.passed else 'FAIL'}", flush=True)
    atomic_write_text(args.out / "summary.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(args.out / "README.md", markdown(rows, args.limit, machine_description()))
    print(f"wrote {args.out / 'README.md'}" + ("" if status == 0 else " (the gate misjudged a variant)"))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
