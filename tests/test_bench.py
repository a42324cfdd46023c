"""`tokcomp bench` runs and writes a complete report (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_tokcomp as _run

from tokcomp.benchmark.bench import parse_input
from tokcomp.errors import TokcompError
from tokcomp.models.loading import load_vlm
from tokcomp.models.shapes import SHAPES


def test_bench_writes_a_complete_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny-llava", "--method", "dymu-mid", "--input", "images:2",
            "--repeat", "1", "--warmup", "0", "--max-new-tokens", "3", "--out", str(out)]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert {"machine", "model", "method", "input", "metrics", "date"} <= set(report)
    metrics = report["metrics"]
    for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_per_token_ms", "method_overhead_ms",
                "prefill_per_layer_ms", "kv_cache_bytes", "flops_prefill", "flops_decode_per_token",
                "visual_tokens", "peak_rss_bytes", "peak_rss_above_model_bytes"):  # fmt: skip
        assert key in metrics, key
        assert set(metrics[key]) >= {"full", "method", "ratio", "unit"}
    assert metrics["visual_tokens"]["method"] < metrics["visual_tokens"]["full"] == 392
    assert metrics["flops_vision"]["ratio"] < 1  # fewer tokens in later encoder layers


def test_bench_on_video_with_dycoke_evict(tmp_path, capsys):
    out = tmp_path / "video.json"
    code, _, err = _run(["bench", "--model", "tiny-llava-ov", "--method", "dycoke-evict", "--input", "video:8",
                         "--repeat", "1", "--warmup", "0", "--max-new-tokens", "4", "--no-memory", "--out", str(out)],
                        capsys)  # fmt: skip
    assert code == 0, err
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["visual_tokens"]["full"] == 8 * 49 + 1
    assert metrics["kv_cache_bytes"]["ratio"] < 1


def test_vision_layers_run_fewer_encoder_layers_and_extrapolate(tmp_path, capsys):
    out = tmp_path / "shape.json"
    argv = ["bench", "--model", "llava-ov-0.5b-shape", "--llm-layers", "2", "--vision-layers", "1",
            "--method", "dycoke-evict", "--set", "L=1", "--input", "video:2", "--repeat", "1", "--warmup", "0",
            "--max-new-tokens", "3", "--no-memory", "--out", str(out)]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert (report["vision_layers_run"], report["vision_layers_real"]) == (1, 26)
    assert (report["llm_layers_run"], report["llm_layers_real"]) == (2, 24)
    assert "--vision-layers 1" in report["command"]
    assert {"cpu", "logical_cpus", "torch_threads", "torch"} <= set(report["machine_info"])
    metrics = report["metrics"]
    assert metrics["vision_ms"]["note"] == "measured with 1 of 26 encoder layers"
    for key in ("vision_whole_model_ms", "ttft_whole_model_ms", "prefill_whole_model_ms", "kv_cache_bytes_whole_model"):
        assert metrics[key]["note"].startswith("extrapolated"), key
    assert metrics["vision_whole_model_ms"]["full"] == pytest.approx(26 * metrics["vision_ms"]["full"], rel=1e-3)
    kv, whole = metrics["kv_cache_bytes"], metrics["kv_cache_bytes_whole_model"]
    assert whole["full"] == 12 * kv["full"]  # the plain model's layers all hold the same
    assert whole["method"] < 12 * kv["method"]  # evicted from layer L=1 on: the layers not run are taken as layer 1
    assert "26 encoder" in metrics["flops_vision"]["note"]


def test_layer_options_are_for_real_shapes_only(capsys):
    code, _, err = _run(["bench", "--model", "tiny-llava", "--method", "none", "--vision-layers", "2"], capsys)
    assert code == 2 and "real-shape presets only" in err
    code, _, err = _run(["bench", "--model", "llava-1.5-7b-shape", "--method", "none", "--vision-layers", "1"], capsys)
    assert code == 2 and "at least 2" in err  # LLaVA-1.5 reads the second-to-last encoder layer


def test_real_shapes_have_the_released_layer_sizes():
    adapter = load_vlm("llava-ov-0.5b-shape", llm_layers=1)
    assert adapter.num_patches == 27 * 27 and adapter.num_layers == 26
    assert adapter.language_model.config.hidden_size == 896 and len(adapter.language_model.layers) == 1
    assert SHAPES["llava-1.5-7b-shape"].text["hidden_size"] == 4096


@pytest.mark.parametrize("spec", ["images", "video:x", "clip:3", "images:0"])
def test_bad_inputs_are_refused(spec):
    with pytest.raises(TokcompError):
        parse_input(spec)


def test_whole_model_prefill_charges_layers_before_the_cut_at_the_plain_time():
    from tokcomp.benchmark.bench import whole_model_prefill

    # no cut: every layer at the measured mean
    assert whole_model_prefill(8.0, 8.0, used=4, real=32) == pytest.approx(64.0)
    # plain 2 ms a layer; the method's 2 layers after the cut at K=2 take 1 ms each (6 ms measured)
    assert whole_model_prefill(6.0, 8.0, used=4, real=32, cut=2) == pytest.approx(2 * 2 + 30 * 1)
    # a cut that saves nothing extrapolates to the plain whole model, and one outside the run is ignored
    assert whole_model_prefill(8.0, 8.0, used=4, real=32, cut=2) == pytest.approx(64.0)
    assert whole_model_prefill(6.0, 8.0, used=4, real=32, cut=4) == pytest.approx(48.0)


def test_the_extrapolations_of_a_cut_method_say_how_its_layers_were_charged():
    from tokcomp.benchmark.bench import _add_extrapolations

    metrics: dict[str, tuple[float, float, str]] = {}
    times = {("full", "prefill"): 8.0, ("method", "prefill"): 6.0, ("full", "ttft"): 10.0,
             ("method", "ttft"): 8.0, ("full", "vision"): 1.0, ("method", "vision"): 1.0,
             ("full", "decode_per_token"): 4.0, ("method", "decode_per_token"): 3.0,
             ("full", "trace"): 0.0, ("method", "trace"): 0.0}  # fmt: skip

    def add(name, full, method, unit, note=""):
        metrics[name] = (full, method, note)

    _add_extrapolations(add, lambda v, k: times[(v, k)], (4, 32), (1, 1), cut=2)
    full, method, note = metrics["prefill_whole_model_ms"]
    assert (full, method) == pytest.approx((64.0, 34.0))  # 2 x 2 ms + 30 x 1 ms
    assert "layers 0-1 at the plain per-layer time, layers 2-31" in note
    assert metrics["ttft_whole_model_ms"][:2] == pytest.approx((10 + 56, 8 + 28))
    assert "layers 2-31" in metrics["decode_per_token_whole_model_ms"][2]


def test_an_encoder_trace_is_charged_once_in_the_whole_encoder():
    """The trace recomputes one layer's attention: the extrapolation scales the rest of the vision time
    with the encoder's depth and adds the trace once."""
    from tokcomp.benchmark.bench import _add_extrapolations

    metrics: dict[str, tuple[float, float, str]] = {}
    times = {("full", "prefill"): 8.0, ("method", "prefill"): 2.0, ("full", "ttft"): 20.0,
             ("method", "ttft"): 16.0, ("full", "vision"): 10.0, ("method", "vision"): 13.0,
             ("full", "decode_per_token"): 4.0, ("method", "decode_per_token"): 3.0,
             ("full", "trace"): 0.0, ("method", "trace"): 3.0}  # fmt: skip

    def add(name, full, method, unit, note=""):
        metrics[name] = (full, method, note)

    _add_extrapolations(add, lambda v, k: times[(v, k)], (4, 4), (1, 26))
    assert metrics["vision_per_layer_ms"][:2] == pytest.approx((10.0, 10.0))
    assert metrics["vision_whole_model_ms"][:2] == pytest.approx((260.0, 263.0))
    assert "counted once" in metrics["vision_whole_model_ms"][2]
    assert metrics["ttft_whole_model_ms"][:2] == pytest.approx((20 + 250, 16 + 250))
