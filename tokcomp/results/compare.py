"""The runs of ``make compare``: every method at matched budgets on the built-in suites.

A budget is the share of an image's visual tokens that a method lets through: into the LLM for the
methods before it, past the cut for those inside it (FastV and DART; PyramidDrop's last stage holds
the share, so its lambda is the share's cube root), per encoder view for VisionZip, ToMe and DyMU
(a token count, DyMU's from a calibration to that count), of the video for VidCom2, FastVID and HoliTom
(tc_motion only; HoliTom without its merge inside the LLM, so that the share is what the LLM gets).
PruMerge+ chooses its own count and DyCoke's TTM spares every fourth frame: they have no matched form.
``python -m tokcomp.results.compare`` prints the plan, one tab-separated line per run: label, method,
``--set`` options, tasks, and the DyMU calibration's token count (``-`` for none).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

BUDGETS = (0.111, 0.222, 0.333)  # 64, 128 and 192 of LLaVA-1.5's 576 tokens


@dataclass(frozen=True)
class CompareRun:
    label: str
    method: str
    settings: dict[str, str] = field(default_factory=dict)
    tasks: str = "tc_suites"
    calib_tokens: int | None = None  # DyMU: calibrate to this many tokens per view first


def matched_runs(patches: int, budgets: tuple[float, ...] = BUDGETS) -> list[CompareRun]:
    """The uncompressed run, then every method at every budget; ``patches`` per encoder view."""
    runs = [CompareRun("none", "none")]
    for share in budgets:
        pct, text = round(100 * share), f"{share:g}"
        tokens = max(1, round(share * patches))
        dominant = max(1, round(0.84 * tokens))  # VisionZip's 54 + 10 split of 64
        runs += [
            CompareRun(f"random-{pct}", "random", {"ratio": text}),
            CompareRun(f"divprune-{pct}", "divprune", {"ratio": text}),
            CompareRun(f"cdpruner-{pct}", "cdpruner", {"ratio": text}),
            CompareRun(f"adaptive-{pct}", "adaptive", {"rho": text}),
            CompareRun(f"visionzip-{pct}", "visionzip",
                       {"dominant": str(dominant), "contextual": str(tokens - dominant)}),
            CompareRun(f"tome-{pct}", "tome", {"budget": str(tokens)}),
            CompareRun(f"dymu-{pct}", "dymu", {}, calib_tokens=tokens),
            CompareRun(f"fastv-{pct}", "fastv", {"keep": text}),
            CompareRun(f"dart-{pct}", "dart", {"keep": text}),
            CompareRun(f"pyramiddrop-{pct}", "pyramiddrop", {"keep": f"{share ** (1 / 3):.3f}"}),
            CompareRun(f"vidcom2-{pct}", "vidcom2", {"ratio": text}, tasks="tc_motion"),
            CompareRun(f"fastvid-{pct}", "fastvid", {"ratio": text}, tasks="tc_motion"),
            CompareRun(f"holitom-{pct}", "holitom", {"ratio": text, "inner_merge": "0"}, tasks="tc_motion"),
        ]  # fmt: skip
    return runs


def plan_lines(runs: list[CompareRun]) -> list[str]:
    """One tab-separated line per run, for the Makefile's loop."""
    lines = []
    for run in runs:
        sets = " ".join(f"--set {k}={v}" for k, v in run.settings.items()) or "-"
        tokens = "-" if run.calib_tokens is None else str(run.calib_tokens)
        lines.append("\t".join([run.label, run.method, sets, run.tasks, tokens]))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=64, help="patch tokens per encoder view (tokcomp-tiny: 64)")
    args = parser.parse_args(argv)
    print("\n".join(plan_lines(matched_runs(args.patches))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
