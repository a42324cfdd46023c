"""`make compare`'s plan: every method at matched budgets, named so that one report holds them all."""

from __future__ import annotations

import pytest

from tokcomp.methods.registry import METHODS, build_method
from tokcomp.results.compare import BUDGETS, matched_runs, plan_lines


def test_every_run_is_a_registered_method_at_its_budget():
    runs = matched_runs(64)
    assert len({r.label for r in runs}) == len(runs) and runs[0].label == "none"
    assert {r.method for r in runs} <= set(METHODS)
    for run in runs[1:]:
        share = BUDGETS[[round(100 * b) for b in BUDGETS].index(int(run.label.rsplit("-", 1)[1]))]
        sets = run.settings
        if run.method == "visionzip":
            assert int(sets["dominant"]) + int(sets["contextual"]) == round(share * 64)
        elif run.method == "pyramiddrop":
            assert float(sets["keep"]) ** 3 == pytest.approx(share, abs=1e-3)  # the last stage holds the share
        elif run.method == "dymu":
            assert run.calib_tokens == round(share * 64) and not sets
        elif run.method == "tome":
            assert sets == {"budget": str(round(share * 64))}
        else:
            assert float(next(iter(sets.values()))) == share
        if run.method != "dymu":
            build_method(run.method, "tokcomp-tiny", 4, sets=dict(sets))  # each setting is one the method takes
    lines = plan_lines(runs)
    assert all(len(line.split("\t")) == 5 for line in lines)
    assert lines[0] == "none\tnone\t-\ttc_suites\t-"
