"""End-to-end check of tokcomp's vLLM plugin on CPU (`make test-vllm`; runs in the vLLM venv).

    python tools/vllm/test_plugin.py CHECKPOINT     # the checks below; exit 1 on the first that fails
    python tools/vllm/test_plugin.py --engine CHECKPOINT OUT.json   # one engine run (env picks the method)

1. The mask functions: each method fills exactly vLLM's EVS count; asked to keep every token it keeps
   every one (the do-nothing setting, through the method's own scoring); divprune keeps what tokcomp's
   DivPrune keeps.
2. Engines on a tiny Qwen2.5-VL checkpoint: without a pruning rate, the plugin loaded with a method set
   gives the tokens of vLLM without plugins, which are transformers' own. With `video_pruning_rate=0.5`
   and no method, the tokens are vLLM's EVS and no selection of the plugin's ran; with
   TOKCOMP_VLLM_METHOD=divprune (random, dycoke) the prompt keeps vLLM's placeholder count, every
   selection kept exactly that count, a concurrent batch of three videos gives each the tokens it gets
   alone, and the tokens equal transformers' with the same tokens pruned by hand, each kept token at its
   own M-RoPE coordinates (so vLLM moved the positions right).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
RATE = 0.5


def videos(count: int) -> list[tuple]:
    """Random (8, 112, 112, 3) videos with their metadata (2 fps)."""
    from inputs import video

    return [video(seed, 8, 112) for seed in range(count)]


def record_positions() -> list:
    """Record the M-RoPE positions vLLM gives each pruned prompt (the engine runs in this process)."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Model

    recorded, recompute = [], Model.recompute_mrope_positions

    def recording(self, *args, **kwargs):
        result = recompute(self, *args, **kwargs)
        recorded.append(result[1].tolist())
        return result

    Model.recompute_mrope_positions = recording
    return recorded


def engine(checkpoint: str, rate: float | None) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    positions = record_positions()
    llm = LLM(model=checkpoint, max_model_len=1024, enforce_eager=True, dtype="float32", seed=0, max_num_seqs=4,
              limit_mm_per_prompt={"video": 1, "image": 0}, video_pruning_rate=rate,
              distributed_executor_backend="uni")  # fmt: skip
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": prompt, "multi_modal_data": {"video": v}} for v in videos(3)]
    alone, alone_positions = [], []
    for request in requests:  # (the engine's start-up profiling recomputed positions of its own)
        positions.clear()
        alone.append(llm.generate([request], params, use_tqdm=False)[0])
        alone_positions.append(positions[-1] if positions else None)
    together = llm.generate(requests, params, use_tqdm=False)
    return {
        "alone": [list(o.outputs[0].token_ids) for o in alone],
        "together": [list(o.outputs[0].token_ids) for o in together],
        "prompt_lengths": [len(o.prompt_token_ids) for o in alone],
        "positions": alone_positions,  # (3, prompt length) per request alone, as vLLM recomputed them
        "seconds": round(time.perf_counter() - started, 1),
    }


