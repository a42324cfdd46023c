"""`tokcomp bench-md`: BENCHMARKS.md from bench reports; verdicts follow the numbers, bad input is refused."""

from __future__ import annotations

import json
import sys

import pytest
from cli_runner import run_tokcomp as _run

from tokcomp.benchmark.benchmarks_md import CASES, Target, evaluate, load_report, render
from tokcomp.cli import main
from tokcomp.errors import TokcompError


def _rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the Markdown table rows whose first cell is ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    """A real report of the tiny model with DyMU (low budget), written by the bench command."""
    out = tmp_path_factory.mktemp("bench") / "dymu-low.json"
    argv = ["bench", "--model", "tiny-llava", "--method", "dymu-low", "--input", "image", "--repeat", "1",
            "--warmup", "0", "--max-new-tokens", "2", "--no-memory", "--out", str(out)]  # fmt: skip
    old, sys.argv = sys.argv, ["tokcomp", *argv]  # module-scoped, so without the capsys-based runner
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    assert exit_info.value.code == 0
    return json.loads(out.read_text())


def _with_ratio(report: dict, metric: str, ratio: float) -> dict:
    """A copy of ``report`` whose ``metric`` has the method at ``ratio`` times the full value."""
    copy = json.loads(json.dumps(report))
    entry = copy["metrics"][metric]
    entry["method"] = entry["full"] * ratio
    entry["ratio"] = ratio
    return copy


def test_markdown_has_machine_command_and_tables(tiny_report, tmp_path, capsys):
    path = tmp_path / "dymu-low.json"
    path.write_text(json.dumps(tiny_report))
    out = tmp_path / "BENCHMARKS.md"
    code, _, err = _run(["bench-md", str(path), "--out", str(out)], capsys)
    assert code == 0, err
    text = out.read_text()
    for heading in ("# Benchmarks", "## Machine", "## Summary", "## `dymu-low`: dymu on tiny-llava, input image"):
        assert heading in text
    assert tiny_report["command"].startswith("tokcomp bench --model tiny-llava")
    assert tiny_report["command"] in text
    assert _rows(text, "CPU")[0][1] == tiny_report["machine_info"]["cpu"]
    assert _rows(text, "torch")[0][1] == tiny_report["machine_info"]["torch"]
    assert _rows(text, "GPU")[0][1] == "none (CPU run)"
    assert len(_rows(text, "`dymu-low`")) == len(CASES["dymu-low"].targets)  # the summary
    for name in tiny_report["metrics"]:
        assert len(_rows(text, f"`{name}`")) == 1, name  # every metric in the full table
    assert "measured prefill / decoder layers run" in text
    assert not list(tmp_path.glob(".BENCHMARKS.md.*"))  # no temporary file left


def test_met_column_follows_the_numbers(tiny_report):
    limits = {t.label: t.limit for t in CASES["dymu-low"].targets}
    for ratio, verdict in ((0.5, "yes"), (0.9, "**no**")):
        report = _with_ratio(tiny_report, "vision_ms", ratio)
        row = _rows(render([("dymu-low", report)]), "vision encoder time")[0]
        assert row[4] == f"{ratio:.3f}×" and row[5] == f"≤ {limits['vision encoder time']:g}×"
        assert row[6] == verdict
    # every verdict agrees with method / full of the metric it names
    for check in evaluate(tiny_report, CASES["dymu-low"].targets):
        metrics = tiny_report["metrics"]
        expected = metrics[check.metric]["method"] / metrics[check.full_metric]["full"]
        assert check.ratio == pytest.approx(expected)
        assert check.met == (expected <= check.target.limit)


def test_overhead_is_measured_against_the_full_prefill(tiny_report):
    target = Target("own work", ("method_overhead_ms",), 0.05, against=("prefill_whole_model_ms", "prefill_ms"))
    (check,) = evaluate(tiny_report, (target,))
    assert check.full_metric == "prefill_ms"  # the tiny model runs all its layers: nothing extrapolated
    report = json.loads(json.dumps(tiny_report))
    report["metrics"]["prefill_whole_model_ms"] = {"full": 1e9, "method": 1.0, "ratio": 0.0, "unit": "ms",
                                                   "note": "extrapolated: test"}  # fmt: skip
    (check,) = evaluate(report, (target,))
    assert check.full_metric == "prefill_whole_model_ms" and check.met
    assert "(extrapolated)" in _rows(render([("dymu-low", report)]), "`dymu-low`")[3][2]


def test_reports_of_other_cases_get_no_targets(tiny_report):
    text = render([("my-run", tiny_report)])
    assert "## Summary" not in text and "## `my-run`" in text
    assert "Cases with targets but no report here" in text


HEAD = '{"model": "m", "method": {}, "input": "image", "metrics": '


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such benchmark report"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a `tokcomp bench` report"),
        (HEAD + '{"x": {"full": "a", "method": 1}}}', "metric 'x' needs numeric"),
        (HEAD + '{"x": {"full": 1, "method": 1}}}', "needs one of the metrics"),
    ],
)
def test_bad_reports_give_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "dymu-low.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "BENCHMARKS.md"
    code, stdout, err = _run(["bench-md", str(path), "--out", str(out)], capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_no_reports_is_an_error(capsys):
    code, _, err = _run(["bench-md"], capsys)
    assert code == 2 and err.startswith("error: no reports given")


def test_load_report_checks_before_rendering(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(HEAD + "{}}")
    with pytest.raises(TokcompError, match="empty"):
        load_report(path)
