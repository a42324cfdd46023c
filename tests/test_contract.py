"""What a run and a calibration promise: outputs as a unit, recorded documents and machine, provenance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runner import run_tokcomp

from tokcomp.eval import runner
from tokcomp.eval.runner import EvalRequest, run_eval
from tokcomp.methods.names import METHOD_NAMES
from tokcomp.methods.registry import METHODS, calibration_name, preset_catalog, stored_calibration

ROOT = Path(__file__).resolve().parents[1]


def _request(**kwargs) -> EvalRequest:
    return EvalRequest(["tc_shapes"], "tokcomp-tiny", limit=2, progress=False, **kwargs)


def test_results_record_documents_machine_and_dtype(suites_dir, tmp_path):
    results = run_eval(_request(), tmp_path / "run", log=lambda m: None)
    source = results["data"]["tc_shapes"]
    assert source["kind"] == "builtin" and source["suite"] == "tc_shapes" and source["rows"] == 24
    assert len(source["sha256"]) == 16 and source["generator_version"] >= 1
    assert {"cpu", "cpu_flags", "aten_capability", "torch_threads", "torch"} <= set(results["machine"])
    assert results["dtype"] == "float32" and results["versions"]["lmms-eval"] == "0.7.3"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data"] == results["data"]


def test_a_failed_eval_leaves_the_previous_run_whole_and_nothing_else(suites_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_eval(_request(), out, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    original = runner.atomic_write_text

    def dies_writing_results(path, text):
        if Path(path).name == "results.json":
            raise KeyboardInterrupt  # killed between samples.jsonl and results.json
        return original(path, text)

    monkeypatch.setattr(runner, "atomic_write_text", dies_writing_results)
    with pytest.raises(KeyboardInterrupt):
        run_eval(_request(method="dymu-mid"), out, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the `none` run, both files as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left
    with pytest.raises(KeyboardInterrupt):
        run_eval(_request(method="dymu-mid"), tmp_path / "fresh", log=lambda m: None)
    assert not (tmp_path / "fresh").exists()


def test_methods_lists_every_method_and_preset_with_defaults(capsys):
    assert tuple(METHODS) == METHOD_NAMES
    code, out, err = run_tokcomp(["methods", "--json"], capsys)
    assert code == 0, err
    listing = json.loads(out)
    assert list(listing["methods"]) == list(METHODS)
    assert listing["methods"]["dycoke"]["settings"]["ttm_ratio"] == {"type": "float", "default": 0.7, "alias": "K"}
    assert "_carry" not in listing["methods"]["dycoke"]["settings"]
    presets = {p.stem for p in (ROOT / "configs").glob("*.yaml")} - {"regress-tolerances"}
    assert set(listing["presets"]) == presets == {p.name for p in preset_catalog()}
    assert listing["presets"]["dymu-mid"] == {**listing["presets"]["dymu-mid"], "method": "dymu",
                                              "settings": {"budget": "mid"}}  # fmt: skip
    code, out, _ = run_tokcomp(["methods"], capsys)
    assert code == 0 and "divprune" in out and "adaptive-20" in out


def test_the_method_help_names_every_method(capsys):
    code, out, _ = run_tokcomp(["eval", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert all(name in flat for name in METHOD_NAMES) and "tokcomp methods" in flat


def test_a_checkpoint_path_and_its_name_find_the_same_calibrations(tmp_path):
    assert calibration_name("checkpoints/tokcomp-tiny") == calibration_name(str(ROOT / "checkpoints/tokcomp-tiny"))
    assert calibration_name("checkpoints/tokcomp-tiny") == "tokcomp-tiny"
    assert stored_calibration(str(ROOT / "checkpoints" / "tokcomp-tiny"), "mid") == stored_calibration(
        "tokcomp-tiny", "mid"
    )
    assert calibration_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    other = tmp_path / "my-model"
    other.mkdir()
    assert calibration_name(str(other)) == "my-model"


def _calibration(tmp_path, **provenance) -> Path:
    data = yaml.safe_load((ROOT / "calib" / "tokcomp-tiny" / "mid.yaml").read_text())
    data["provenance"].update(provenance)
    path = tmp_path / "calib.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("vision_hash", [None, "0000000000000000", "", "not-a-hash"])
def test_a_calibration_without_a_usable_vision_hash_is_refused_everywhere(tmp_path, capsys, vision_hash):
    path = _calibration(tmp_path, vision_hash=vision_hash)
    for argv in (
        ["apply", "--model", "tokcomp-tiny", "--method", "dymu", "--calib", str(path), "--prompt", "what colour?",
         "--image", "builtin:skimage/coffee"],
        ["inspect", "builtin:skimage/coffee", "--model", "tokcomp-tiny", "--calib", str(path), "--out",
         str(tmp_path / "m.png")],
    ):  # fmt: skip
        code, _, err = run_tokcomp(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "no usable vision hash" in err, err
    assert not (tmp_path / "m.png").exists()


def test_a_calibration_is_used_in_its_own_dtype_only(tmp_path, capsys):
    path = _calibration(tmp_path, dtype="bfloat16")
    base = ["apply", "--model", "tokcomp-tiny", "--method", "dymu", "--calib", str(path), "--prompt", "what colour?",
            "--image", "builtin:skimage/coffee", "--max-new-tokens", "2"]  # fmt: skip
    code, _, err = run_tokcomp(base, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "made with the model in bfloat16, this model is loaded in float32: pass --dtype bfloat16" in err
    code, _, err = run_tokcomp([*base, "--dtype", "bfloat16"], capsys)  # the dtype matches; the hash decides next
    assert code == 2 and "made for other vision weights" in err and "made with the model" not in err


def test_calibrate_records_the_dtype_it_ran_in(tmp_path, capsys):
    out = tmp_path / "c.yaml"
    code, _, err = run_tokcomp(["calibrate", "--model", "tiny-llava", "--budget", "mid", "--data",
                                "builtin:skimage", "--num-images", "4", "--batch-size", "4", "--dtype", "bfloat16",
                                "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    assert yaml.safe_load(out.read_text())["provenance"]["dtype"] == "bfloat16"
    code, _, err = run_tokcomp(["inspect", "builtin:skimage/coffee", "--model", "tiny-llava", "--calib", str(out),
                                "--out", str(tmp_path / "m.png")], capsys)  # fmt: skip
    assert code == 2 and "pass --dtype bfloat16" in err
    code, _, err = run_tokcomp(["inspect", "builtin:skimage/coffee", "--model", "tiny-llava", "--calib", str(out),
                                "--dtype", "bfloat16", "--out", str(tmp_path / "m.png")], capsys)  # fmt: skip
    assert code == 0, err


def test_a_stale_lock_is_refused_and_the_committed_one_is_fresh(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    assert lock.check_fresh(ROOT / "requirements.lock", "2.13.0") == 0
    copy = tmp_path / "repo"
    (copy / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "lock.py", copy / "tools")
    shutil.copy(ROOT / "requirements.lock", copy)
    pyproject = (ROOT / "pyproject.toml").read_text().replace('"rich>=13",', '"rich>=13",\n    "tqdm",')
    (copy / "pyproject.toml").write_text(pyproject)
    done = subprocess.run([sys.executable, str(copy / "tools" / "lock.py"), "check-fresh", "requirements.lock",
                           "2.13.0"], cwd=copy, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "out of date against pyproject.toml" in done.stderr
    assert done.stderr.count("\n") == 1


def test_an_unknown_package_in_the_venv_is_named(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    pins = lock.locked_versions(ROOT / "requirements.lock")
    assert pins["filelock"].startswith("4.2") and "torch" not in pins and "torchvision" not in pins
    monkeypatch.setattr(lock, "locked_versions", lambda _: {**pins, "not-a-real-package": "1.0"})
    assert lock.check_venv(ROOT / "requirements.lock", fix=False) == 2
    assert "missing not-a-real-package" in capsys.readouterr().err


def test_unknown_dtype_is_bad_input(capsys):
    code, _, err = run_tokcomp(["apply", "--model", "tokcomp-tiny", "--prompt", "x", "--image",
                                "builtin:skimage/coffee", "--dtype", "float64"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "dtype" in err


def test_report_writes_its_document_and_plot_all_or_none(tmp_path, capsys, monkeypatch):
    from runs_helper import task_entry, write_run

    from tokcomp.results import report

    run = write_run(tmp_path / "none", {"tc_shapes": task_entry(0.5)}, samples={"tc_shapes": [1.0, 0.0]})
    document, plot = tmp_path / "ok.md", tmp_path / "plot.png"

    def broken_plot(table, path):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("matplotlib failed")

    monkeypatch.setattr(report, "save_plot", broken_plot)
    code, _, err = run_tokcomp(["report", str(run), "--out", str(document), "--plot", str(plot)], capsys)
    assert code == 3 and err.count("\n") == 1 and "matplotlib failed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none"]  # neither file, no temporary left
    monkeypatch.undo()
    code, _, err = run_tokcomp(["report", str(run), "--out", str(document), "--plot", str(plot)], capsys)
    assert code == 0, err
    assert document.read_text().startswith("|") and plot.read_bytes()[:4] == b"\x89PNG"


def test_a_normal_eval_is_quiet_and_verbose_shows_lmms_eval(suites_dir, tmp_path):
    tokcomp = Path(sys.executable).parent / "tokcomp"
    argv = [str(tokcomp), "eval", "--task", "tc_shapes", "--limit", "2", "--out", str(tmp_path / "run")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the one status line (rich may wrap it), no lmms-eval log, progress bar or FutureWarning
    assert " ".join(done.stderr.split()) == f"wrote {tmp_path / 'run' / 'results.json'} and " + str(
        tmp_path / "run" / "samples.jsonl"
    )
    verbose = subprocess.run([*argv, "--verbose"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert verbose.returncode == 0 and "it/s" in verbose.stderr
