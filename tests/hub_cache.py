"""Tiny random checkpoints of two real hub repositories, placed in a real Hugging Face cache.

``llava-hf/llava-1.5-7b-hf`` and ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` are rebuilt file by file as the
repositories hold them: their ``config.json`` fields (sizes shrunk from tokcomp.models.shapes), weights in fp16
under the pre-v5 key names (LLaVA-1.5 sharded with an index, OneVision one file), the image processor,
processor and generation configs, a tokenizer of the repository's tokenizer class (a small byte-fallback
BPE in Llama's layout, a byte-level BPE in Qwen2's) with its special tokens, and the chat templates where the
repositories keep them (``chat_template.json``; OneVision's tokenizer_config.json also carries the text-only
template of Qwen2-0.5B-Instruct, from which its tokenizer was converted).

huggingface_hub has no public function that writes a cache entry from local bytes, so
:func:`write_cache_entry` lays one out as ``hf_hub_download`` does: ``blobs/<etag>`` (sha256 for LFS files,
the git blob sha1 otherwise), ``snapshots/<commit>/<file>`` as relative symlinks to the blobs, and
``refs/main`` holding the commit hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import save as save_safetensors
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CONFIG_MAPPING, AutoModelForImageTextToText
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from tokcomp.models.builders import CLIP_MEAN, CLIP_STD
from tokcomp.models.shapes import CLIP_L_336, LLAMA_7B, QWEN2_05B, SIGLIP_SO400M
from tokcomp.models.tokenizer import SPECIAL_TOKENS, word_vocabulary

LLAVA_ID = "llava-hf/llava-1.5-7b-hf"
ONEVISION_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"

# chat_template.json of llava-hf/llava-1.5-7b-hf.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# chat_template.json of llava-hf/llava-onevision-qwen2-0.5b-ov-hf.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# tokenizer_config.json of the OneVision repository: Qwen2-0.5B-Instruct's template, for string contents only.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The real sizes shrunk; every other field keeps the repository's value.
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 112,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
LFS_SUFFIXES = (".safetensors", ".bin", ".model")  # tracked by git LFS in these repositories (.gitattributes)
WEIGHTS_DTYPE = torch.float16


@dataclass(frozen=True)
class CachedRepo:
    """One repository written into the cache."""

    repo_id: str
    commit: str
    snapshot: Path
    files: tuple[str, ...]


# --- the cache layout -------------------------------------------------------------------------------------
def etag(name: str, data: bytes) -> str:
    """The ETag the Hub serves for a file: sha256 of an LFS file's content, else its git blob sha1."""
    return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_hash(data)


def write_cache_entry(hub_cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main") -> CachedRepo:
    """Place ``files`` into ``hub_cache`` as ``hf_hub_download`` leaves a downloaded repository.

    The commit hash is made up (a sha1 over the files' etags), so a rebuilt checkpoint gets its own snapshot.
    """
    storage = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    tags = {name: etag(name, data) for name, data in files.items()}
    commit = hashlib.sha1(json.dumps(sorted(tags.items())).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / tags[name]
        if not blob.exists():
            blob.write_bytes(data)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return CachedRepo(repo_id, commit, snapshot, tuple(sorted(files)))


def build_hub_cache(hf_home: Path) -> dict[str, CachedRepo]:
    """Both repositories under ``hf_home/hub``, by repo id."""
    hub_cache = hf_home / "hub"
    return {
        LLAVA_ID: write_cache_entry(hub_cache, LLAVA_ID, llava_files()),
        ONEVISION_ID: write_cache_entry(hub_cache, ONEVISION_ID, onevision_files()),
    }


# --- tokenizers -------------------------------------------------------------------------------------------
def _corpus() -> list[str]:
    """tokcomp's word list (the tiny tasks' prompts and answers), as BPE training text."""
    words = [w for w in word_vocabulary() if w not in SPECIAL_TOKENS and w.strip()]
    return [" ".join(words), *words]


def _bpe_parts(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A trained BPE's vocabulary and merges."""
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _added(token: str) -> dict:
    """A special token as tokenizer_config.json's added_tokens_decoder lists it."""
    return {
        "content": token,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def llama_tokenizer(extra: list[str]) -> Tokenizer:
    """A byte-fallback BPE laid out as Llama's: <unk> <s> </s>, 256 byte tokens, merges, then ``extra``."""
    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=4000, show_progress=False))
    trained, merges = _bpe_parts(trainer_tok)
    vocab = {t: i for i, t in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256))])}
    for token in sorted(trained, key=trained.get):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*specials, *extra]])
    return tok


def qwen2_tokenizer(extra: list[str]) -> Tokenizer:
    """A byte-level BPE laid out as Qwen2's (its pre-tokenizer regex, NFC), then ``extra`` added tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    return tok


# --- weights ----------------------------------------------------------------------------------------------
def legacy_key(name: str) -> str:
    """A v5 parameter name as the repositories store it (transformers 4.x names, converted back on load)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
    return name.removeprefix("model.")


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors(tensors, metadata={"format": "pt"})


