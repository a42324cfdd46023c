"""The regression gate end to end: real `tokcomp eval` runs of tokcomp-tiny through `tokcomp regress`."""

from __future__ import annotations

from cli_runner import run_tokcomp

from tokcomp.eval.runner import EvalRequest, run_eval
from tokcomp.methods import merge


def _unnormalised_merge(x, sizes, plan):
    """A deliberately broken DToMe: merged features are summed, never divided by their sizes."""
    new_sizes = merge.merge_sum(sizes, plan).masked_fill(~plan.new_valid, 0)
    return merge.merge_sum(x * sizes[..., None].to(x.dtype), plan), new_sizes


def test_the_gate_passes_a_rerun_and_fails_a_broken_method(suites_dir, tmp_path, monkeypatch, capsys):
    request = EvalRequest(["tc_shapes"], "tokcomp-tiny", method="dymu-mid", limit=24, progress=False)
    run_eval(request, tmp_path / "baseline", log=lambda m: None)
    run_eval(request, tmp_path / "rerun", log=lambda m: None)
    code, out, err = run_tokcomp(["regress", "--baseline", str(tmp_path / "baseline"),
                                  "--current", str(tmp_path / "rerun")], capsys)  # fmt: skip
    assert code == 0, out + err

    monkeypatch.setattr(merge, "merge_weighted", _unnormalised_merge)
    run_eval(request, tmp_path / "broken", log=lambda m: None)
    code, out, err = run_tokcomp(["regress", "--baseline", str(tmp_path / "baseline"),
                                  "--current", str(tmp_path / "broken")], capsys)  # fmt: skip
    assert code == 1, out + err
    assert "tc_shapes" in out and "accuracy" in out.lower()
