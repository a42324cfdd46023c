"""Models named by hub id, loaded offline from a real Hugging Face cache, as every real user runs tokcomp.

The cache holds tiny random checkpoints of llava-hf/llava-1.5-7b-hf and llava-hf/llava-onevision-qwen2-0.5b-ov-hf
with the repositories' files (see hub_cache.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from cli_runner import run_tokcomp
from hub_cache import (
    LLAVA_ID,
    ONEVISION_ID,
    QWEN2_CHAT_TEMPLATE,
    build_hub_cache,
    etag,
    legacy_key,
    onevision_files,
    write_cache_entry,
)
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file

HUB_IDS = [LLAVA_ID, ONEVISION_ID]
PROMPT = "what is this?"
# The repositories' chat_template.json, rendered for one image and PROMPT.
EXPECTED_PROMPTS = {
    LLAVA_ID: "USER: <image>\nwhat is this? ASSISTANT:",
    ONEVISION_ID: "<|im_start|>user <image>\nwhat is this?<|im_end|><|im_start|>assistant\n",
}


def _use_hf_home(patch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """HF_HOME and offline mode, also where huggingface_hub read them at import."""
    patch.setenv("HF_HOME", str(hf_home))
    patch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TOKCOMP_ALLOW_DOWNLOAD"):
        patch.delenv(name, raising=False)
    patch.setattr(hub_constants, "HF_HOME", str(hf_home))
    patch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Both checkpoints in a fresh HF_HOME, offline, for this module."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    repos = build_hub_cache(hf_home)
    patch = pytest.MonkeyPatch()
    _use_hf_home(patch, hf_home)
    yield repos
    patch.undo()


@pytest.fixture(scope="module")
def adapters(hub):
    from tokcomp.models.loading import load_vlm

    return {repo_id: load_vlm(repo_id, dtype="float32", device="cpu") for repo_id in HUB_IDS}


def test_the_hub_library_recognises_the_cache(hub):
    info = huggingface_hub.scan_cache_dir()
    assert not info.warnings
    assert {repo.repo_id for repo in info.repos} == set(HUB_IDS)
    for repo in info.repos:
        written = hub[repo.repo_id]
        (revision,) = repo.revisions
        assert revision.commit_hash == written.commit and set(revision.refs) == {"main"}
        assert {f.file_name for f in revision.files} == set(written.files)
        for cached in revision.files:  # a relative symlink to blobs/<etag>, as hf_hub_download leaves it
            link = revision.snapshot_path / cached.file_name
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            assert cached.blob_path.name == etag(cached.file_name, cached.blob_path.read_bytes())
        path = huggingface_hub.try_to_load_from_cache(repo.repo_id, "config.json")
        assert path == str(written.snapshot / "config.json")
        assert huggingface_hub.hf_hub_download(repo.repo_id, "chat_template.json") == str(
            written.snapshot / "chat_template.json"
        )


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_the_repository_weights_and_files_are_what_loads(repo_id, hub, adapters):
    adapter = adapters[repo_id]
    snapshot = hub[repo_id].snapshot
    config = json.loads((snapshot / "config.json").read_text())
    assert type(adapter.model).__name__ == config["architectures"][0]
    assert adapter.image_token_id == config["image_token_index"]
    assert adapter.tokenizer.convert_tokens_to_ids("<image>") == adapter.image_token_id
    assert adapter.num_layers == config["vision_config"]["num_hidden_layers"]
    assert adapter.num_patches == (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    if repo_id == ONEVISION_ID:
        assert type(adapter.tokenizer).__name__ == "Qwen2Tokenizer"
        assert adapter.video_token_id == config["video_token_index"]
        assert adapter.image_processor.image_grid_pinpoints == config["image_grid_pinpoints"]
    else:
        assert adapter.has_cls and adapter.drops_cls and adapter.feature_layer == adapter.num_layers - 1
    stored = {}
    for shard in sorted(snapshot.glob("*.safetensors")):
        stored.update(load_file(shard))
    params = adapter.model.state_dict()
    names = {legacy_key(name): name for name in params}
    assert set(stored) <= set(names)  # under the repositories' pre-v5 key names
    tied = {"language_model.lm_head.weight"} if config["tie_word_embeddings"] else set()
    assert set(names) - set(stored) == tied  # nothing initialised afresh
    for key, tensor in stored.items():  # the stored fp16 weights, not fresh random ones
        assert torch.equal(params[names[key]], tensor.float()), key


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_the_adapter_uses_the_repository_chat_template(repo_id, adapters):
    adapter = adapters[repo_id]
    text = adapter.build_prompt(PROMPT, 1, False)
    assert text == EXPECTED_PROMPTS[repo_id]
    ids = adapter.tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(adapter.image_token_id) == 1
    if repo_id == ONEVISION_ID:  # the tokenizer's own (Qwen2-Instruct, text only) template is not the one used
        assert adapter.tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
        assert text.startswith("<|im_start|>user") and adapter.tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_calibrate_then_apply_by_hub_id(repo_id, hub, tmp_path, capsys):
    calib = tmp_path / "calib.yaml"
    code, out, err = run_tokcomp(
        ["calibrate", "--model", repo_id, "--budget", "mid", "--data", "builtin:skimage", "--num-images", "4",
         "--batch-size", "4", "--out", str(calib)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    data = yaml.safe_load(calib.read_text())
    assert data["provenance"]["model"] == repo_id and data["num_images"] == 4 and len(data["thresholds"]) == 3
    assert "wrote" in out
    code, out, err = run_tokcomp(
        ["apply", "--model", repo_id, "--method", "dymu", "--calib", str(calib), "--image", "builtin:skimage/coffee",
         "--prompt", PROMPT, "--max-new-tokens", "2", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    tokens = payload["visual_tokens"]
    assert payload["model"] == repo_id and payload["method"]["method"] == "dymu"
    assert 0 < tokens["kept"] < tokens["full"] and len(payload["token_ids"]) <= 2
    if repo_id == ONEVISION_ID:  # one image alone: AnyRes base view and crops
        assert tokens["per_image"][0]["views"] > 1


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_eval_by_hub_id_records_it(repo_id, hub, suites_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_tokcomp(
        ["eval", "--model", repo_id, "--task", "tc_shapes", "--limit", "2", "--out", str(run)], capsys
    )
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == repo_id and results["tasks"]["tc_shapes"]["samples"] == 2
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2


def test_a_hub_id_not_in_the_cache_is_one_line_and_exit_2(hub, capsys):
    code, out, err = run_tokcomp(
        ["apply", "--model", "llava-hf/llava-1.5-13b-hf", "--image", "builtin:skimage/coffee", "--prompt", PROMPT],
        capsys,
    )
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "llava-hf/llava-1.5-13b-hf" in line and "not in the local Hugging Face cache" in line
    assert "TOKCOMP_ALLOW_DOWNLOAD=1" in line


def test_a_text_only_tokenizer_template_still_places_the_image(tmp_path):
    """A cache without chat_template.json (only what from_pretrained fetched): Qwen2's template, tags inline."""
    from tokcomp.models.loading import load_vlm

    files = {k: v for k, v in onevision_files().items() if k != "chat_template.json"}
    write_cache_entry(tmp_path / "hub", ONEVISION_ID, files)
    patch = pytest.MonkeyPatch()
    _use_hf_home(patch, tmp_path)
    try:
        adapter = load_vlm(ONEVISION_ID, dtype="float32", device="cpu")
    finally:
        patch.undo()
    assert adapter.build_prompt(PROMPT, 1, False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nwhat is this?<|im_end|>\n<|im_start|>assistant\n"
    )
