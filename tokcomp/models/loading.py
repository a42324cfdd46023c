"""Load a VLM by preset name, local checkpoint path, or hub id already in the local cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers import logging as hf_logging

from tokcomp.errors import TokcompError
from tokcomp.models.adapters import ADAPTERS, VLMAdapter
from tokcomp.models.presets import PRESETS, ensure_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Trained checkpoints committed to the repository, by name (see tokcomp.tiny).
REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = {"tokcomp-tiny": REPO_ROOT / "checkpoints" / "tokcomp-tiny"}


def resolve_model_path(name: str) -> tuple[str, bool]:
    """(path or hub id, is_local). Preset names are built into the cache on first use."""
    if name in COMMITTED:
        folder = COMMITTED[name]
        if not (folder / "config.json").exists():
            raise TokcompError(
                f"the {name} checkpoint is missing ({folder}); retrain it with `python -m tokcomp.tiny.train`"
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


def load_vlm(
    name: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    llm_layers: int | None = None,
    vision_layers: int | None = None,
) -> VLMAdapter:
    """Load a supported VLM with ``from_pretrained``, offline unless TOKCOMP_ALLOW_DOWNLOAD=1.

    Real-shape presets (``llava-1.5-7b-shape``, ...) are built in memory with random weights;
    ``llm_layers`` / ``vision_layers`` keep only that many of their decoder / encoder layers.
    """
    if dtype not in DTYPES:
        raise TokcompError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    from tokcomp.models.shapes import SHAPES, build_shape

    if name in SHAPES:
        least = 2 if SHAPES[name].family == "llava" else 1  # LLaVA-1.5 reads the second-to-last layer
        if vision_layers is not None and vision_layers < least:
            raise TokcompError(f"--vision-layers must be at least {least} for {name}")
        if llm_layers is not None and llm_layers < 1:
            raise TokcompError("--llm-layers must be at least 1")
        model, tokenizer, processor = build_shape(name, llm_layers, vision_layers=vision_layers)
        model = model.to(DTYPES[dtype])
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
            path, dtype=DTYPES[dtype], local_files_only=offline, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=offline)
    except OSError as exc:
        hint = "" if local else " (no network: the model must be in the local Hugging Face cache)"
        raise TokcompError(f"cannot load model '{name}'{hint}: {str(exc).splitlines()[0]}") from exc
    except (SafetensorError, ValueError) as exc:  # a damaged or inconsistent checkpoint
        raise TokcompError(f"cannot load model '{name}' (damaged checkpoint?): {str(exc).splitlines()[0]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return adapter_cls(model, tokenizer, image_processor, name, path)
