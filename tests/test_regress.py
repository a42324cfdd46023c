"""`tokcomp regress` on synthetic run folders: pass, each kind of regression, overrides and bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_runner import run_tokcomp as run
from runs_helper import suite_source, task_entry, write_run

from tokcomp.results.regress import Tolerance, Tolerances, load_tolerances, parse_tolerances, regress, sign_test_p

SHAPES = [1.0] * 8 + [0.0] * 2  # 80 %
TEXT = [1.0, 0.5, 0.0, 1.0, 1.0]  # soft accuracy: 70 %


def _run(root, shapes=SHAPES, text=TEXT, tokens=(120.0, 90.0), spec="dymu-mid", **kwargs):
    """A run with tc_shapes and tc_text whose task scores are the means of the per-sample scores."""
    tasks = {
        "tc_shapes": task_entry(sum(shapes) / len(shapes), full=400, mean=tokens[0], samples=len(shapes)),
        "tc_text": task_entry(sum(text) / len(text), full=300, mean=tokens[1], samples=len(text)),
    }
    return write_run(root, tasks, spec=spec, samples={"tc_shapes": list(shapes), "tc_text": list(text)}, **kwargs)


def _flip(scores, *indices):
    return [0.0 if i in indices else s for i, s in enumerate(scores)]


def _tolerances(tmp_path, data) -> str:
    path = tmp_path / "tol.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_identical_runs_pass(tmp_path, capsys):
    base, cur = _run(tmp_path / "base"), _run(tmp_path / "cur")
    code, out, err = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 0, err
    assert "no regression" in out and "tc_shapes" in out and "tc_text" in out
    assert "regress-tolerances.yaml" in out  # the shipped defaults were used


def test_the_sign_test_counts_changed_pairs_only():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 0) == 0.125  # three flips one way: noise on 40 samples
    assert sign_test_p(7, 0) == 1 / 128
    assert sign_test_p(7, 1) == pytest.approx(9 / 256)
    assert sign_test_p(0, 5) == 1.0
    assert sign_test_p(2, 2) == pytest.approx(11 / 16)


FORTY = [1.0] * 32 + [0.0] * 8  # 80 %


def _forty(root, scores=FORTY, **kwargs):
    tasks = {"tc_shapes": task_entry(sum(scores) / len(scores), full=400, mean=120.0, samples=len(scores))}
    return write_run(root, tasks, spec="dymu-mid", samples={"tc_shapes": list(scores)}, **kwargs)


def test_a_few_flips_either_way_are_noise_and_pass(tmp_path, capsys):
    base = _forty(tmp_path / "base")
    scores = _flip(FORTY, 0, 1, 2)  # the cross-machine case: 3 of 40 flipped one way, 7.5 points
    code, out, err = run(["regress", "--baseline", str(base), "--current", str(_forty(tmp_path / "cur", scores))],
                         capsys)  # fmt: skip
    assert code == 0, out + err
    assert "3 / 0" in out and "p = 0.12" in out


def test_a_loss_beyond_noise_fails_and_names_the_task(tmp_path, capsys):
    base = _forty(tmp_path / "base")
    cur = _forty(tmp_path / "cur", _flip(FORTY, *range(7)))  # 7 worse, 0 better: p = 0.0078
    tol = _tolerances(tmp_path, {"default": {"max_drop": 1.0}})  # the test alone decides
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur), "--tolerances", tol], capsys)
    assert code == 1
    verdict = out[out.index("REGRESSION") :]
    assert "tc_shapes: accuracy fell 17.5 points" in verdict and "p = 0.0078 < alpha 0.01" in verdict


def test_the_same_net_loss_spread_over_both_ways_is_not_significant(tmp_path):
    base = _forty(tmp_path / "base")
    scores = _flip(FORTY, *range(7))
    scores[39] = 1.0  # 7 worse, 1 better: p = 0.035
    tol = _tolerances(tmp_path, {"default": {"max_drop": 1.0}})
    comparison = regress(base, _forty(tmp_path / "cur", scores), tol)
    assert comparison.passed and comparison.tasks[0].worse == 7 and comparison.tasks[0].better == 1


def test_a_large_loss_fails_whatever_the_test_says(tmp_path, capsys):
    base = _run(tmp_path / "base")
    cur = _run(tmp_path / "cur", shapes=_flip(SHAPES, 0, 1))  # 80 % → 60 % on 10 samples: p = 0.25
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 1
    assert "tc_shapes: accuracy fell 20.0 points (80.0% → 60.0%), at least the 15.0 points never allowed" in out


def test_a_significant_loss_smaller_than_min_drop_passes(tmp_path):
    scores = [1.0] * 400
    base = _forty(tmp_path / "base", scores)
    comparison = regress(base, _forty(tmp_path / "cur", _flip(scores, *range(8))))  # 2 points, p = 0.0039
    assert comparison.passed and comparison.tasks[0].p_value < 0.01


def test_tokens_rising_beyond_tolerance_fails(tmp_path, capsys):
    base = _run(tmp_path / "base")
    cur = _run(tmp_path / "cur", tokens=(126.0, 90.0))  # +5 %
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 1
    assert "tc_shapes: visual tokens rose 5.0%" in out


def test_a_current_run_without_token_counts_fails(tmp_path, capsys):
    base = _run(tmp_path / "base")
    cur = _run(tmp_path / "cur")
    data = json.loads((cur / "results.json").read_text())
    del data["tasks"]["tc_text"]["visual_tokens"]
    (cur / "results.json").write_text(json.dumps(data))
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 1
    assert "tc_text: visual tokens not measured in the current run" in out


def test_improvements_never_fail(tmp_path, capsys):
    base = _run(tmp_path / "base", shapes=_flip(SHAPES, 0, 1, 2, 3))
    cur = _run(tmp_path / "cur", tokens=(60.0, 45.0))  # more right, half the tokens
    code, out, err = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 0, out + err
    comparison = regress(base, cur)
    shapes = comparison.tasks[0]
    assert shapes.task == "tc_shapes" and shapes.better == 4 and shapes.worse == 0 and not shapes.flips
    assert shapes.tokens_change == pytest.approx(-0.5)


def test_flips_and_soft_losses_are_counted_by_doc_id(tmp_path, capsys):
    base = _run(tmp_path / "base")
    shapes = _flip(SHAPES, 1, 2, 3)  # docs 1, 2, 3 go wrong, and 8, 9 go right
    shapes[8] = shapes[9] = 1.0
    text = [1.0, 0.0, 0.0, 1.0, 0.9]  # doc 1: 0.5 → 0.0 is a flip; doc 4: 1.0 → 0.9 a loss, not a flip
    cur = _run(tmp_path / "cur", shapes=shapes, text=text)
    comparison = regress(base, cur)
    by_task = {t.task: t for t in comparison.tasks}
    assert [f.doc_id for f in by_task["tc_shapes"].flips] == [1, 2, 3]
    assert (by_task["tc_shapes"].worse, by_task["tc_shapes"].better) == (3, 2)
    assert [f.doc_id for f in by_task["tc_text"].flips] == [1]
    assert (by_task["tc_text"].worse, by_task["tc_text"].better) == (2, 0)
    flip = by_task["tc_shapes"].flips[0]
    assert (flip.target, flip.baseline_response, flip.current_response) == ("answer1", "answer1", "wrong1")
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 0
    assert "wrong1" in out and "wrong3" in out  # the flips are listed with their responses


def test_per_task_override(tmp_path, capsys):
    base = _run(tmp_path / "base")
    cur = _run(tmp_path / "cur", text=[1.0, 0.5, 0.0, 0.0, 0.8])  # 70 % → 46 %
    argv = ["regress", "--baseline", str(base), "--current", str(cur), "--tolerances"]
    code, out, _ = run([*argv, _tolerances(tmp_path, {"default": {"max_drop": 0.15}})], capsys)
    assert code == 1 and "tc_text: accuracy fell 24.0 points" in out
    override = {"default": {"max_drop": 0.15}, "tasks": {"tc_text": {"max_drop": 0.3}}}
    code, out, err = run([*argv, _tolerances(tmp_path, override)], capsys)
    assert code == 0, out + err


def test_override_keeps_the_other_default_keys():
    tolerances = parse_tolerances({"default": {"alpha": 0.05}, "tasks": {"tc_text": {"max_drop": 0.2}}})
    assert tolerances.for_task("tc_text") == Tolerance(alpha=0.05, max_drop=0.2)
    assert tolerances.for_task("tc_shapes") == Tolerance(alpha=0.05)


def test_runs_over_other_documents_are_refused(tmp_path, capsys):
    base = _run(tmp_path / "base")
    other = {"tc_shapes": {"kind": "files", "path": "/x/rows-100-104.parquet", "sha256": "ffff"}}
    for name, kwargs in {
        "files": {"data": other},
        "generator": {"data": {"tc_shapes": suite_source("tc_shapes", version=3)}},
        "target": {"targets": {"tc_text": {2: "triangle"}}},
    }.items():
        cur = _run(tmp_path / name, **kwargs)
        code, out, err = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, (name, err)
        assert "different documents" in err, err


def test_runs_that_do_not_record_their_documents_are_refused(tmp_path, capsys):
    base = _run(tmp_path / "base")
    data = json.loads((base / "results.json").read_text())
    del data["data"]
    (base / "results.json").write_text(json.dumps(data))
    code, _, err = run(["regress", "--baseline", str(base), "--current", str(_run(tmp_path / "cur"))], capsys)
    assert code == 2 and "does not record which documents" in err and err.count("\n") == 1


def test_the_same_files_elsewhere_are_the_same_documents(tmp_path):
    here = {"tc_shapes": {"kind": "files", "path": "/a/eval.parquet", "sha256": "abcd"}}
    there = {"tc_shapes": {"kind": "files", "path": "/b/eval.parquet", "sha256": "abcd"}}
    assert regress(_run(tmp_path / "base", data=here), _run(tmp_path / "cur", data=there)).passed


def test_another_machine_is_shown_on_both_sides(tmp_path, capsys):
    base = _run(tmp_path / "base")
    cur = _run(tmp_path / "cur", machine={"cpu": "Intel Xeon", "torch_threads": 1})
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 0
    assert "machine cpu: 'AMD EPYC' → 'Intel Xeon'" in out and "machine torch_threads: 2 → 1" in out


def test_shipped_tolerances_match_the_built_in_defaults():
    tolerances, path = load_tolerances()
    assert path is not None and path.name == "regress-tolerances.yaml"
    assert tolerances.default == Tolerances().default


def test_a_task_missing_from_the_current_run_fails(tmp_path, capsys):
    base = _run(tmp_path / "base")
    cur = write_run(
        tmp_path / "cur",
        {"tc_shapes": task_entry(0.8, full=400, mean=120.0, samples=10)},
        spec="dymu-mid",
        samples={"tc_shapes": SHAPES},
    )
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 1
    assert "tc_text: missing from the current run" in out


def test_a_task_only_in_the_current_run_is_noted(tmp_path, capsys):
    base = write_run(
        tmp_path / "base",
        {"tc_shapes": task_entry(0.8, full=400, mean=120.0, samples=10)},
        spec="dymu-mid",
        samples={"tc_shapes": SHAPES},
    )
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(_run(tmp_path / "cur"))], capsys)
    assert code == 0 and "only in the current run (not compared): tc_text" in out


@pytest.mark.parametrize(("field", "value"), [("spec", "tome-mid"), ("model", "other-model"), ("limit", 5)])
def test_runs_of_another_method_model_or_limit_are_bad_input(tmp_path, capsys, field, value):
    base = _run(tmp_path / "base")
    cur = _run(tmp_path / "cur", **{field: value})
    code, out, err = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 2 and out == ""
    what = {"spec": "method", "model": "model", "limit": "limit"}[field]
    assert err.startswith(f"error: the runs differ in {what}") and len(err.strip().splitlines()) == 1


def _broken(tmp_path, kind):
    """A run folder broken in one way, and the message expected."""
    root = _run(tmp_path / kind)
    if kind == "missing-dir":
        return tmp_path / "nowhere", "does not exist"
    if kind == "bad-json":
        (root / "results.json").write_text('{"schema": 1, ')
        return root, "not valid JSON"
    if kind == "no-samples":
        (root / "samples.jsonl").unlink()
        return root, "has no samples.jsonl"
    if kind == "bad-sample-line":
        with (root / "samples.jsonl").open("a") as handle:
            handle.write("{oops\n")
        return root, "line 16 is not valid JSON"
    if kind == "duplicate-doc":
        lines = (root / "samples.jsonl").read_text().splitlines()
        (root / "samples.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n")
        return root, "appears twice"
    if kind == "no-score":
        data = json.loads((root / "results.json").read_text())
        del data["tasks"]["tc_text"]["score"]
        (root / "results.json").write_text(json.dumps(data))
        return root, "score must be a finite number"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing-dir", "bad-json", "no-samples", "bad-sample-line", "duplicate-doc", "no-score"]
)
@pytest.mark.parametrize("side", ["baseline", "current"])
def test_bad_or_missing_files_are_a_clean_error(tmp_path, capsys, kind, side):
    good = _run(tmp_path / "good")
    broken, message = _broken(tmp_path, kind)
    paths = {"baseline": good, "current": good, side: broken}
    code, _, err = run(["regress", "--baseline", str(paths["baseline"]), "--current", str(paths["current"])], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default: {max_drop: -1}", "non-negative number"),
        ("default: {max_dorp: 0.1}", "unknown key(s) max_dorp"),
        ("default: {alpha: 1.5}", "probability between 0 and 1"),
        ("tasks: [tc_text]", "'tasks' must be a mapping"),
        ("default: {alpha: [", "not valid YAML"),
    ],
)
def test_bad_tolerance_files_are_a_clean_error(tmp_path, capsys, text, message):
    run_dir = _run(tmp_path / "r")
    path = tmp_path / "tol.yaml"
    path.write_text(text)
    code, _, err = run(
        ["regress", "--baseline", str(run_dir), "--current", str(run_dir), "--tolerances", str(path)], capsys
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_tolerance_file_is_a_clean_error(tmp_path, capsys):
    run_dir = _run(tmp_path / "r")
    argv = ["regress", "--baseline", str(run_dir), "--current", str(run_dir), "--tolerances", str(tmp_path / "x.yaml")]
    code, _, err = run(argv, capsys)
    assert code == 2 and "does not exist" in err


def test_the_paired_change_comes_with_its_interval(tmp_path, capsys):
    base = _forty(tmp_path / "base")
    cur = _forty(tmp_path / "cur", _flip(FORTY, 0, 1, 2))
    mean, low, high = regress(base, cur).tasks[0].paired_delta
    assert mean == pytest.approx(-0.075) and low < mean < high <= 0.0
    code, out, _ = run(["regress", "--baseline", str(base), "--current", str(cur)], capsys)
    assert code == 0 and "paired change, 95% CI (pts)" in out and "-7.5" in out
