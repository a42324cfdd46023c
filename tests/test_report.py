"""`tokcomp report` on synthetic run folders: ratios, sorting, the four formats and the plot."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser

import pytest
from cli_runner import run_tokcomp as run
from runs_helper import task_entry, write_run

from tokcomp.errors import TokcompError
from tokcomp.results.report import build_table, display_table, resolve_format
from tokcomp.results.runs import load_run


@pytest.fixture
def runs(tmp_path):
    """An uncompressed run and two methods on two tasks, plus a model with no uncompressed run."""
    none = write_run(
        tmp_path / "none",
        {"tc_shapes": task_entry(0.80, full=400, prefill_ms=10, ttft_ms=20, decode_ms=2),
         "tc_text": task_entry(0.50, full=300, prefill_ms=8, ttft_ms=16, decode_ms=2)},
    )  # fmt: skip
    mid = write_run(
        tmp_path / "dymu-mid",
        {"tc_shapes": task_entry(0.76, full=400, mean=130, std=20, prefill_ms=4, ttft_ms=10, decode_ms=1.5),
         "tc_text": task_entry(0.45, full=300, mean=100, std=15, prefill_ms=4, ttft_ms=8, decode_ms=2)},
        spec="dymu-mid",
    )  # fmt: skip
    low = write_run(
        tmp_path / "dymu-low",
        {"tc_shapes": task_entry(0.60, full=400, mean=60, std=10, prefill_ms=2, ttft_ms=5, decode_ms=1)},
        spec="dymu-low",
    )
    other = write_run(
        tmp_path / "other",
        {"tc_shapes": task_entry(0.90, full=400, mean=100, std=5)},
        spec="tome-mid",
        model="other-model",
    )
    return [none, mid, low, other]


def _rows(runs):
    return build_table([load_run(path) for path in runs])


def test_ratios_and_percent_columns(runs):
    table = _rows(runs).set_index(["task", "model", "method"])
    mid = table.loc[("tc_shapes", "tokcomp-tiny", "dymu-mid")]
    assert mid["accuracy_pct"] == pytest.approx(76.0)
    assert mid["accuracy_vs_none_pct"] == pytest.approx(95.0)
    assert mid["tokens_pct_full"] == pytest.approx(32.5)
    assert mid["prefill_ratio"] == pytest.approx(0.4)
    assert mid["ttft_ratio"] == pytest.approx(0.5)
    assert mid["decode_ratio"] == pytest.approx(0.75)
    text = table.loc[("tc_text", "tokcomp-tiny", "dymu-mid")]
    assert text["accuracy_vs_none_pct"] == pytest.approx(90.0)
    assert text["prefill_ratio"] == pytest.approx(0.5)
    plain = table.loc[("tc_shapes", "tokcomp-tiny", "none")]
    assert plain["accuracy_vs_none_pct"] == pytest.approx(100.0) and plain["prefill_ratio"] == pytest.approx(1.0)
    assert plain["tokens_pct_full"] == pytest.approx(100.0)


def test_rows_sorted_by_task_model_then_tokens_with_none_first(runs):
    table = _rows(runs)
    keys = list(zip(table["task"], table["model"], table["method"], strict=True))
    assert keys == [
        ("tc_shapes", "other-model", "tome-mid"),
        ("tc_shapes", "tokcomp-tiny", "none"),
        ("tc_shapes", "tokcomp-tiny", "dymu-mid"),
        ("tc_shapes", "tokcomp-tiny", "dymu-low"),
        ("tc_text", "tokcomp-tiny", "none"),
        ("tc_text", "tokcomp-tiny", "dymu-mid"),
    ]


def test_a_run_without_an_uncompressed_counterpart_has_blank_ratios(runs):
    table = _rows(runs)
    row = table[table["model"] == "other-model"].iloc[0]
    for column in ("accuracy_vs_none_pct", "prefill_ratio", "ttft_ratio", "decode_ratio"):
        assert row[column] != row[column], column  # NaN
    assert row["tokens_pct_full"] == pytest.approx(25.0)  # the share of full needs no other run
    shown = display_table(table)
    cells = shown[shown["model"] == "other-model"].iloc[0]
    assert cells["vs none"] == cells["prefill"] == cells["TTFT"] == cells["decode/token"] == "—"
    assert cells["accuracy"] == "90.0%" and cells["visual tokens"] == "100.0 ± 5.0"


def test_markdown_output_parses(runs, capsys):
    code, out, err = run(["report", *map(str, runs), "--format", "md"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| task | model | method |") and set(lines[1]) <= set("|-: ")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(cells) == 6 and all(len(row) == len(cells[0]) for row in cells)
    mid = next(row for row in cells if row[0] == "tc_shapes" and row[2] == "dymu-mid")
    assert "76.0%" in mid and "95.0%" in mid and "130.0 ± 20.0" in mid and "0.40×" in mid


def test_csv_output_parses_as_numbers(runs, capsys, tmp_path):
    target = tmp_path / "out" / "report.csv"
    code, out, err = run(["report", *map(str, runs), "--out", str(target)], capsys)  # format from the suffix
    assert code == 0, err
    assert "wrote" in out
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(rows) == 6
    low = next(r for r in rows if r["method"] == "dymu-low")
    assert float(low["accuracy_pct"]) == pytest.approx(60.0)
    assert float(low["accuracy_vs_none_pct"]) == pytest.approx(75.0)
    assert float(low["tokens_pct_full"]) == pytest.approx(15.0)
    assert float(low["prefill_ratio"]) == pytest.approx(0.2)
    other = next(r for r in rows if r["model"] == "other-model")
    assert other["prefill_ratio"] == "" and other["accuracy_vs_none_pct"] == ""
    assert not list(target.parent.glob(".*.tmp*"))  # the atomic write left nothing behind


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_output_parses(runs, capsys):
    code, out, err = run(["report", *map(str, runs), "--format", "html"], capsys)
    assert code == 0, err
    assert out.startswith("<!doctype html>")
    parser = _Cells()
    parser.feed(out)
    header, *body = parser.rows
    assert header[:3] == ["task", "model", "method"] and len(body) == 6
    low = next(row for row in body if row[2] == "dymu-low")
    assert low[header.index("vs none")] == "75.0%" and low[header.index("% of full")] == "15.0%"


def test_rich_table_prints(runs, capsys):
    code, out, err = run(["report", *map(str, runs[:3])], capsys)
    assert code == 0, err
    assert "tc_shapes" in out and "dymu-low" in out and "model tokcomp-tiny" in out


def test_plot_is_a_png(runs, capsys, tmp_path):
    png = tmp_path / "plots" / "accuracy.png"
    code, _, err = run(["report", *map(str, runs), "--format", "csv", "--plot", str(png)], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in err  # status goes to stderr while stdout carries the CSV


def test_results_json_path_is_accepted(runs, capsys):
    code, out, err = run(["report", str(runs[0] / "results.json"), "--format", "csv"], capsys)
    assert code == 0, err
    assert out.count("\n") == 3  # header + two tasks


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report"], "no results given"),
        (["report", "{tmp}/missing"], "does not exist"),
        (["report", "{tmp}/empty"], "has no results.json"),
        (["report", "{tmp}/bad"], "not valid JSON"),
        (["report", "{tmp}/none", "--format", "pdf"], "unknown format 'pdf'"),
        (["report", "{tmp}/none", "--out", "{tmp}/r.txt"], "cannot tell the format"),
        (["report", "{tmp}/none", "--plot", "{tmp}/p.jpg"], "must be a .png"),
        (["report", "{tmp}/none", "{tmp}/none/results.json"], "more than one run"),
    ],
)
def test_bad_input_is_one_clean_line(runs, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_wrong_shape_results_are_refused(tmp_path):
    path = write_run(tmp_path / "r", {"tc_shapes": task_entry(0.5)})
    data = json.loads((path / "results.json").read_text())
    data["tasks"]["tc_shapes"]["score"] = 93.0  # a percentage, not a fraction
    (path / "results.json").write_text(json.dumps(data))
    with pytest.raises(TokcompError, match=r"fraction in \[0, 1\]"):
        load_run(path)
    data["schema"] = 2
    (path / "results.json").write_text(json.dumps(data))
    with pytest.raises(TokcompError, match="unsupported schema"):
        load_run(path)


def test_format_resolution(tmp_path):
    assert resolve_format(None, None) == "table"
    assert resolve_format(None, tmp_path / "x.MD") == "md"
    assert resolve_format("HTML", tmp_path / "x.txt") == "html"
    with pytest.raises(TokcompError, match="only prints"):
        resolve_format("table", tmp_path / "x.md")


def test_missing_measurements_stay_blank_and_mismatched_samples_warn(tmp_path, capsys):
    none = write_run(tmp_path / "none", {"tc_shapes": task_entry(0.8, full=400, samples=4)})
    entry = task_entry(0.6, full=400, mean=100, samples=3)
    del entry["visual_tokens"], entry["timings"]
    method = write_run(tmp_path / "m", {"tc_shapes": entry}, spec="dymu+dycoke", name="dymu+dycoke")
    code, out, err = run(["report", str(none), str(method), "--format", "csv"], capsys)
    assert code == 0, err
    row = list(csv.DictReader(io.StringIO(out)))[1]
    assert row["method"] == "dymu+dycoke" and float(row["accuracy_vs_none_pct"]) == pytest.approx(75.0)
    assert row["tokens_mean"] == row["tokens_pct_full"] == row["prefill_ratio"] == ""
    assert "warning:" in err and "3 samples" in err


def test_readme_block_is_replaced_between_its_markers(tmp_path):
    from tokcomp.errors import TokcompError
    from tokcomp.results.readme_block import main, replace_block

    text = "intro\n<!-- t:start -->\nold\n<!-- t:end -->\noutro\n"
    assert replace_block(text, "t", "| a |\n") == "intro\n<!-- t:start -->\n| a |\n<!-- t:end -->\noutro\n"
    with pytest.raises(TokcompError, match="expected one"):
        replace_block("no markers", "t", "x")
    (tmp_path / "R.md").write_text(text)
    (tmp_path / "table.md").write_text("new")
    assert main([str(tmp_path / "R.md"), "t", str(tmp_path / "table.md")]) == 0
    assert "new" in (tmp_path / "R.md").read_text() and "old" not in (tmp_path / "R.md").read_text()
    assert main([str(tmp_path / "R.md"), "t", str(tmp_path / "missing.md")]) == 2


def test_ratios_across_runs_need_the_same_machine(tmp_path):
    """Cross-run timing ratios compare only runs that recorded the same machine; else they stay blank."""
    plain = task_entry(0.8, full=400, prefill_ms=10, ttft_ms=20, decode_ms=2)
    none = write_run(tmp_path / "none", {"tc_shapes": plain})
    other = write_run(
        tmp_path / "mid",
        {"tc_shapes": task_entry(0.7, full=400, mean=100, prefill_ms=4, ttft_ms=8, decode_ms=1)},
        spec="dymu-mid",
    )
    results = json.loads((other / "results.json").read_text())
    results["machine"] = {**results.get("machine", {}), "cpu": "Another CPU", "torch_threads": 8}
    (other / "results.json").write_text(json.dumps(results))
    row = _rows([none, other]).set_index("method").loc["dymu-mid"]
    assert row["timing"] == "other machine" and row[["prefill_ratio", "ttft_ratio", "decode_ratio"]].isna().all()
    assert row["accuracy_vs_none_pct"] == pytest.approx(87.5)  # accuracy still compares
