"""The exit-code contract: every bad input is one `error: ` line on stderr, exit 2, and no output left behind.

Checks meant to run before the model loads are run with the heavy modules blocked (an import of them
would fail with exit 3), which proves they come first.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_runner import run_tokcomp
from PIL import Image
from runs_helper import task_entry, write_run

ROOT = Path(__file__).resolve().parents[1]
TOKCOMP = Path(sys.executable).parent / "tokcomp"
HEAVY = ("tokcomp.models.loading", "tokcomp.methods.registry", "tokcomp.pipeline", "tokcomp.eval.runner",
         "tokcomp.calibrate", "tokcomp.visualize", "lmms_eval")  # fmt: skip
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir() or not Path("/sys").is_dir(), reason="Linux only")


def bad_input(argv: list[str], capsys, left: Path | None = None) -> str:
    """Run ``tokcomp ARGV``, assert the contract, and return the line."""
    code, _, err = run_tokcomp(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if left is not None:
        assert not left.exists(), f"{left} was left behind"
        assert not list(left.parent.glob(f".{left.name}*")), "a temporary file was left behind"
    return err


@pytest.fixture
def before_loading(monkeypatch):
    """Importing torch-backed tokcomp modules or lmms-eval fails: the check must come before them."""
    for name in HEAVY:
        monkeypatch.setitem(sys.modules, name, None)


def _png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG, written row by row (small on disk whatever its size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


# --- apply: pictures, settings, prompt length --------------------------------------------------------


def _pictures(tmp_path: Path) -> dict[str, Path]:
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(small)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(small.read_bytes()[:40])
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return {
        "bomb": _png(tmp_path / "bomb.png", 14000, 14000),  # past twice PIL's limit: DecompressionBombError
        "near-bomb": _png(tmp_path / "near.png", 10000, 10000),  # past the limit: DecompressionBombWarning
        "truncated": truncated,
        "noise": noise,
        "missing": tmp_path / "nope.png",
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [("bomb", "too large"), ("near-bomb", "too large"), ("truncated", "cannot read image"),
     ("noise", "not an image"), ("missing", "does not exist")],
)  # fmt: skip
def test_a_bad_picture_is_reported_before_the_model_loads(case, message, tmp_path, capsys, before_loading):
    image = _pictures(tmp_path)[case]
    err = bad_input(["apply", "--model", "tokcomp-tiny", "--image", str(image), "--prompt", "hi"], capsys)
    assert message in err


@pytest.mark.parametrize("command", ["apply", "eval"])
def test_a_missing_calibration_is_reported_before_the_model_loads(command, tmp_path, capsys, before_loading):
    argv = {"apply": ["apply", "--model", "tokcomp-tiny", "--image", "builtin:skimage/coffee", "--prompt", "hi"],
            "eval": ["eval", "--task", "tc_shapes", "--out", str(tmp_path / "run")]}[command]  # fmt: skip
    err = bad_input([*argv, "--method", "dymu", "--calib", str(tmp_path / "none.yaml")], capsys, left=tmp_path / "run")
    assert "does not exist" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "dymu", "--set", "thresholds=a,b,c,d"], "setting thresholds: expected comma-separated numbers"),
        (["--prompt", " ".join(["red"] * 2100)], "max_position_embeddings"),
    ],
    ids=["settings-value", "prompt-too-long"],
)
def test_apply_settings_and_prompt_length(argv, message, capsys):
    args = ["apply", "--model", "tokcomp-tiny", "--image", "builtin:skimage/coffee", "--prompt", "hi", *argv]
    assert message in bad_input(args, capsys)


# --- models: checkpoints and the preset cache ---------------------------------------------------------


@pytest.mark.parametrize(("case", "message"), [("model-type", "model type 'frobnitz'"), ("truncated", "damaged")])
def test_a_broken_checkpoint_is_one_line(case, message, tmp_path, capsys):
    folder = tmp_path / "checkpoint"
    shutil.copytree(ROOT / "checkpoints" / "tokcomp-tiny", folder)
    if case == "model-type":
        config = folder / "config.json"
        config.write_text(config.read_text().replace('"model_type": "llava_onevision"', '"model_type": "frobnitz"'))
    else:
        weights = folder / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    argv = ["apply", "--model", str(folder), "--image", "builtin:skimage/coffee", "--prompt", "hi"]
    assert message in bad_input(argv, capsys)


@pytest.mark.parametrize("case", ["a-file", "under-proc"])
def test_an_unusable_tokcomp_home_is_one_line(case, tmp_path, capsys, monkeypatch):
    if case == "under-proc" and not Path("/proc/self").is_dir():
        pytest.skip("Linux only")
    home = tmp_path / "home-file" if case == "a-file" else Path("/proc/tokcomp-home")
    if case == "a-file":
        home.write_text("not a folder")
    monkeypatch.setenv("TOKCOMP_HOME", str(home))
    err = bad_input(["apply", "--model", "tiny-llava", "--image", "builtin:skimage/coffee", "--prompt", "hi"], capsys)
    assert "TOKCOMP_HOME" in err


# --- eval: documents and the output folder ------------------------------------------------------------


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, Path]:
    """tc_shapes documents, good ones and each kind of broken one."""
    from tokcomp.data.tasks import write_eval_splits

    root = tmp_path_factory.mktemp("documents")
    write_eval_splits(root / "good", n=3, tasks=["tc_shapes"])
    good = pd.read_parquet(root / "good" / "tc_shapes" / "eval.parquet")
    files = {name: root / name for name in ("schema.parquet", "empty.parquet", "zero-bytes.parquet",
                                            "corrupt.parquet", "list.json", "bad.json", "garbage-image.parquet",
                                            "no-answer.parquet", "bad.jsonl")}  # fmt: skip
    pd.DataFrame({"foo": [1, 2], "bar": ["a", "b"]}).to_parquet(files["schema.parquet"])
    good.iloc[:0].to_parquet(files["empty.parquet"])
    files["zero-bytes.parquet"].write_bytes(b"")
    files["corrupt.parquet"].write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    files["list.json"].write_text("[]")
    files["bad.json"].write_text("{not json")
    files["bad.jsonl"].write_text('{"task": "tc_shapes"}\n{oops\n')
    garbage = good.copy()
    garbage["images"] = [[b"not a picture"]] * len(garbage)
    garbage.to_parquet(files["garbage-image.parquet"])
    good.drop(columns=["answer"]).to_parquet(files["no-answer.parquet"])
    return files


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("schema.parquet", "lacks column(s) task, question, answer"),
        ("empty.parquet", "no documents (0 rows)"),
        ("zero-bytes.parquet", "the file is empty (0 bytes)"),
        ("corrupt.parquet", "as parquet"),
        ("list.json", "no documents (0 rows)"),
        ("bad.json", "as JSON"),
        ("bad.jsonl", "line 2"),
        ("garbage-image.parquet", "cannot decode its picture"),
        ("no-answer.parquet", "lacks column(s) answer"),
    ],
)
def test_bad_documents_are_one_line_before_anything_loads(case, message, documents, tmp_path, capsys, before_loading):
    out = tmp_path / "run"
    argv = ["eval", "--task", "tc_shapes", "--data-files", str(documents[case]), "--limit", "2", "--out", str(out)]
    assert message in bad_input(argv, capsys, left=out)


def test_stock_task_documents_are_checked_too(documents, tmp_path):
    """textvqa_val (its own schema, a datasets Image column) gets the same checks through plan_tasks."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokcomp.errors import TokcompError
    from tokcomp.eval.documents import check_documents

    config = {"test_split": "validation", "doc_to_text": "{{question}} {{ocr}}", "doc_to_target": "answer"}
    image = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string")})
    good = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "question": ["q"]}, features=image)
    good.to_parquet(str(tmp_path / "good.parquet"))
    with pytest.raises(TokcompError, match=r"lacks column\(s\) ocr"):
        check_documents(tmp_path / "good.parquet", config, "textvqa_val")
    table = pq.read_table(tmp_path / "good.parquet")
    broken = table.set_column(0, "image", pa.array([{"bytes": b"junk", "path": None}], type=table.schema.field(0).type))
    pq.write_table(broken.replace_schema_metadata(table.schema.metadata), tmp_path / "junk.parquet")
    config["doc_to_text"] = "{{question}}"
    check_documents(tmp_path / "good.parquet", config, "textvqa_val")
    with pytest.raises(TokcompError, match="document 0: cannot decode its picture"):
        check_documents(tmp_path / "junk.parquet", config, "textvqa_val")
    for case in ("empty.parquet", "corrupt.parquet", "bad.json"):
        with pytest.raises(TokcompError):
            check_documents(documents[case], config, "textvqa_val")