def reference(checkpoint: str, method: str | None) -> tuple[list, list]:
    """Greedy tokens of each video in plain transformers, pruned by hand with the plugin's own mask (None:
    unpruned), every kept token at its M-RoPE position of the unpruned prompt; and per video those
    unpruned positions with the prompt's video slots."""
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    from tokcomp.serving import vllm_plugin as plugin

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = Qwen2_5_VLProcessor(image_processor=AutoImageProcessor.from_pretrained(checkpoint), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor.from_pretrained(checkpoint),
                                    chat_template=tokenizer.chat_template)  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    merge = model.config.vision_config.spatial_merge_size
    answers, unpruned = [], []
    for frames, _ in videos(3):
        inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
        inputs["second_per_grid_ts"] = torch.tensor([2 / 2.0])  # temporal patch / fps, as vLLM reads the metadata
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(
                inputs["input_ids"], inputs.get("mm_token_type_ids"), video_grid_thw=inputs["video_grid_thw"],
                second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
            )  # fmt: skip
            video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            video = video.pooler_output[0]
            t, h, w = inputs["video_grid_thw"][0].tolist()
            count = compute_retained_tokens_count((h // merge) * (w // merge), t, RATE)
            everything = torch.ones(len(video), dtype=torch.bool)
            mask = plugin.retention_mask(method, video, count, frames=t) if method else everything
            embeds = model.get_input_embeddings()(ids).clone()
            is_video = ids == model.config.video_token_id
            embeds[is_video] = video
            keep = ~is_video
            keep[is_video] = mask
            positions = positions[:, 0].clone()
            unpruned.append({"positions": positions.tolist(), "video": is_video.nonzero().flatten().tolist()})
            embeds, positions, tokens = embeds[keep], positions[:, keep], []
            for _ in range(4):
                logits = model(inputs_embeds=embeds[None], position_ids=positions[:, None]).logits[0, -1]
                token = int(logits.argmax())
                tokens.append(token)
                embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
                positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        answers.append(tokens)
    return answers, unpruned


def positions_kept(engine_positions: list, unpruned: dict, kept: list[int]) -> bool:
    """vLLM's positions of a pruned prompt are transformers' of the unpruned prompt, restricted to the
    text and the kept video tokens (each kept token where it was, nothing renumbered)."""
    import torch

    full = torch.tensor(unpruned["positions"])
    keep = torch.ones(full.shape[1], dtype=torch.bool)
    keep[unpruned["video"]] = False
    keep[torch.tensor(unpruned["video"])[torch.tensor(kept)]] = True
    mine = torch.tensor(engine_positions)[:, : int(keep.sum())]  # (vLLM's buffer runs past the prompt)
    return torch.equal(mine, full[:, keep])


def run_engine(checkpoint: str, method: str | None, trace: Path, rate: float | None = RATE, plugins: bool = True,
               in_process: bool = True) -> dict:  # fmt: skip
    """One engine in a process of its own (vLLM loads plugins at start-up): its outputs and the plugin's trace.

    ``in_process``: engine core and worker in that process (vLLM's positions are recorded); otherwise vLLM's
    default, an engine-core process and a worker process, where the plugin must load again."""
    env = {**os.environ, "TOKCOMP_VLLM_TRACE": str(trace), "OMP_NUM_THREADS": "1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    env.pop("TOKCOMP_VLLM_METHOD", None)
    if method:
        env["TOKCOMP_VLLM_METHOD"] = method
    if not plugins:
        env["VLLM_PLUGINS"] = "none-loaded"  # only plugins of that name load: none
    result = trace.with_suffix(".result.json")
    command = [sys.executable, __file__, "--engine", checkpoint, str(result), str(rate or 0)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"engine ({method or 'vLLM EVS'}) failed:\n{done.stderr[-3000:]}")
    run = json.loads(result.read_text())
    run["trace"] = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    return run


def check(condition: bool, what: str) -> None:
    print(("ok    " if condition else "FAIL  ") + what, flush=True)
    if not condition:
        raise SystemExit(1)


def mask_checks() -> None:
    import torch
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count, compute_retention_mask

    from tokcomp.methods import selection as S
    from tokcomp.methods.pruning import DivPrune
    from tokcomp.serving import vllm_plugin as plugin

    embeddings = torch.randn(4 * 16, 32, generator=torch.Generator().manual_seed(0))
    count = compute_retained_tokens_count(16, 4, RATE)
    for method in plugin.METHODS:
        mask = plugin.make_mask_function(method)(embeddings, (4, 8, 8), 2, RATE)
        check(int(mask.sum()) == count == int(compute_retention_mask(embeddings, (4, 8, 8), 2, RATE).sum()),
              f"{method}: keeps vLLM's EVS count ({count} of {embeddings.shape[0]})")  # fmt: skip
        everything = plugin.retention_mask(method, embeddings, embeddings.shape[0])
        check(bool(everything.all()), f"{method}: asked to keep every token, keeps every token")
    ours = plugin.retention_mask("divprune", embeddings, count).nonzero().flatten()
    theirs = S.top_k_stable(DivPrune().score(embeddings, None, 0), count).sort().values
    check(ours.tolist() == theirs.tolist(), "divprune: the tokens tokcomp's DivPrune keeps")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--engine"]:
        Path(argv[2]).write_text(json.dumps(engine(argv[1], float(argv[3]) or None)))
        return 0
    from tokcomp.serving import vllm_plugin as plugin

    checkpoint = argv[0]
    mask_checks()
    with tempfile.TemporaryDirectory() as folder:
        traces = Path(folder)
        plain = run_engine(checkpoint, None, traces / "plain.jsonl", rate=None, plugins=False)
        loaded = run_engine(checkpoint, "divprune", traces / "loaded.jsonl", rate=None)
        methods = (None, *plugin.METHODS)
        runs = {method: run_engine(checkpoint, method, traces / f"{method}.jsonl") for method in methods}
        processes = run_engine(checkpoint, "divprune", traces / "processes.jsonl", in_process=False)
    for name, run in [("no pruning", plain), ("no pruning, plugin on", loaded), *runs.items()]:
        name = name or "vLLM EVS"
        print(f"engine {name}: {run['seconds']} s, prompts {run['prompt_lengths']}, tokens {run['alone']}")
    check(loaded["alone"] == plain["alone"] and not loaded["trace"],
          "no pruning rate: with the plugin and a method set, vLLM's own tokens (no selection ran)")  # fmt: skip
    check(plain["alone"] == reference(checkpoint, None)[0], "no pruning: vLLM's tokens are transformers' own")
    evs = runs[None]
    check(not evs["trace"], "pruning rate, no method: the plugin selects nothing (vLLM's own EVS)")
    for method in plugin.METHODS:
        run = runs[method]
        check(run["prompt_lengths"] == evs["prompt_lengths"], f"{method}: vLLM's placeholder count kept")
        check(len(run["trace"]) >= 3 and all(len(t["kept"]) == t["count"] for t in run["trace"]),
              f"{method}: every selection ({len(run['trace'])}) kept exactly vLLM's count")  # fmt: skip
        check(run["together"] == run["alone"], f"{method}: a concurrent batch of 3 gives each its tokens alone")
        expected, unpruned = reference(checkpoint, method)
        check(run["alone"] == expected, f"{method}: the tokens of transformers with the same tokens pruned by hand")
        kept = [t["kept"] for t in run["trace"][:3]]
        check(len(run["positions"]) == 3 and all(map(positions_kept, run["positions"], unpruned, kept)),
              f"{method}: vLLM's M-RoPE positions are transformers' unpruned ones of the text and the kept tokens")
    check(evs["together"] == evs["alone"], "vLLM EVS: the batch gives each its tokens alone")
    same = processes["alone"] == runs["divprune"]["alone"] and processes["together"] == runs["divprune"]["alone"]
    check(same and len(processes["trace"]) >= 3 and not processes["positions"][0],
          "divprune with vLLM's engine-core and worker processes: the plugin selects there, same tokens")  # fmt: skip
    kept = {tuple(runs[method]["trace"][0]["kept"]) for method in plugin.METHODS}
    check(len(kept) == len(plugin.METHODS), f"{', '.join(plugin.METHODS)}: each keeps other tokens")
    shown = ("alone", "together", "prompt_lengths", "seconds")
    summary = {name or "evs": {k: run[k] for k in shown} for name, run in runs.items()}
    print(json.dumps({"no-pruning": plain["alone"], **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
