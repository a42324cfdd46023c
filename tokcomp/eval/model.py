"""The lmms-eval model ``tokcomp``: a VLM loaded by tokcomp with a compression method attached.

Used by ``tokcomp eval`` (as an instance) and by lmms-eval's own command line through the
``lmms_eval.models`` entry point::

    lmms-eval --model tokcomp --model_args pretrained=tokcomp-tiny,method=dymu-mid \\
        --tasks tc_shapes --include_path tokcomp/eval/tasks

Every answer also leaves a :class:`SampleRecord` (tokens before and after compression, timings, KV
bytes) in ``records``, keyed by (task, doc_id).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image

from tokcomp.defaults import DEFAULT_FRAMES, DEFAULT_MAX_NEW_TOKENS
from tokcomp.errors import TokcompError
from tokcomp.methods.base import Method
from tokcomp.pipeline import Generation, Pipeline, Request

TIMING_KEYS = {
    "vision_ms": "vision",
    "prefill_ms": "prefill",
    "ttft_ms": "ttft",
    "decode_ms_per_token": "decode_per_token",
}


@dataclass
class SampleRecord:
    """What one answer cost: visual tokens of the stock model and after the method, timings, KV bytes."""

    visual_full: int
    visual_kept: int
    timings_ms: dict[str, float]
    kv_bytes: int
    prompt_tokens: int
    output_tokens: int
    plain_timings_ms: dict[str, float] | None = None  # the uncompressed model on the same sample (--paired-timing)

    @classmethod
    def from_generation(cls, gen: Generation, batch_size: int) -> SampleRecord:
        """Per-sample numbers; timings of a batch are shared equally by its requests."""
        acc = gen.account
        timings = {key: gen.timings_ms.get(src, 0.0) for key, src in TIMING_KEYS.items()}
        if batch_size > 1:
            timings = {k: v / batch_size for k, v in timings.items()}
        return cls(
            visual_full=acc.visual_full,
            visual_kept=acc.visual_kept,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            kv_bytes=acc.kv_bytes,
            prompt_tokens=acc.prompt_tokens_kept,
            output_tokens=len(gen.token_ids),
        )


def split_visuals(visuals: Sequence, frames: int, load_video: Callable) -> tuple[list[Image.Image], list | None]:
    """Images and at most one clip from ``doc_to_visual``: PIL images, a video path, or a list of frames."""
    images, clips = [], []
    for v in visuals or []:
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, str):
            clips.append(load_video(v, frames))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(f, Image.Image) for f in v):
            clips.append([f.convert("RGB") for f in v])
        else:
            raise TokcompError(f"cannot read a visual of type {type(v).__name__} (images, video paths or frames)")
    if len(clips) > 1:
        raise TokcompError(f"a document with {len(clips)} videos; tokcomp takes one video per prompt")
    return images, (clips[0] if clips else None)


# lmms-eval's own keys, not generation settings: the stop strings and the length (tokcomp applies both).
NOT_GENERATION = ("until", "max_new_tokens")


def generation_options(gen_kwargs: dict, task: str) -> dict:
    """A task's generation settings as keyword arguments for the stock ``generate``: passed straight
    through, with lmms-eval's conventions made explicit (``temperature: 0`` means greedy). A key that
    ``GenerationConfig`` does not know, or more than one answer per document, is refused."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    options = {k: v for k, v in gen_kwargs.items() if k not in NOT_GENERATION and v is not None}
    for key in options:
        if not hasattr(known, key):
            raise TokcompError(f"{task} asks for generation setting {key}={options[key]!r}, unknown to generate")
    if int(options.get("num_return_sequences", 1)) != 1:
        count = options["num_return_sequences"]
        raise TokcompError(f"{task} asks for {count} answers per document; tokcomp scores one")
    temperature = options.get("temperature")
    if temperature is not None and float(temperature) <= 0:  # lmms-eval's way of saying greedy
        options.pop("temperature")
        options["do_sample"] = False
    elif temperature is not None and "do_sample" not in options:
        options["do_sample"] = True
    if not options.get("do_sample"):
        for key in ("top_p", "top_k", "typical_p", "min_p"):  # sampling-only: greedy ignores them anyway
            options.pop(key, None)
    return options


def check_generation(gen_kwargs: dict, task: str) -> None:
    """Refuse a task's generation settings that generate cannot honour (never ignore them)."""
    generation_options(gen_kwargs, task)