@needs_proc
@pytest.mark.parametrize("case", ["a-file", "under-proc", "under-sys"])
def test_an_unusable_eval_folder_is_reported_before_anything_loads(case, tmp_path, capsys, before_loading):
    out = {"a-file": tmp_path / "taken", "under-proc": Path("/proc/tokcomp-out"), "under-sys": Path("/sys/tokcomp")}
    if case == "a-file":
        out[case].write_text("x")
    bad_input(["eval", "--task", "tc_shapes", "--limit", "1", "--out", str(out[case])], capsys)
    assert case == "a-file" or not out[case].exists()


# --- calibrate, inspect, report: outputs where nothing can be written ----------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    scores = {"tc_shapes": [1.0, 1.0, 0.0, 1.0]}
    base = write_run(root / "base", {"tc_shapes": task_entry(0.75)}, samples=scores)
    current = write_run(root / "current", {"tc_shapes": task_entry(0.75)}, spec="dymu-mid", samples=scores)
    return base, current


@needs_proc
@pytest.mark.parametrize("where", ["/proc", "/sys"])
@pytest.mark.parametrize("command", ["calibrate", "inspect", "report --out", "report --plot"])
def test_an_unwritable_output_is_reported_before_the_work(command, where, runs, capsys, request):
    if command in ("calibrate", "inspect"):
        request.getfixturevalue("before_loading")
    target = Path(where) / ("tokcomp-out.png" if command in ("inspect", "report --plot") else "tokcomp-out.md")
    argv = {
        "calibrate": ["calibrate", "--model", "tiny-llava", "--budget", "mid", "--data", "builtin:skimage",
                      "--out", str(target.with_suffix(".yaml"))],
        "inspect": ["inspect", "builtin:skimage/coffee", "--model", "tiny-llava", "--calib",
                    str(ROOT / "calib" / "tiny-llava" / "mid.yaml"), "--out", str(target)],
        "report --out": ["report", *map(str, runs), "--out", str(target)],
        "report --plot": ["report", *map(str, runs), "--plot", str(target)],
    }[command]  # fmt: skip
    assert f"cannot write {where}/tokcomp-out" in bad_input(argv, capsys)


