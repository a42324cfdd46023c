"""tokcomp eval: lmms-eval tasks (the suites and stock TextVQA / MVBench / VideoMME on local files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_tokcomp
from stock_task_data import write_mvbench, write_textvqa, write_videomme

from tokcomp.data.tasks import normalize_answer
from tokcomp.eval.model import cut_at_stops, split_visuals
from tokcomp.eval.runner import EvalRequest, as_fraction, run_eval, sample_score

RESULT_KEYS = {"schema", "model", "method", "calibration", "limit", "tasks", "versions", "git_commit", "date"}
TASK_KEYS = {"metric", "score", "metrics", "samples", "visual_tokens", "timings", "memory"}


def _read(run: Path) -> tuple[dict, list[dict]]:
    results = json.loads((run / "results.json").read_text())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    return results, samples


def test_suite_eval_writes_complete_results_and_samples(suites_dir, tmp_path):
    run = tmp_path / "none"
    run_eval(EvalRequest(["tc_shapes", "tc_text"], "tokcomp-tiny", limit=4, progress=False), run, log=lambda m: None)
    results, samples = _read(run)
    assert set(results) >= RESULT_KEYS and results["method"]["name"] == "none" and results["limit"] == 4
    for task in ("tc_shapes", "tc_text"):
        entry = results["tasks"][task]
        assert set(entry) >= TASK_KEYS and entry["samples"] == 4 and entry["metric"] == "accuracy"
        assert set(entry["visual_tokens"]) == {"full", "mean", "std", "p50", "p95"}
        assert entry["visual_tokens"]["mean"] == entry["visual_tokens"]["full"]  # nothing compressed
        assert set(entry["timings"]) == {"vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"}
        rows = [s for s in samples if s["task"] == task]
        assert sorted(s["doc_id"] for s in rows) == [0, 1, 2, 3]
        for s in rows:  # the stored score is the task's own scoring of the stored response
            assert s["score"] == float(normalize_answer(s["response"]) == normalize_answer(s["target"]))
        assert entry["score"] == pytest.approx(sum(s["score"] for s in rows) / 4)


def test_a_method_lowers_the_tokens_and_its_settings_are_recorded(suites_dir, tmp_path):
    run = tmp_path / "dymu"
    request = EvalRequest(["tc_shapes"], "tokcomp-tiny", method="dymu-mid", limit=3, progress=False,
                          label="dymu at mid")  # fmt: skip
    run_eval(request, run, log=lambda m: None)
    results, samples = _read(run)
    tokens = results["tasks"]["tc_shapes"]["visual_tokens"]
    assert tokens["mean"] < tokens["full"]
    # the label names the run in reports (``--label``); the method and its settings stay recorded
    assert results["method"]["spec"] == "dymu at mid" and results["method"]["name"] == "dymu"
    assert results["method"]["settings"]["budget"] == "mid"
    assert all(s["visual_tokens"]["kept"] < s["visual_tokens"]["full"] for s in samples)


@pytest.mark.parametrize("model", ["tokcomp-tiny", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_textvqa_val_runs_unchanged_on_local_files(tmp_path, model):
    data = write_textvqa(tmp_path / "textvqa_val.parquet")
    run = tmp_path / "run"
    request = EvalRequest(["textvqa_val"], model, data_files=data, progress=False)
    run_eval(request, run, log=lambda m: None)
    results, samples = _read(run)
    entry = results["tasks"]["textvqa_val"]
    assert entry["metric"] == "exact_match" and entry["samples"] == 3 and 0.0 <= entry["score"] <= 1.0
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2] and all(0.0 <= s["score"] <= 1.0 for s in samples)


@pytest.mark.parametrize(
    ("task", "model"), [("mvbench", "tokcomp-tiny"), ("videomme", "tokcomp-tiny"), ("mvbench", "tiny-qwen2.5-vl")]
)
def test_stock_video_tasks_run_offline_on_local_files(task, model, tmp_path):
    hf_home = tmp_path / "hf"
    if task == "mvbench":
        data = write_mvbench(tmp_path / "mvbench", hf_home)
    else:
        data = write_videomme(tmp_path / "videomme.parquet", hf_home)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "tokcomp.cli", "eval", "--task", task, "--model", model,
               "--data-files", str(data), "--frames", "8", "--out", str(run)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results, samples = _read(run)
    leaf = "mvbench_action_sequence" if task == "mvbench" else "videomme"
    entry = results["tasks"][leaf]
    assert entry["samples"] == 2 and len(samples) == 2 and 0.0 <= entry["score"] <= 1.0
    assert entry["visual_tokens"]["full"] > 0


def test_lmms_eval_command_line_runs_the_tokcomp_model(tmp_path):
    from tokcomp.data.tasks import write_eval_splits
    from tokcomp.eval.tasks import TASKS_DIR

    write_eval_splits(tmp_path / "data" / "tasks", n=2, tasks=["tc_shapes"])  # where the suite YAML looks
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "tokcomp",
               "--model_args", "pretrained=tokcomp-tiny,method=dymu-mid", "--tasks", "tc_shapes",
               "--include_path", str(TASKS_DIR), "--limit", "2", "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tc_shapes" in done.stdout and "accuracy" in done.stdout


def test_lmms_eval_finds_the_tokcomp_model_through_its_entry_point():
    from lmms_eval.models import get_model

    from tokcomp.eval.model import TokcompLMM

    assert get_model("tokcomp") is TokcompLMM


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "tc_shapez"], "unknown task 'tc_shapez' (did you mean tc_shapes"),
        (["--task", "textvqa_val", "--data-files", "/nowhere/x.parquet"], "does not exist"),
        (["--task", "tc_shapes", "--method", "dycoke"], "works on video input; this request has only image"),
        (["--task", "tc_shapes", "--method", "nosuch"], "unknown method"),
    ],
)
def test_bad_eval_input_is_one_clear_line(argv, message, suites_dir, tmp_path, capsys):
    code, _, err = run_tokcomp(
        ["eval", "--model", "tokcomp-tiny", "--limit", "1", "--out", str(tmp_path), *argv], capsys
    )
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_small_pieces():
    assert cut_at_stops("red ASSISTANT: blue", ["ASSISTANT:"]) == "red"
    assert sample_score({"score": 1}) == 1.0 and sample_score(0.5) == 0.5 and sample_score("x") is None
    assert as_fraction(62.5, 0.625) == 0.625 and as_fraction(0.4, 0.4) == 0.4
    from PIL import Image

    frame = Image.new("RGB", (8, 8))
    images, clip = split_visuals([[frame, frame]], 8, load_video=None)
    assert images == [] and len(clip) == 2