def cut_at_stops(text: str, until: Sequence[str] | str | None) -> str:
    """``text`` up to the first stop string (lmms-eval's ``until``)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


class TokcompLMM(lmms):
    """A tokcomp-loaded VLM with a method attached while it answers (``generate_until`` only)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "tokcomp-tiny",
        method: str = "none",
        calib: str | None = None,
        batch_size: int | str = 1,
        max_frames_num: int = DEFAULT_FRAMES,
        progress: bool = True,
        dtype: str = "auto",
        paired_timing: bool | str = False,
        adapter=None,
        device: str | None = None,
        device_map: str | None = None,
        max_batch_size: int | None = None,
        **settings,
    ) -> None:
        super().__init__()

        from tokcomp.distributed import current_world, process_device
        from tokcomp.methods.registry import build_method
        from tokcomp.models.loading import load_vlm

        self.model_name = str(pretrained)
        world = current_world()  # torchrun / accelerate launch / --processes: one GPU per process
        self._rank, self._world_size = world.rank, world.size
        if adapter is None:
            device = process_device(str(device or "auto"), world)
            adapter = load_vlm(self.model_name, dtype=str(dtype), device=device, device_map=device_map)
        self.adapter = adapter
        method_settings = {key: str(value) for key, value in settings.items() if value is not None}
        self.method_spec = str(method)
        self.method = build_method(
            self.method_spec, self.model_name, self.adapter.num_layers, str(calib) if calib else None, method_settings,
            self.adapter.supports_encoder_merging,
        )
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.max_frames_num = int(max_frames_num)
        self.progress = progress
        self.paired_timing = str(paired_timing).lower() in ("1", "true", "yes")
        self.records: dict[tuple[str, int], SampleRecord] = {}

    @property
    def device(self):
        """Where the model's first weights live (lmms-eval puts its gather buffers there)."""
        return next(self.adapter.model.parameters()).device

    def _requests(self, instances: Sequence[Instance]) -> list[tuple[Request, int, list[str] | None]]:
        from tokcomp.data.video import load_video

        out = []
        for inst in instances:
            contexts, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args
            doc = self.task_dict[task][split][doc_id]
            images, clip = split_visuals(doc_to_visual(doc), self.max_frames_num, load_video)
            max_new = int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
            out.append((Request(str(contexts), images, clip), max_new, gen_kwargs.get("until")))
        return out

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        for inst in requests:  # before any answer: a setting tokcomp cannot honour fails the run at once
            check_generation(inst.args[1], inst.args[4])
        results: list[GenerationResult | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: (requests[i].args[4], requests[i].args[3]))
        pipes: dict[str, Pipeline] = {}  # one per distinct generation setting among the tasks
        # --paired-timing: the plain model answers every sample too, in the same process, the two runs
        # alternating which goes first, after one warm-up of each; only the method's answer is scored.
        plain = Pipeline(self.adapter, Method()) if self.paired_timing and type(self.method) is not Method else None
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # Attached once for the whole run; with --paired-timing each generate attaches its own method per call.
        attached = contextlib.nullcontext() if plain is not None else self.method(self.adapter)
        with Progress(*columns, disable=not self.progress, transient=True) as bar, attached:
            job = bar.add_task(f"{self.model_name} · {self.method_spec}", total=len(requests))
            chunks = _chunks(order, self.batch_size_per_gpu, lambda i: _settings_key(requests[i]))
            for number, chunk in enumerate(chunks):
                options = generation_options(requests[chunk[0]].args[1], requests[chunk[0]].args[4])
                key = json.dumps(options, sort_keys=True, default=str)
                pipe = pipes.setdefault(key, Pipeline(self.adapter, self.method, generation=options))
                if plain is not None:
                    plain.generation = options
                prepared = self._requests([requests[i] for i in chunk])
                batch, max_new = [r for r, _, _ in prepared], max(m for _, m, _ in prepared)
                if plain is not None and number == 0:  # warm-up, not recorded
                    plain.generate(batch, max_new_tokens=max_new)
                    pipe.generate(batch, max_new_tokens=max_new)
                plain_first = plain is not None and number % 2 == 0
                baseline = plain.generate(batch, max_new_tokens=max_new) if plain_first else None
                generations = pipe.generate(batch, max_new_tokens=max_new)
                if plain is not None and not plain_first:
                    baseline = plain.generate(batch, max_new_tokens=max_new)
                for k, (i, (_, _, until), gen) in enumerate(zip(chunk, prepared, generations, strict=True)):
                    _, _, _, doc_id, task, _ = requests[i].args
                    record = SampleRecord.from_generation(gen, len(chunk))
                    if baseline is not None:
                        record.plain_timings_ms = SampleRecord.from_generation(baseline[k], len(chunk)).timings_ms
                    self.records[(task, int(doc_id))] = record
                    text = cut_at_stops(gen.answer, until)
                    results[i] = GenerationResult(text, TokenCounts(record.prompt_tokens, record.output_tokens))
                bar.advance(job, len(chunk))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise TokcompError("tokcomp answers generation tasks only (output_type: generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise TokcompError("tokcomp does not run multi-round tasks")


def manifests():
    """The ``lmms_eval.models`` entry point: ``--model tokcomp``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest("tokcomp", simple_class_path="tokcomp.eval.model.TokcompLMM")]


def _settings_key(request: Instance) -> str:
    """A request's generation settings (without its length and stops), for batching alike ones together."""
    gen_kwargs = {k: v for k, v in request.args[1].items() if k not in NOT_GENERATION}
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def _chunks(order: list[int], size: int, key: Callable[[int], str]) -> list[list[int]]:
    """``order`` cut into batches of at most ``size``, a new one wherever the settings change."""
    chunks: list[list[int]] = []
    for index in order:
        if not chunks or len(chunks[-1]) == size or key(chunks[-1][0]) != key(index):
            chunks.append([])
        chunks[-1].append(index)
    return chunks