# --- exit codes: internal errors, standard output --------------------------------------------------------


def test_an_unexpected_exception_is_exit_3_with_one_line(runs, capsys, monkeypatch):
    import tokcomp.results.regress

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.delenv("TOKCOMP_DEBUG", raising=False)
    monkeypatch.setattr(tokcomp.results.regress, "regress", broken)
    code, _, err = run_tokcomp(["regress", "--baseline", str(runs[0]), "--current", str(runs[1])], capsys)
    assert code == 3 and err.count("\n") == 1, err
    assert err.startswith("error: internal error (RuntimeError: something unexpected)") and "TOKCOMP_DEBUG=1" in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_standard_output_is_exit_2_and_a_closed_pipe_exit_0(runs):
    argv = [str(TOKCOMP), "regress", "--baseline", str(runs[0]), "--current", str(runs[0])]
    for command in (argv, [str(TOKCOMP), "--help"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr == "error: cannot write to standard output: No space left on device\n"
    read_one_byte = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run(argv, stdout=read_one_byte.stdin, stderr=subprocess.PIPE, text=True, timeout=120)
    read_one_byte.stdin.close()
    read_one_byte.wait(timeout=30)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_regression_piped_into_head_still_exits_1(tmp_path):
    scores = [1.0] * 10
    base = write_run(tmp_path / "base", {"tc_shapes": task_entry(1.0)}, samples={"tc_shapes": scores})
    worse = write_run(tmp_path / "cur", {"tc_shapes": task_entry(0.5)}, samples={"tc_shapes": [1.0] * 5 + [0.0] * 5})
    read_one_byte = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    argv = [str(TOKCOMP), "regress", "--baseline", str(base), "--current", str(worse)]
    done = subprocess.run(argv, stdout=read_one_byte.stdin, stderr=subprocess.PIPE, text=True, timeout=120)
    read_one_byte.stdin.close()
    read_one_byte.wait(timeout=30)
    assert done.returncode == 1 and done.stderr == "", done.stderr
