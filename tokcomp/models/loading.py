"""Load a VLM by preset name, local checkpoint path, or hub id already in the local cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers import logging as hf_logging

from tokcomp import resources
from tokcomp.errors import TokcompError
from tokcomp.models.adapters import VLMAdapter
from tokcomp.models.families import ADAPTERS
from tokcomp.models.presets import PRESETS, ensure_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Trained checkpoints committed to the repository and shipped in the wheel, by name (see tokcomp.tiny).
COMMITTED = {"tokcomp-tiny": resources.checkpoint("tokcomp-tiny")}


def resolve_model_path(name: str) -> tuple[str, bool]:
    """(path or hub id, is_local). Preset names are built into the cache on first use."""
    if name in COMMITTED:
        folder = COMMITTED[name]
        if not (folder / "config.json").exists():
            raise TokcompError(
                f"the {name} checkpoint is missing ({folder}); retrain it with `tokcomp train-tiny`"
            )
        return str(folder), True
    if name in PRESETS:
        hf_logging.disable_progress_bar()
        return str(ensure_preset(name)), True
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise TokcompError(f"{name} is not a model checkpoint folder (no config.json)")
        return name, True
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        from tokcomp.models.shapes import SHAPES

        known = ", ".join(sorted([*PRESETS, *COMMITTED, *SHAPES]))
        raise TokcompError(f"unknown model '{name}': not a preset ({known}) nor an existing folder")
    return name, False


# Where a processor keeps its chat template, in the order AutoProcessor reads them.
PROCESSOR_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json")


def processor_chat_template(path: str, offline: bool) -> str | None:
    """The chat template of the checkpoint's processor (a folder or a hub id), if it has one.

    A real repository's tokenizer may carry its text model's template, which cannot place images
    (LLaVA-OneVision's is Qwen2-Instruct's); the processor's is the one written for image and video turns.
    """
    from transformers.utils import cached_file

    for name in PROCESSOR_TEMPLATE_FILES:
        file = cached_file(
            path, name, local_files_only=offline,
            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        )  # fmt: skip
        if file is None:
            continue
        text = Path(file).read_text(encoding="utf-8")
        data = text if name.endswith(".jinja") else json.loads(text)
        template = data.get("chat_template") if isinstance(data, dict) else data
        if isinstance(template, str) and template.strip():
            return template
    return None


def _check_hub_cache(repo_id: str, name: str) -> None:
    """A hub id, loaded offline, must have its config.json in the local Hugging Face cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as exc:  # HFValidationError: not a repository id
        raise TokcompError(f"unknown model '{name}': {str(exc).splitlines()[0]}") from None
    if not isinstance(cached, str):
        raise TokcompError(
            f"cannot load model '{name}': it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and tokcomp does not download; fetch it first (`hf download {repo_id}`) or set TOKCOMP_ALLOW_DOWNLOAD=1"
        )


def _check_checkpoint(folder: Path, name: str) -> None:
    """A local checkpoint's config.json names a supported model type (read before any weights load)."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokcompError(f"cannot read {config_file}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ADAPTERS:
        found = f"model type '{model_type}'" if model_type else "no model_type"
        supported = ", ".join(ADAPTERS)
        raise TokcompError(f"model {name} is not supported: its config.json has {found} (supported: {supported})")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (the first GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise TokcompError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, {build})")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise TokcompError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise TokcompError(f"unknown device '{device}' (auto, cpu, cuda or cuda:N)")


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU; anything else must be one of DTYPES."""
    text = str(dtype).strip().lower()
    if text == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if text not in DTYPES:
        raise TokcompError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(DTYPES)})")
    return text


def load_vlm(
    name: str,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    llm_layers: int | None = None,
    vision_layers: int | None = None,
    device: str = "auto",
    device_map: str | None = None,
) -> VLMAdapter:
    """Load a supported VLM with ``from_pretrained``, offline unless TOKCOMP_ALLOW_DOWNLOAD=1.

    ``device`` puts the whole model on one device; ``device_map`` (``auto``, ``balanced``, ...) instead
    spreads a model too large for one GPU over all of them with accelerate, and the dtype follows the
    first GPU. Real-shape presets (``llava-1.5-7b-shape``, ...) are built in memory with random weights;
    ``llm_layers`` / ``vision_layers`` keep only that many of their decoder / encoder layers.
    """
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise TokcompError(f"unknown device map '{device_map}' ({', '.join(DEVICE_MAPS)})")
    target = resolve_device("cuda" if device_map is not None else device)
    dtype = resolve_dtype(dtype, target)
    from tokcomp.models.shapes import SHAPES, build_shape

    if name in SHAPES:
        least = 2 if SHAPES[name].family == "llava" else 1  # LLaVA-1.5 reads the second-to-last layer
        if vision_layers is not None and vision_layers < least:
            raise TokcompError(f"--vision-layers must be at least {least} for {name}")
        if llm_layers is not None and llm_layers < 1:
            raise TokcompError("--llm-layers must be at least 1")
        if device_map is not None:
            raise TokcompError("--device-map is for checkpoints; a real-shape preset goes on one --device")
        model, tokenizer, processor = build_shape(name, llm_layers, vision_layers=vision_layers)
        model = model.to(device=target, dtype=DTYPES[dtype])
        model.set_attn_implementation(attn_implementation)
        adapter = ADAPTERS[SHAPES[name].family](model, tokenizer, processor, name)
        adapter.shape = SHAPES[name]
        return adapter
    if llm_layers is not None or vision_layers is not None:
        raise TokcompError("--llm-layers and --vision-layers apply to the real-shape presets only")
    path, local = resolve_model_path(name)
    if local:
        _check_checkpoint(Path(path), name)
    offline = not local and os.environ.get("TOKCOMP_ALLOW_DOWNLOAD") != "1"
    if offline:
        _check_hub_cache(path, name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
        adapter_cls = ADAPTERS.get(config.model_type)
        if adapter_cls is None:
            raise TokcompError(f"model type '{config.model_type}' is not supported (supported: {', '.join(ADAPTERS)})")
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=DTYPES[dtype], local_files_only=offline, attn_implementation=attn_implementation,
            device_map=device_map,
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=offline)
        template = processor_chat_template(path, offline)
    except OSError as exc:
        hint = "" if local else " (no network: the model must be in the local Hugging Face cache)"
        raise TokcompError(f"cannot load model '{name}'{hint}: {str(exc).splitlines()[0]}") from exc
    except (SafetensorError, ValueError) as exc:  # a damaged or inconsistent checkpoint
        raise TokcompError(f"cannot load model '{name}' (damaged checkpoint?): {str(exc).splitlines()[0]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if device_map is None:
        model.to(target)
    model.eval()
    adapter = adapter_cls(model, tokenizer, image_processor, name, path)
    adapter.processor_template = template
    return adapter
