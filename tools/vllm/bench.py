"""tokcomp's selection inside vLLM on CPU: time to first token and throughput with and without pruning.

    python tools/vllm/bench.py CHECKPOINT --case vllm-tiny --model tiny-qwen2.5-vl --frames 16 --size 224 \\
        --rate 0.75 --repeat 3 --out-dir results/bench        # in the vLLM venv (`make bench-vllm`)

One process holds two engines (vLLM's in-process mode): the plain one and one with ``video_pruning_rate``,
whose selection switches per request between vLLM's EVS and the plugin's methods (the plugin's mask
function is what the Qwen module calls). Each repeat runs every configuration once, in a rotating order,
on videos of its own, so no prefix or encoder cache can serve a request; every time is a median and
every ratio is configuration / plain from the same run. Writes one ``tokcomp bench`` report per
configuration (``CASE-evs.json``, ``CASE-divprune.json``, ...) for ``tokcomp bench-md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engines in this process: the mask can be switched
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
CONFIGURATIONS = ("plain", "evs", "divprune", "random", "dycoke")


def select(configuration: str) -> None:
    """Point the Qwen modules' mask function at vLLM's EVS or at the plugin's method."""
    from vllm.multimodal.video_prune import evs

    from tokcomp.serving import vllm_plugin as plugin

    vllms_own = configuration in ("plain", "evs")
    plugin.install_mask_function(evs.compute_retention_mask if vllms_own else plugin.make_mask_function(configuration))


def report(case: str, configuration: str, args: argparse.Namespace, metrics: dict, machine: dict) -> dict:
    import vllm

    command = "python " + shlex.join(["tools/vllm/bench.py", *sys.argv[1:]])
    vision_layers = {"vision_layers_run": args.vision_layers_run, "vision_layers_real": args.vision_layers_real}
    return {
        "tool": f"vLLM {vllm.__version__} (CPU) with the tokcomp plugin",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}",
        "machine_info": {**machine, "vllm": vllm.__version__},
        "model": args.model,
        "llm_layers_run": args.llm_layers_run,
        "llm_layers_real": args.llm_layers_real,
        **(vision_layers if args.vision_layers_run else {}),
        "method": {"method": f"vllm-{configuration}", "video_pruning_rate": args.rate},
        "input": f"video:{args.frames}@{args.size}px",
        "repeat": args.repeat,
        "warmup": 1,
        "new_tokens": args.new_tokens,
        "metrics": metrics,
        "command": command,
    }


def metric(full: float, method: float, unit: str, note: str = "") -> dict:
    entry = {"full": full, "method": method, "ratio": method / full if full else None, "unit": unit}
    return {**entry, "note": note} if note else entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--case", required=True, help="prefix of the report names")
    parser.add_argument("--model", required=True, help="the model's name in the reports")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rate", type=float, default=0.75)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="concurrent requests in the throughput run")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=Path("results/bench"))
    parser.add_argument("--llm-layers-run", type=int, default=0)
    parser.add_argument("--llm-layers-real", type=int, default=0)
    parser.add_argument("--vision-layers-run", type=int, default=0)
    parser.add_argument("--vision-layers-real", type=int, default=0)
    args = parser.parse_args()

    import torch
    from inputs import video
    from vllm import LLM, SamplingParams

    from tokcomp.machine import machine_info

    settings = dict(model=args.checkpoint, max_model_len=4096, enforce_eager=True, dtype="float32", seed=0,
                    max_num_seqs=args.batch, limit_mm_per_prompt={"video": 1, "image": 0},
                    enable_prefix_caching=False, distributed_executor_backend="uni")  # fmt: skip
    engines = {"plain": LLM(**settings), "pruned": LLM(**settings, video_pruning_rate=args.rate)}
    tokenizer = engines["plain"].get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens in the video"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    seeds = iter(range(10**6))

    def run(configuration: str, batch: int, params: SamplingParams) -> tuple[float, list]:
        select(configuration)
        engine = engines["plain" if configuration == "plain" else "pruned"]
        requests = [{"prompt": prompt, "multi_modal_data": {"video": video(next(seeds), args.frames, args.size)}}
                    for _ in range(batch)]  # fmt: skip
        started = time.perf_counter()
        outputs = engine.generate(requests, params, use_tqdm=False)
        return (time.perf_counter() - started) * 1000, outputs

    for configuration in CONFIGURATIONS:  # warm-up
        run(configuration, 1, first)
        run(configuration, args.batch, many)
    times: dict[str, dict[str, list[float]]] = {c: {"ttft": [], "batch": []} for c in CONFIGURATIONS}
    prompt_tokens: dict[str, list[int]] = {c: [] for c in CONFIGURATIONS}
    for repeat in range(args.repeat):
        shift = repeat % len(CONFIGURATIONS)
        order = CONFIGURATIONS[shift:] + CONFIGURATIONS[:shift]
        for configuration in order:
            ttft, outputs = run(configuration, 1, first)
            times[configuration]["ttft"].append(ttft)
            prompt_tokens[configuration].append(len(outputs[0].prompt_token_ids))
            elapsed, outputs = run(configuration, args.batch, many)
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
            times[configuration]["batch"].append(elapsed)
            print(f"repeat {repeat + 1}/{args.repeat} {configuration}: ttft {ttft:.0f} ms, "
                  f"batch of {args.batch} {elapsed:.0f} ms", flush=True)  # fmt: skip

    text_tokens = len(tokenizer(prompt)["input_ids"]) - 1  # the one video placeholder expands
    machine = machine_info("cpu") | {"torch_threads": torch.get_num_threads()}
    median = {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()}
    plain = median["plain"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for configuration in CONFIGURATIONS[1:]:
        mine = median[configuration]
        generated = args.batch * args.new_tokens
        metrics = {
            "ttft_ms": metric(plain["ttft"], mine["ttft"], "ms", "one request, 1 new token: processor, encoder, "
                              "selection, prefill"),
            "batch_ms": metric(plain["batch"], mine["batch"], "ms", f"{args.batch} concurrent requests, "
                               f"{args.new_tokens} new tokens each"),
            "throughput_tokens_per_s": metric(generated * 1000 / plain["batch"], generated * 1000 / mine["batch"],
                                              "tokens/s", "new tokens / batch time (higher is better)"),
            "requests_per_s": metric(args.batch * 1000 / plain["batch"], args.batch * 1000 / mine["batch"],
                                     "requests/s", "higher is better"),
            "prompt_tokens": metric(statistics.median(prompt_tokens["plain"]),
                                    statistics.median(prompt_tokens[configuration]), ""),
            "visual_tokens": metric(statistics.median(prompt_tokens["plain"]) - text_tokens,
                                    statistics.median(prompt_tokens[configuration]) - text_tokens, "",
                                    "vLLM's placeholder count"),
        }  # fmt: skip
        path = args.out_dir / f"{args.case}-{configuration}.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(report(args.case, configuration, args, metrics, machine), indent=1) + "\n")
        temporary.replace(path)
        print(f"wrote {path}: ttft {metrics['ttft_ms']['ratio']:.3f}x, "
              f"throughput {metrics['throughput_tokens_per_s']['ratio']:.3f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
