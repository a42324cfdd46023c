"""The regression gate end to end: real `tokcomp eval` runs of tokcomp-tiny against the stored baselines."""

from __future__ import annotations

from pathlib import Path

from cli_runner import run_tokcomp

from tokcomp.eval.runner import EvalRequest, run_eval
from tokcomp.methods import merge

BASELINES = Path(__file__).resolve().parents[1] / "results" / "baselines" / "tokcomp-tiny"
GATE_LIMIT = 40  # the Makefile's GATE_LIMIT: the stored baselines' documents


def _unnormalised_merge(x, sizes, plan):
    """A deliberately broken DToMe: merged features are summed, never divided by their sizes."""
    new_sizes = merge.merge_sum(sizes, plan).masked_fill(~plan.new_valid, 0)
    return merge.merge_sum(x * sizes[..., None].to(x.dtype), plan), new_sizes


def test_the_stored_gate_fails_a_broken_dtome_on_its_own_documents(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TOKCOMP_TASKS_DIR", raising=False)  # the real suites, where the baselines came from
    monkeypatch.setattr(merge, "merge_weighted", _unnormalised_merge)
    request = EvalRequest(["tc_suites"], "tokcomp-tiny", method="dymu-mid", limit=GATE_LIMIT, progress=False)
    run_eval(request, tmp_path / "broken", log=lambda m: None)
    code, out, err = run_tokcomp(["regress", "--baseline", str(BASELINES / "dymu-mid"),
                                  "--current", str(tmp_path / "broken")], capsys)  # fmt: skip
    assert code == 1, out + err
    verdict = out[out.index("REGRESSION") :]
    assert "accuracy fell" in verdict and ("beyond noise" in verdict or "never allowed" in verdict)
