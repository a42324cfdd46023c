"""Intervals and agreement in `tokcomp report`: the math, and the columns a reader sees."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runs_helper import task_entry, write_run

from tokcomp.results.report import build_table, display_table
from tokcomp.results.runs import load_run
from tokcomp.stats import agreement, paired_difference_interval, wilson_interval


def test_wilson_matches_known_values():
    assert wilson_interval(0.5, 40) == pytest.approx((0.3520, 0.6480), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # never below 0, not empty
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


@given(st.floats(0, 1), st.integers(1, 500))
@settings(max_examples=200, deadline=None)
def test_wilson_holds_its_estimate_and_narrows_with_more_samples(p, n):
    low, high = wilson_interval(p, n)
    assert 0.0 <= low <= p + 1e-12 and p - 1e-12 <= high <= 1.0
    low4, high4 = wilson_interval(p, 4 * n)
    assert high4 - low4 <= high - low + 1e-12


def test_the_paired_interval_is_deterministic_and_brackets_the_mean():
    before = [1.0] * 30 + [0.0] * 10
    after = [1.0] * 25 + [0.0] * 15
    mean, low, high = paired_difference_interval(before, after)
    assert mean == pytest.approx(-0.125) and low <= mean <= high and high <= 0.0
    assert paired_difference_interval(before, after) == (mean, low, high)
    assert paired_difference_interval(before, before) == (0.0, 0.0, 0.0)


def test_agreement_compares_normalised_answers():
    assert agreement(["Red.", "two", "a cat"], ["red", "three", "A  cat"]) == pytest.approx(2 / 3)


def test_report_shows_intervals_delta_and_agreement(tmp_path):
    scores = [1.0] * 8 + [0.0] * 2
    worse = [0.0, 0.0, *scores[2:]]  # two right answers lost
    runs = [
        write_run(tmp_path / "none", {"tc_shapes": task_entry(0.8, samples=10)}, samples={"tc_shapes": scores}),
        write_run(tmp_path / "dymu", {"tc_shapes": task_entry(0.6, mean=80.0, samples=10)}, spec="dymu-mid",
                  samples={"tc_shapes": worse}),
    ]
    table = build_table([load_run(r) for r in runs])
    row = table[table["method"] == "dymu-mid"].iloc[0]
    assert row["delta_vs_none_pts"] == pytest.approx(-20.0) and row["agreement_pct"] == pytest.approx(80.0)
    assert row["delta_ci_low_pts"] < -20.0 < row["delta_ci_high_pts"] <= 0.0
    cells = display_table(table).set_index("method").loc["dymu-mid"]
    assert cells["95% CI"] == "[31.3, 83.2]" and cells["agree"] == "80.0%"
    assert cells["Δ vs none (pts, 95% CI)"].startswith("-20.0 [")
    plain = display_table(table).set_index("method").loc["none"]
    assert plain["Δ vs none (pts, 95% CI)"] == "—" and plain["agree"] == "—"


def test_paired_timing_times_the_plain_model_on_the_same_samples(suites_dir, tmp_path):
    from tokcomp.eval.runner import EvalRequest, run_eval

    request = EvalRequest(["tc_shapes"], "tokcomp-tiny", method="dymu-mid", limit=3, progress=False,
                          paired_timing=True)  # fmt: skip
    results = run_eval(request, tmp_path / "paired", log=lambda m: None)
    ratios = results["tasks"]["tc_shapes"]["paired_timings"]
    assert set(ratios) == {"vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"}
    assert all(r > 0 for r in ratios.values())
    rows = [json.loads(line) for line in (tmp_path / "paired" / "samples.jsonl").read_text().splitlines()]
    assert all(set(r["plain_timings"]) == set(r["timings"]) for r in rows)
    plain = run_eval(EvalRequest(["tc_shapes"], "tokcomp-tiny", limit=3, progress=False), tmp_path / "none",
                     log=lambda m: None)  # fmt: skip
    unpaired = run_eval(EvalRequest(["tc_shapes"], "tokcomp-tiny", method="dymu-mid", limit=3, progress=False),
                        tmp_path / "unpaired", log=lambda m: None)  # fmt: skip
    assert "paired_timings" not in plain["tasks"]["tc_shapes"]
    # the scored answers are the method's own, as without --paired-timing
    assert [r["response"] for r in rows] == [
        json.loads(line)["response"] for line in (tmp_path / "unpaired" / "samples.jsonl").read_text().splitlines()
    ]
    assert unpaired["tasks"]["tc_shapes"]["score"] == results["tasks"]["tc_shapes"]["score"]
    table = build_table([load_run(tmp_path / "none"), load_run(tmp_path / "paired")])
    row = table[table["method"] == "dymu-mid"].iloc[0]
    assert row["timing"] == "same run" and row["prefill_ratio"] == pytest.approx(ratios["prefill_ms"])