def weight_files(config: dict, shards: int, seed: int = 0) -> dict[str, bytes]:
    """Random weights for ``config`` (fp16, legacy names); ``shards`` > 1 adds model.safetensors.index.json."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(CONFIG_MAPPING[config["model_type"]].from_dict(config))
    tied = bool(config.get("tie_word_embeddings"))
    tensors = {
        legacy_key(name): value.detach().to(WEIGHTS_DTYPE).contiguous()
        for name, value in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    if shards == 1:
        return {"model.safetensors": _safetensors(tensors)}
    names = sorted(tensors)
    per = -(-len(names) // shards)
    files, weight_map = {}, {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per : (i + 1) * per]
        files[shard] = _safetensors({n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files["model.safetensors.index.json"] = _json({"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _json(payload: dict) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _shrunk(real: dict, tiny: dict) -> dict:
    return {**{k: v for k, v in real.items() if k != "vocab_size"}, **tiny}


# --- the two repositories ---------------------------------------------------------------------------------
def llava_files() -> dict[str, bytes]:
    """The files of llava-hf/llava-1.5-7b-hf, tiny."""
    tok = llama_tokenizer(["<image>", "<pad>"])
    image_id, pad_id = tok.token_to_id("<image>"), tok.token_to_id("<pad>")
    vocab_size = _round_up(tok.get_vocab_size())  # the repository pads 32002 to 32064
    vision = _shrunk(CLIP_L_336, TINY_VISION)
    text = _shrunk(LLAMA_7B, {**TINY_TEXT, "num_key_value_heads": TINY_TEXT["num_attention_heads"]})
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": image_id,
        "model_type": "llava",
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": vocab_size,
            **text,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {"model_type": "clip_vision_model", "projection_dim": 16, "vocab_size": 32000, **vision},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab_size,
    }
    size = vision["image_size"]
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_id, "<pad>": pad_id}
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added(t) for t, i in specials.items()},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return {
        "config.json": _json(config),
        "generation_config.json": _json(
            {
                "_from_model_config": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": pad_id,
                "transformers_version": "4.36.0.dev0",
            }
        ),
        "preprocessor_config.json": _json(
            {
                "crop_size": {"height": size, "width": size},
                "do_center_crop": True,
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": CLIP_MEAN,
                "image_processor_type": "CLIPImageProcessor",
                "image_std": CLIP_STD,
                "processor_class": "LlavaProcessor",
                "resample": 3,
                "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": size},
            }
        ),
        "processor_config.json": _json(
            {
                "image_token": "<image>",
                "num_additional_image_tokens": 1,
                "patch_size": vision["patch_size"],
                "processor_class": "LlavaProcessor",
                "vision_feature_select_strategy": "default",
            }
        ),
        "chat_template.json": _json({"chat_template": LLAVA_CHAT_TEMPLATE}),
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(
            {
                "bos_token": _added("<s>"),
                "eos_token": _added("</s>"),
                "pad_token": "<pad>",
                "unk_token": _added("<unk>"),
            }
        ),
        "added_tokens.json": _json({"<image>": image_id, "<pad>": pad_id}),
        **weight_files(config, shards=2),
    }


def onevision_files() -> dict[str, bytes]:
    """The files of llava-hf/llava-onevision-qwen2-0.5b-ov-hf, tiny."""
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = qwen2_tokenizer(added)
    ids = {t: tok.token_to_id(t) for t in added}
    vocab_size = _round_up(tok.get_vocab_size())  # the repository pads 151648 to 152000
    vision = _shrunk(SIGLIP_SO400M, TINY_VISION)
    text = _shrunk(QWEN2_05B, {**TINY_TEXT, "num_key_value_heads": QWEN2_05B["num_key_value_heads"]})
    size = vision["image_size"]
    pinpoints = [[size * i, size * j] for i in range(1, 7) for j in range(1, 7)]  # 384 px steps up to 6x6 there
    config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": pinpoints,
        "image_token_index": ids["<image>"],
        "model_type": "llava_onevision",
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "max_position_embeddings": 32768,
            "max_window_layers": text["num_hidden_layers"],
            "model_type": "qwen2",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": vocab_size,
            **text,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "transformers_version": "4.45.0.dev0",
        "use_image_newline_parameter": True,
        "video_token_index": ids["<video>"],
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False, **vision},
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added(t) for t, i in ids.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    vocab, merges = _bpe_parts(tok)
    merges_txt = io.StringIO()
    merges_txt.write("#version: 0.2\n")
    merges_txt.writelines(f"{a} {b}\n" for a, b in merges)
    num_tokens = (size // vision["patch_size"]) ** 2
    return {
        "config.json": _json(config),
        "generation_config.json": _json(
            {
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|im_end|>"],
                "transformers_version": "4.45.0.dev0",
            }
        ),
        "preprocessor_config.json": _json(
            {
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_pad": True,
                "do_rescale": True,
                "do_resize": True,
                "image_grid_pinpoints": pinpoints,
                "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "LlavaOnevisionImageProcessor",
                "image_std": [0.5, 0.5, 0.5],
                "processor_class": "LlavaOnevisionProcessor",
                "resample": 3,
                "rescale_factor": 0.00392156862745098,
                "size": {"height": size, "width": size},
            }
        ),
        "processor_config.json": _json(
            {
                "image_token": "<image>",
                "num_image_tokens": num_tokens,
                "processor_class": "LlavaOnevisionProcessor",
                "video_token": "<video>",
                "vision_feature_select_strategy": "full",
            }
        ),
        "chat_template.json": _json({"chat_template": ONEVISION_CHAT_TEMPLATE}),
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(
            {
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "eos_token": _added("<|im_end|>"),
                "pad_token": _added("<|endoftext|>"),
            }
        ),
        "added_tokens.json": _json(ids),
        "vocab.json": json.dumps({t: i for t, i in vocab.items()}, ensure_ascii=False).encode(),
        "merges.txt": merges_txt.getvalue().encode(),
        **weight_files(config, shards=1),
    }
