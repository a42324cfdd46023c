"""The contract every registered method keeps, on every tiny family.

For every name in ``METHODS`` (a newly registered method is covered, or fails here until it has
entries in the tables below):

* a neutral setting runs the method's own scoring/selection/hook code and is bit-identical to the
  plain model (answer ids and prefill logits);
* a batch of different requests gives each request exactly its answer and account alone;
* leaving ``with method(adapter):`` restores the model: weights, buffers, hooks, attention functions;
* a behavioural oracle per method (see ``ORACLES``).
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stock_inputs import stock_inputs
from test_encoder_trace import eager_trace
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tokcomp.methods import selection as S
from tokcomp.methods.cdpruner import conditional_kernel, greedy_dpp, instruction_relevance
from tokcomp.methods.dart import DARTPruning, least_duplicated
from tokcomp.methods.dtome import encoder_layers
from tokcomp.methods.dycoke import DynamicPruning, apply_ttm
from tokcomp.methods.fastv import FastVPruning, last_token_attention
from tokcomp.methods.fastvid import density_scores, fastvid_groups, segment_lengths
from tokcomp.methods.holitom import holitom_groups, holitom_segments, merge_into_kept, running_average_weights
from tokcomp.methods.prumerge import absorbing_groups, attention_outliers, spread_samples
from tokcomp.methods.pruning import DivPrune
from tokcomp.methods.registry import METHODS, build_method
from tokcomp.methods.vidcom2 import frame_budgets, vidcom2_select
from tokcomp.pipeline import Pipeline, Request

# A neutral setting per method, and the functions (``module:attr`` or ``module:Class.attr``) that must
# run under it: proof that the method's own code ran rather than an early return.
NEUTRAL: dict[str, tuple[dict[str, str], list[str]]] = {
    "none": ({}, ["tokcomp.methods.base:Method.select"]),
    "dymu": ({"threshold": "inf"}, ["tokcomp.methods.merge:select_by_threshold"]),
    "dtome": ({"threshold": "inf"}, ["tokcomp.methods.merge:select_by_threshold"]),
    "tome": ({"r": "0"}, ["tokcomp.methods.merge:select_top_r"]),
    "dycoke": ({"K": "0", "P": "0"},
               ["tokcomp.methods.dycoke:ttm_select", "tokcomp.methods.dycoke:DynamicPruning._observe"]),
    "adaptive": ({"rho": "1"}, ["tokcomp.methods.pruning:adaptive_select"]),
    "fastv": ({"R": "1"}, ["tokcomp.methods.fastv:FastVPruning._rank"]),
    "dart": ({"R": "1"}, ["tokcomp.methods.dart:least_duplicated"]),
    "pyramiddrop": ({"keep": "1"}, ["tokcomp.methods.fastv:FastVPruning._rank", "tokcomp.methods.cut:LayerCut._cut"]),
    "random": ({"ratio": "1"}, ["tokcomp.methods.pruning:RandomPruning.score"]),
    "divprune": ({"ratio": "1"}, ["tokcomp.methods.pruning:DivPrune.score"]),
    "cdpruner": ({"ratio": "1"},
                 ["tokcomp.methods.cdpruner:greedy_dpp", "tokcomp.methods.cdpruner:instruction_relevance"]),
    "vidcom2": ({"ratio": "1", "temperature": "inf"}, ["tokcomp.methods.vidcom2:vidcom2_select"]),
    # every token of every frame salient: segments are cut, nothing is merged
    "fastvid": ({"ratio": "1", "d": "0"}, ["tokcomp.methods.fastvid:fastvid_groups",
                                           "tokcomp.methods.fastvid:segment_lengths"]),
    # no position static (tau above any cosine), every token kept; inside the LLM a share that rounds to no merge
    "holitom": ({"ratio": "1", "tau": "2", "inner_merge": "0.0001"},
                ["tokcomp.methods.holitom:holitom_groups", "tokcomp.methods.holitom:holitom_segments",
                 "tokcomp.methods.holitom:merge_into_kept"]),
    # every patch sampled (stride 1) and nothing absorbed
    "prumerge": ({"spread": "1000", "neighbours": "0"},
                 ["tokcomp.methods.prumerge:attention_outliers", "tokcomp.methods.prumerge:absorbing_groups"]),
    # every token left after the dominant ones is a contextual centre of its own: nothing merges
    "visionzip": ({"dominant": "10", "contextual": "100000"},
                  ["tokcomp.methods.trace:EncoderTrace.record", "tokcomp.methods.visionzip:VisionZip.groups",
                   "tokcomp.methods.selection:cosine_matrix"]),
}  # fmt: skip

# Settings that compress, for batching (all of them) and detaching and the oracles (the first).
COMPRESSING: dict[str, list[dict[str, str]]] = {
    "none": [{}],
    "dymu": [{"budget": "mid"}],
    "dtome": [{"budget": "mid"}],
    "tome": [{"r": "6"}],
    "dycoke": [{"L": "2"}, {"L": "2", "mode": "evict"}],  # K=0.7, P=0.7
    "adaptive": [{"rho": "0.3"}],
    "fastv": [{"K": "2", "R": "0.25"}],
    "dart": [{"K": "2", "R": "0.25"}],
    "pyramiddrop": [{"keep": "0.5"}],
    "random": [{"ratio": "0.3", "seed": "1"}],
    "divprune": [{"ratio": "0.25"}],
    "cdpruner": [{"ratio": "0.25"}],
    "visionzip": [{"dominant": "20", "contextual": "6"}],
    "vidcom2": [{"ratio": "0.25"}, {"ratio": "0.4", "temperature": "1"}],
    "fastvid": [{"ratio": "0.3"}, {"ratio": "0.5", "p": "1", "c": "2"}],
    "holitom": [{"ratio": "0.3", "tau": "0.5"}, {"ratio": "0.5", "inner_merge": "0", "inner_average": "running"}],
    "prumerge": [{"spread": "3", "neighbours": "8"}, {"spread": "0", "neighbours": "4"}],
}

# The behavioural oracle(s) of each method: test functions of this module.
ORACLES: dict[str, list[str]] = {
    "none": ["test_none_is_the_stock_forward"],
    "dymu": ["test_encoder_attention_is_proportional_to_merged_sizes", "test_dymu_keeps_every_position_with_vtu"],
    "dtome": ["test_encoder_attention_is_proportional_to_merged_sizes", "test_dtome_feeds_merged_tokens_contiguously"],
    "tome": ["test_encoder_attention_is_proportional_to_merged_sizes", "test_tome_merges_exactly_r_per_layer"],
    "dycoke": ["test_dycoke_ttm_keeps_the_stated_share_of_the_most_changed_tokens",
               "test_dycoke_dp_reads_the_stated_share_in_deep_layers"],
    "adaptive": ["test_adaptive_budgets_add_up_to_the_global_budget"],
    "fastv": ["test_fastv_ranks_by_the_last_query", "test_fastv_keeps_what_the_last_query_attends_to_in_the_model"],
    "pyramiddrop": ["test_pyramiddrop_ranks_each_stage_by_the_last_token_among_the_survivors"],
    "dart": ["test_dart_keeps_the_pivots_and_what_duplicates_them_least",
             "test_dart_keeps_what_duplicates_the_model_pivots_least"],
    "random": ["test_random_keeps_exactly_the_budget_and_is_seeded"],
    "divprune": ["test_divprune_starts_at_the_largest_total_distance_and_goes_max_min"],
    "cdpruner": ["test_cdpruner_picks_the_greedy_largest_determinant_weighted_by_relevance",
                 "test_cdpruner_keeps_the_dpp_choice_of_each_image_in_the_model"],
    "visionzip": ["test_visionzip_keeps_the_most_attended_patches_and_averages_the_rest_into_groups"],
    "prumerge": ["test_prumerge_keeps_the_attention_outliers_and_even_samples_and_absorbs_by_key"],
    "fastvid": ["test_fastvid_cuts_at_scene_changes_keeps_the_salient_and_merges_into_density_peaks",
                "test_fastvid_keeps_its_groups_of_each_segment_in_the_model"],
    "holitom": ["test_holitom_segments_for_the_most_saved_merges_static_tokens_and_keeps_attended_dynamic_ones",
                "test_holitom_merges_the_least_attended_into_their_most_similar_kept_token_inside_the_llm"],
    "vidcom2": ["test_vidcom2_gives_the_odd_frame_more_and_keeps_the_least_typical_tokens",
                "test_vidcom2_keeps_its_choice_of_each_frame_in_the_model"],
}  # fmt: skip

PROMPTS = ["what is in the picture ?", "describe it", "how many objects are there in these pictures ?"]
# Methods that work inside the vision encoder (every family has the stages now; a family without them would
# skip these), and those that unmerge in the LLM (VTU: refused on DeepStack models, tests/test_qwen3.py).
ENCODER_METHODS = {"dymu", "dtome", "tome", "visionzip", "prumerge"}
TRACE_METHODS = {"visionzip", "prumerge"}
VTU_METHODS = {"dymu"}
NEW_TOKENS = 3
NAMES = list(METHODS)


def _neutral(name: str) -> tuple[dict[str, str], list[str]]:
    if name not in NEUTRAL:
        pytest.fail(f"registered method '{name}' has no neutral setting in tests/test_contract_matrix.py NEUTRAL")
    return NEUTRAL[name]


def _compressing(name: str, every: bool = False):
    if not COMPRESSING.get(name):
        pytest.fail(f"registered method '{name}' has no compressing setting in tests/test_contract_matrix.py")
    return COMPRESSING[name] if every else COMPRESSING[name][0]


def _method(adapter, name: str, sets: dict[str, str]):
    return build_method(name, adapter.name, adapter.num_layers, sets=dict(sets))


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-llava-ov", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def adapter(request, llava, llava_ov, qwen, qwen3):
    return {"tiny-llava": llava, "tiny-llava-ov": llava_ov, "tiny-qwen2.5-vl": qwen, "tiny-qwen3-vl": qwen3}[
        request.param
    ]


def _cases(adapter, name: str) -> list[str]:
    """The input kinds this method is checked on for this family: images, and video where the family
    takes it (OneVision, Qwen2.5-VL, Qwen3-VL)."""
    supported = adapter.supports_encoder_traces if name in TRACE_METHODS else adapter.supports_encoder_merging
    if name in ENCODER_METHODS and not supported:
        pytest.skip(f"{name} works inside the vision encoder: not on the {adapter.family} family yet")
    if name in VTU_METHODS and adapter.deepstack_levels:
        pytest.skip(f"{name} unmerges in the LLM (VTU): not on DeepStack models yet (tests/test_qwen3.py)")
    inputs = METHODS[name].inputs
    kinds = ["image"] if "image" in inputs else []
    if adapter.family in ("llava_onevision", "qwen2_5_vl", "qwen3_vl") and "video" in inputs:
        kinds.append("video")
    return kinds


def _encoder_stages(adapter) -> None:
    """These checks read the LLaVA encoders' merge and trace state (tests/test_qwen_merging.py: Qwen2.5-VL)."""
    if adapter.uses_mrope:
        pytest.skip(f"LLaVA encoder internals; the {adapter.family} family's merging has its own tests")


def _requests(kind: str, photos, count: int) -> list[Request]:
    """``count`` different requests: 1, 2, 3 images (a lone OneVision image gets AnyRes crops), or
    videos of 4, 5, 6 frames."""
    out = []
    for i in range(count):
        if kind == "image":
            out.append(Request(PROMPTS[i], [photos[(j + 2 * i) % len(photos)] for j in range(i + 1)]))
        else:
            out.append(Request(PROMPTS[i], video=[photos[(j + i) % len(photos)] for j in range(4 + i)]))
    return out


def _resolve(target: str) -> tuple[object, str]:
    module_name, _, path = target.partition(":")
    owner: object = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attr


# What a spied function is called on the Qwen families (their towers have their own trace).
QWEN_TARGETS = {"tokcomp.methods.trace:EncoderTrace.record": "tokcomp.models.qwen_trace:QwenTrace.record"}


def _family_target(adapter, target: str) -> str:
    return QWEN_TARGETS.get(target, target) if adapter.uses_mrope else target


def _spy(monkeypatch, target: str) -> list[int]:
    owner, attr = _resolve(target)
    original = getattr(owner, attr)
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)
    return calls


_PLAIN: dict[tuple[str, str], tuple[list[int], torch.Tensor]] = {}


def _plain(adapter, kind: str, request: Request) -> tuple[list[int], torch.Tensor]:
    key = (adapter.name, kind)
    if key not in _PLAIN:
        pipe = Pipeline(adapter)
        ids = pipe.generate([request], NEW_TOKENS)[0].token_ids
        _PLAIN[key] = (ids, pipe.last_prefill_logits)
    return _PLAIN[key]


# --- the tables cover the registry --------------------------------------------------------------
def test_every_registered_method_has_a_neutral_a_compressing_setting_and_an_oracle():
    missing = {
        "NEUTRAL": sorted(set(METHODS) - set(NEUTRAL)),
        "COMPRESSING": sorted(set(METHODS) - set(COMPRESSING)),
        "ORACLES": sorted(set(METHODS) - set(ORACLES)),
    }
    assert not any(missing.values()), f"registered methods missing from the contract tables: {missing}"
    for name, tests in ORACLES.items():
        for test in tests:
            assert callable(globals().get(test)), f"oracle {test} of {name} is not a test of this module"


# --- a: neutral settings run the method and change nothing -----------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_neutral_setting_runs_the_method_and_is_bit_identical(adapter, photos, monkeypatch, name):
    sets, targets = _neutral(name)
    kinds = _cases(adapter, name)
    if not kinds:
        pytest.skip(f"{name} takes no input {adapter.name} has")
    for kind in kinds:
        request = _requests(kind, photos, 1)[0]
        expected_ids, expected_logits = _plain(adapter, kind, request)
        with monkeypatch.context() as patch:
            calls = {target: _spy(patch, _family_target(adapter, target)) for target in targets}
            pipe = Pipeline(adapter, _method(adapter, name, sets))
            got = pipe.generate([request], NEW_TOKENS)[0]
        assert all(calls.values()), f"{name} {sets} on {kind}: never ran {[t for t, c in calls.items() if not c]}"
        assert got.token_ids == expected_ids, f"{name} {sets} on {kind}"
        assert torch.equal(pipe.last_prefill_logits, expected_logits), f"{name} {sets} on {kind}"
        assert got.account.visual_kept == got.account.visual_positions == got.account.visual_full


# --- b: a batch gives every request its own answer and account -----------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_batch_gives_each_request_its_answer_and_account_alone(adapter, photos, name):
    kinds = _cases(adapter, name)
    if not kinds:
        pytest.skip(f"{name} takes no input {adapter.name} has")
    for sets in _compressing(name, every=True):
        for kind in kinds:
            requests = _requests(kind, photos, 3)
            pipe = Pipeline(adapter, _method(adapter, name, sets))
            together = pipe.generate(requests, NEW_TOKENS)
            assert len({r.account.prompt_tokens_kept for r in together}) == 3  # padding in the batch
            for request, batched in zip(requests, together, strict=True):
                alone = pipe.generate([request], NEW_TOKENS)[0]
                where = f"{name} {sets} on {kind}: {request.prompt}"
                assert batched.token_ids == alone.token_ids, where
                assert batched.account == alone.account, where  # counts, per_image, KV bytes, method numbers
                assert batched.account.methods == alone.account.methods, where


def test_dycoke_counts_only_the_steps_a_request_is_still_generating():
    """A request that finished early in a batch reports the steps it had alone, not the batch's."""
    visual = torch.zeros(2, 12, dtype=torch.bool)
    visual[:, 2:10] = True
    hook = DynamicPruning(layer=1, prune=0.5, visual=visual, cache=None)
    query = torch.zeros(2, 1, 1, 4)
    query[..., 0] = 1.0
    for step, active in enumerate(([True, True], [True, False], [True, False])):
        hook.start_step(torch.tensor(active))
        key = torch.zeros(2, 1, 13 + step, 4)
        key[:, 0, [2, 3, 4, 5] if step % 2 else [6, 7, 8, 9], 0] = 5.0  # attention moves every step
        hook._observe(query, key, torch.ones(2, 13 + step, dtype=torch.bool), 1.0)
        hook._record(torch.tensor([step, 10 + step]), deep=True)  # visual keys a deep layer read
    assert hook.steps.tolist() == [3, 1] and hook.reselections.tolist() == [3, 1]
    assert hook.attended_per_sample() == [1.0, 10.0] and hook.deep_attended(1, -1.0) == 10.0


# --- c: detaching restores the model exactly ---------------------------------------------------------
def _attention_functions() -> dict[str, object]:
    return {key: ALL_ATTENTION_FUNCTIONS[key] for key in ALL_ATTENTION_FUNCTIONS.valid_keys()}


def _snapshot(model: torch.nn.Module) -> dict:
    modules = {}
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        modules[path] = {
            "attributes": {k: id(v) for k, v in vars(module).items() if callable(v) or k.startswith("_tokcomp")},
            "keys": sorted(vars(module)),
            "forward_hooks": list(module._forward_hooks.items()),
            "forward_pre_hooks": list(module._forward_pre_hooks.items()),
            "backward_hooks": list(module._backward_hooks.items()),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "class": type(module),
            "class_forward": type(module).__dict__.get("forward"),
        }
    configs = [model.config, *(getattr(model.config, k) for k in ("text_config", "vision_config"))]
    return {
        "modules": modules,
        "configs": [c._attn_implementation for c in configs],
        "functions": _attention_functions(),
        "global_hooks": (
            list(torch.nn.modules.module._global_forward_hooks.items()),
            list(torch.nn.modules.module._global_forward_pre_hooks.items()),
        ),
        "tensors": {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]},
    }


@pytest.mark.parametrize("name", NAMES)
def test_detaching_restores_the_model_exactly(adapter, photos, name):
    sets = _compressing(name)
    kinds = _cases(adapter, name)
    if not kinds:
        pytest.skip(f"{name} takes no input {adapter.name} has")
    model = adapter.model
    Pipeline(adapter).generate(_requests(kinds[-1], photos, 1), 1)  # transformers installs its own hooks lazily
    before = _snapshot(model)
    for state in before["modules"].values():  # the plain model has only transformers' output-capturing hooks
        hooks = [h for _, h in state["forward_hooks"] + state["forward_pre_hooks"]]
        assert all(h.__module__.startswith("transformers.") for h in hooks), hooks
    method = _method(adapter, name, sets)
    with method(adapter):
        result = Pipeline(adapter).generate(_requests(kinds[-1], photos, 2), 2)
        assert adapter.active_method is method
    assert result and adapter.active_method is None and adapter.merging is None
    after = _snapshot(model)
    assert after["configs"] == before["configs"]
    assert after["functions"] == before["functions"]
    assert after["global_hooks"] == before["global_hooks"]
    assert after["modules"].keys() == before["modules"].keys()
    for path, state in before["modules"].items():
        assert after["modules"][path] == state, f"{name} left {path or 'the model'} changed"  # hooks included
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][key], tensor), f"{name} changed {key}"
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]
    assert attention and all(m.config._attn_implementation == "sdpa" for m in attention)


# --- d: behavioural oracles ------------------------------------------------------------------------
def _stock_logits(adapter, image, prompt: str) -> torch.Tensor:
    """The stock HF model's next-token logits, fed what its own processor gives (tests/stock_inputs.py)."""
    with torch.no_grad():
        out = adapter.model(**stock_inputs(adapter, [prompt], [[image]]), logits_to_keep=1)
    return out.logits[:, -1].float()


def test_none_is_the_stock_forward(adapter, photos):
    pipe = Pipeline(adapter, _method(adapter, "none", {}))
    result = pipe.generate([Request(PROMPTS[0], [photos[1]])], 1)[0]
    assert torch.equal(pipe.last_prefill_logits, _stock_logits(adapter, photos[1], PROMPTS[0]))
    assert result.account.visual_kept == result.account.visual_full == result.account.visual_positions


@pytest.mark.parametrize("name", ["dymu", "dtome", "tome"])
def test_encoder_attention_is_proportional_to_merged_sizes(adapter, photos, name):
    """Proportional attention: a token standing for ``s`` patches gets ``log s`` added to its logits,
    which is exactly attending to ``s`` copies of it. Checked on a layer after merges, every view."""
    _encoder_stages(adapter)
    method = _method(adapter, name, _compressing(name))
    probe = adapter.feature_layer - 1  # the last layer whose merges the LLM reads
    attn = encoder_layers(adapter.vision_model)[probe].self_attn
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = attn.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs["hidden_states"], out[0])),
                                        with_kwargs=True)  # fmt: skip
    try:
        with torch.no_grad(), method(adapter):
            adapter.encode(adapter.encoder_views(photos[:3]))
            snapshot = adapter.merging.snapshots[probe]  # the tokens entering that layer
    finally:
        handle.remove()
    ((hidden, output),) = seen
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    merged = 0
    for b in range(hidden.shape[0]):
        valid = snapshot.valid[b]
        sizes = torch.bincount(snapshot.source[b], minlength=valid.shape[0])[valid]  # patches per token
        merged += int((sizes > 1).sum())
        x = hidden[b][valid]

        def split(t):
            return t.view(t.shape[0], heads, -1).transpose(0, 1)  # (heads, n, d)

        with torch.no_grad():
            q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
            k, v = k.repeat_interleave(sizes, dim=1), v.repeat_interleave(sizes, dim=1)  # every patch its copy
            weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
            expected = attn.out_proj((weights @ v).transpose(0, 1).reshape(x.shape[0], -1))
        torch.testing.assert_close(output[b][valid], expected, atol=2e-5, rtol=1e-4)
    assert merged > 0  # tokens had merged before that layer, so the bias mattered


def test_dymu_keeps_every_position_with_vtu(adapter, photos):
    _encoder_stages(adapter)
    result = Pipeline(adapter, _method(adapter, "dymu", _compressing("dymu"))).generate(
        _requests("image", photos, 1), 1
    )
    account = result[0].account
    assert account.visual_kept < account.visual_positions == account.visual_full


def test_dtome_feeds_merged_tokens_contiguously(adapter, photos):
    _encoder_stages(adapter)
    seen: list[torch.Tensor] = []
    attn = adapter.language_model.layers[0].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        pipe = Pipeline(adapter, _method(adapter, "dtome", _compressing("dtome")))
        account = pipe.generate(_requests("image", photos, 1), 1)[0].account
    finally:
        handle.remove()
    assert account.visual_kept < account.visual_full
    assert account.prompt_tokens_kept == account.prompt_tokens_full - account.visual_full + account.visual_kept
    assert torch.equal(seen[0][0], torch.arange(account.prompt_tokens_kept))  # no gaps, no repeats


def test_tome_merges_exactly_r_per_layer(adapter, photos):
    _encoder_stages(adapter)
    r = int(_compressing("tome")["r"])
    request = Request(PROMPTS[1], photos[:2])  # base views only on both families
    account = Pipeline(adapter, _method(adapter, "tome", {"r": str(r)})).generate([request], 1)[0].account
    views = sum(u["views"] for u in account.per_image)
    merging = adapter.feature_layer
    n = adapter.num_patches
    assert account.per_layer == [views * (n - r * min(i + 1, merging)) for i in range(adapter.num_layers)]
    assert [u["kept"] for u in account.per_image] == [
        n - r * merging + (0 if adapter.family == "llava" else 1)  # OneVision's image newline
    ] * 2


def _video_tokens(adapter, frames):
    units = adapter.prepare_units([], frames)
    return adapter.stock_unit_tokens(units)[0]


def test_dycoke_ttm_keeps_the_stated_share_of_the_most_changed_tokens(llava_ov, photos):
    k = 0.7
    frames = [photos[i % len(photos)] for i in range(8)]
    unit = _video_tokens(llava_ov, frames)
    n = unit.frame_tokens
    out = apply_ttm(unit, k)
    keep = int((1 - k) * n)
    per_frame = torch.bincount(out.positions[out.positions < 8 * n] // n, minlength=8).tolist()
    assert per_frame == [n, keep, keep, keep, n, keep, keep, keep]  # anchors whole, (1-K) of the others
    assert int(out.positions[-1]) == 8 * n  # the newline stays
    grid = unit.position_features()[: 8 * n].reshape(8, n, -1)
    for frame, ref in ((1, 0), (2, 0), (3, 2), (7, 6)):
        mine = out.positions[(out.positions >= frame * n) & (out.positions < (frame + 1) * n)] - frame * n
        similarity = torch.nn.functional.cosine_similarity(grid[frame], grid[ref], dim=-1)
        assert set(mine.tolist()) == set(S.top_k_stable(similarity, keep, largest=False).tolist())
    account = (
        Pipeline(llava_ov, _method(llava_ov, "dycoke", {"K": str(k), "P": "0"}))
        .generate([Request(PROMPTS[0], video=frames)], 1)[0]
        .account
    )
    assert account.visual_kept == 2 * n + 6 * keep + 1


def test_dycoke_dp_reads_the_stated_share_in_deep_layers(llava_ov, photos):
    p, steps = 0.7, 4
    pipe = Pipeline(llava_ov, _method(llava_ov, "dycoke", {"K": "0.5", "P": str(p), "L": "2"}))
    result = pipe.generate(_requests("video", photos, 2), steps)
    (hook,) = pipe.last_hooks
    share = torch.tensor([float(int(int(v) * (1 - p))) for v in hook.visual.sum(1)])  # int((1-P)·visual)
    deep = torch.stack(hook.deep)  # (decode steps x layers >= L, B)
    assert deep.shape[0] == (steps - 1) * (len(llava_ov.language_model.layers) - 2)
    live = ~torch.isnan(deep)
    assert bool(live.any()) and torch.equal(deep[live], share.expand_as(deep)[live])
    for b, r in enumerate(result):
        numbers = r.account.methods["dycoke"]
        assert numbers["dp_steps"] == int(hook.steps[b]) == min(len(r.token_ids), steps - 1)
        assert 1 <= numbers["dp_reselections"] == int(hook.reselections[b]) <= numbers["dp_steps"]
        assert numbers["retained_ratio_measured"] == round(float(share[b]) / r.account.visual_full, 4)


def test_adaptive_budgets_add_up_to_the_global_budget(adapter, photos):
    rho = 0.3
    request = _requests("image", photos, 3)[2]  # three images
    account = Pipeline(adapter, _method(adapter, "adaptive", {"rho": str(rho)})).generate([request], 1)[0].account
    plan = account.selection["adaptive"]
    assert plan.budget == round(rho * account.visual_full) == account.visual_kept
    assert sum(plan.per_image_budget) + plan.inter_budget == plan.budget == plan.intra_budget + plan.inter_budget
    assert (
        [len(k) for k in plan.kept]
        == [u["positions"] for u in account.per_image]
        == [u["kept"] for u in account.per_image]
    )
    assert account.methods["adaptive"] == {"budget": plan.budget, "intra_budget": plan.intra_budget,
                                           "inter_budget": plan.inter_budget,
                                           "per_image_budget": plan.per_image_budget}  # fmt: skip


def test_fastv_ranks_by_the_last_query():
    length, keep = 10, 2
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, 1:8] = True
    key = torch.zeros(1, 1, length, 4)
    key[0, 0, [2, 3], 0] = 6.0  # what the first query looks at
    key[0, 0, [5, 6], 1] = 6.0  # what the last query looks at
    query = torch.zeros(1, 2, length, 4)  # two heads that agree
    query[:, :, :, 0] = 1.0
    query[:, :, -1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    hook = FastVPruning(layer=1, keep=keep / 7, visual=visual, num_layers=2)
    hook._rank(query, key, torch.ones(1, length, dtype=torch.bool), 1.0)
    assert torch.nonzero(hook.kept[0]).flatten().tolist() == [5, 6]


def test_fastv_keeps_what_the_last_query_attends_to_in_the_model(adapter, photos, monkeypatch):
    seen: list[tuple] = []
    original = FastVPruning._rank

    def record(self, query, key, valid, scaling):
        seen.append((query.clone(), key.clone(), valid.clone(), scaling))
        return original(self, query, key, valid, scaling)

    monkeypatch.setattr(FastVPruning, "_rank", record)
    ratio = float(_compressing("fastv")["R"])
    pipe = Pipeline(adapter, _method(adapter, "fastv", _compressing("fastv")))
    pipe.generate(_requests("image", photos, 2), 1)
    ((query, key, valid, scaling),) = seen
    (hook,) = pipe.last_hooks
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1).float()

    def ranked(position: int) -> list[set[int]]:
        """Per request, the visual columns the query at ``position`` attends to most (mean over heads)."""
        logits = (query[:, :, position, None].float() @ keys.transpose(-1, -2))[:, :, 0] * scaling  # (B, H, L)
        received = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)
        out = []
        for b in range(received.shape[0]):
            scores = received[b].masked_fill(~hook.visual[b], float("-inf"))
            out.append(set(S.top_k_stable(scores, round(ratio * int(hook.visual[b].sum()))).tolist()))
        return out

    kept = [set(torch.nonzero(row).flatten().tolist()) for row in hook.kept]
    assert kept == ranked(-1)
    firsts = [int(torch.nonzero(row).flatten()[0]) for row in valid]  # each request's first real position
    assert all(ranked(f)[b] != kept[b] for b, f in enumerate(firsts))  # the first query would keep others


def test_pyramiddrop_ranks_each_stage_by_the_last_token_among_the_survivors(adapter, photos, monkeypatch):
    seen: list[tuple] = []
    original = FastVPruning._rank

    def record(self, query, key, valid, scaling):
        seen.append((self.current_visual().clone(), last_token_attention(query, key, valid, scaling)))
        return original(self, query, key, valid, scaling)

    monkeypatch.setattr(FastVPruning, "_rank", record)
    pipe = Pipeline(adapter, _method(adapter, "pyramiddrop", {"keep": "0.5"}))
    result = pipe.generate(_requests("image", photos, 2), 1)
    (hook,) = pipe.last_hooks
    assert len(seen) == len(hook.cut_layers) == len(hook.orders) >= 2  # one ranking and one cut per stage
    for stage, (survivors, received) in enumerate(seen):
        order, real = hook.orders[stage], hook.reals[stage]
        for b in range(hook.visual.shape[0]):
            # the rows of the stage this ranking ran in, as LLM-input positions
            rows = hook.orders[stage - 1][b] if stage else torch.arange(hook.visual.shape[1])
            live = hook.reals[stage - 1][b] if stage else hook.valid[b]
            candidates = [int(p) for p, r in zip(rows, live, strict=True) if r and survivors[b, p]]
            scores = torch.tensor([float(received[b, list(rows).index(p)]) for p in candidates])
            top = {candidates[i] for i in S.top_k_stable(scores, round(0.5 * len(candidates))).tolist()}
            went_on = {int(p) for p, r in zip(order[b], real[b], strict=True) if r and hook.visual[b, p]}
            assert went_on == top, (stage, b)
    counts = result[0].account.methods["pyramiddrop"]["visual_per_stage"]
    assert all(later == round(0.5 * earlier) for earlier, later in itertools.pairwise(counts))  # halved


def test_dart_keeps_the_pivots_and_what_duplicates_them_least():
    visual = torch.tensor([[3.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.1], [0.7, 0.7]])
    norms = torch.tensor([9.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0])  # token 0 is the image pivot
    none = torch.zeros(0, 2)
    # one pivot, two more tokens: the two least like it (the opposite one, then the two orthogonal tie
    # -> the earlier); its near copies 1 and 2 go
    assert least_duplicated(visual, norms, none, none[:, 0], 3, 1, 0).tolist() == [0, 3, 5]
    # a text pivot pointing up takes its share from what is least like *it*: the token pointing down
    text = torch.tensor([[0.0, 5.0], [0.0, 0.1]])
    assert least_duplicated(visual, norms, text, torch.tensor([4.0, 1.0]), 3, 1, 1).tolist() == [0, 4, 5]
    # the budget is exact, and everything is kept at a budget of all tokens
    assert least_duplicated(visual, norms, text, torch.tensor([4.0, 1.0]), 7, 2, 2).tolist() == list(range(7))


def test_dart_keeps_what_duplicates_the_model_pivots_least(adapter, photos, monkeypatch):
    seen: list[torch.Tensor] = []
    original = DARTPruning.choose

    def record(self, hidden, language_model):
        seen.append(language_model.norm(hidden).detach().float())
        return original(self, hidden, language_model)

    monkeypatch.setattr(DARTPruning, "choose", record)
    sets = _compressing("dart")
    pipe = Pipeline(adapter, _method(adapter, "dart", sets))
    results = pipe.generate(_requests("image", photos, 2), 1)
    ((states,),) = [seen]
    (hook,) = pipe.last_hooks
    for b, result in enumerate(results):
        positions = hook.visual[b].nonzero().flatten()
        text = (hook.valid[b] & ~hook.visual[b]).nonzero().flatten()
        text = text[text > positions[-1]]
        budget = round(float(sets["R"]) * positions.numel())
        expected = least_duplicated(states[b, positions], hook.key_norms[b, positions], states[b, text],
                                    hook.key_norms[b, text], budget, 4, 4)  # fmt: skip
        assert torch.nonzero(hook.kept[b]).flatten().tolist() == positions[expected].tolist()
        assert result.account.llm_drops == ((int(sets["K"]), positions.numel() - budget),)
        # the pivots: the visual tokens whose keys in layer K-1 have the largest L1 norm are all kept
        top = S.top_k_stable(hook.key_norms[b, positions].float(), 4)
        assert hook.kept[b, positions[top]].all()


def test_cdpruner_picks_the_greedy_largest_determinant_weighted_by_relevance():
    generator = torch.Generator().manual_seed(3)
    features, text = torch.randn(9, 6, generator=generator), torch.randn(3, 6, generator=generator)
    relevance = instruction_relevance(features, text)
    assert relevance.min() == 0 and relevance.max() == 1
    kernel = conditional_kernel(features, relevance, 0.5)
    quality = torch.exp(0.5 * relevance)  # alpha = theta / (2 (1 - theta)) = 0.5
    assert torch.allclose(kernel.diagonal(), quality**2)
    # the greedy MAP by brute force: each step adds the item that makes det(L_S) largest
    chosen: list[int] = []
    for _ in range(4):
        dets = {j: float(torch.det(kernel[[*chosen, j]][:, [*chosen, j]])) for j in range(9) if j not in chosen}
        chosen.append(max(dets, key=dets.get))
    assert greedy_dpp(kernel, 4).tolist() == sorted(chosen)
    # two copies of one token are never both kept while a distinct one is left; relevance breaks the tie
    copies = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    flat = conditional_kernel(copies, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 0.5)
    assert greedy_dpp(flat, 2).tolist() == [1, 2]  # the more relevant copy, then the distinct token


def test_cdpruner_keeps_the_dpp_choice_of_each_image_in_the_model(adapter, photos):
    from tokcomp.assemble import text_token_ids

    request = _requests("image", photos, 3)[1]  # two images
    sets = _compressing("cdpruner")
    ratio = float(sets["ratio"])
    pipe = Pipeline(adapter, _method(adapter, "cdpruner", sets))
    account = pipe.generate([request], 1)[0].account
    tokens = pipe.visual_tokens([request])[0]
    budgets = [max(1, round(ratio * t.num_positions)) for t in tokens]
    assert [u["kept"] for u in account.per_image] == budgets
    # the kept positions are the greedy DPP of each unit's tokens under the prompt's text embeddings
    text = adapter.embed_tokens(text_token_ids(adapter, pipe.prompt_ids(request)))
    for unit, got, budget in zip(tokens, account.selection["cdpruner"], budgets, strict=True):
        features = unit.position_features()
        relevance = instruction_relevance(features, text)
        assert got == greedy_dpp(conditional_kernel(features, relevance, 0.5), budget).tolist()
        # relevance matters: without it (theta 0) the same budget picks another set
        assert got != greedy_dpp(conditional_kernel(features, relevance, 0.0), budget).tolist()


def test_vidcom2_gives_the_odd_frame_more_and_keeps_the_least_typical_tokens():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 8, generator=generator)
    frames = base + 0.05 * torch.randn(4, 10, 8, generator=generator)  # four alike frames ...
    frames[2] = -base + 0.05 * torch.randn(10, 8, generator=generator)  # ... but frame 2 is unlike the video
    frames[1, 7] = torch.randn(8, generator=generator) * 3  # and frame 1 has one token unlike its frame
    kept = vidcom2_select(frames, 0.3, channels=1.0, temperature=0.01)
    sizes = [len(k) for k in kept]
    assert sizes[2] == max(sizes) > sizes[0] and abs(sum(sizes) - round(0.3 * 40)) <= 1  # rounding per frame
    assert 7 in kept[1].tolist()
    # the budgets add up to the ratio of the video, and an infinite temperature spreads it evenly
    budgets = frame_budgets(torch.tensor([0.0, 1.0, 0.2, 0.1]), 0.25, 100, 0.5)
    assert sum(budgets) == 100 and budgets[1] == max(budgets)
    assert frame_budgets(torch.tensor([0.0, 1.0, 0.2]), 0.25, 100, float("inf")) == [25, 25, 25]


def test_vidcom2_keeps_its_choice_of_each_frame_in_the_model(adapter, photos):
    if "video" not in _cases(adapter, "vidcom2"):
        pytest.skip(f"no video on {adapter.family}")
    request = _requests("video", photos, 3)[1]  # five frames
    sets = _compressing("vidcom2")
    pipe = Pipeline(adapter, _method(adapter, "vidcom2", sets))
    account = pipe.generate([request], 1)[0].account
    (unit,) = pipe.visual_tokens([request])[0]
    n, count = unit.frame_tokens, unit.num_frames
    frames = unit.position_features()[: count * n].reshape(count, n, -1)
    expected = sum(len(k) for k in vidcom2_select(frames, float(sets["ratio"])))
    assert account.visual_kept == expected + (unit.num_positions - count * n)  # and the trailing newline
    assert account.visual_kept < account.visual_full


def test_fastvid_cuts_at_scene_changes_keeps_the_salient_and_merges_into_density_peaks():
    generator = torch.Generator().manual_seed(0)
    scene_a, scene_b = torch.randn(1, 1, 16, generator=generator), torch.randn(1, 1, 16, generator=generator)
    noise = 0.3 * torch.randn(8, 12, 16, generator=generator)
    frames = torch.cat([scene_a.expand(5, 12, -1), scene_b.expand(3, 12, -1)]) + noise
    # DySeg: the cut between the scenes (similarity below tau), then the least similar transitions up to c - 1
    assert segment_lengths(frames.mean(dim=1), 1, 0.9) == [5, 3]
    assert len(segment_lengths(frames.mean(dim=1), 4, -1.0)) == 4
    # density peaks: a token in a tight cluster outscores an isolated one
    cluster = torch.cat([torch.zeros(5, 4) + 0.01 * torch.randn(5, 4, generator=generator), torch.full((1, 4), 5.0)])
    scores = density_scores(cluster)
    assert int(scores[:5].argmax()) in range(5) and float(scores[:5].max()) > float(scores[5])
    groups = fastvid_groups(frames, 0.5, segments=1, tau=0.9, density_share=0.5, anchor_every=4)
    assert groups.segments == [5, 3]
    # the budget: 6 of 12 per frame, 3 salient everywhere, the context budget of a segment on its anchors
    singles = [g for g in groups.members if len(g) == 1]
    merged = [g for g in groups.members if len(g) > 1]
    assert len(groups.members) <= 8 * 6 and len(singles) >= 8 * 3
    heads = [int(g[0]) for g in groups.members]
    assert len(set(heads)) == len(heads)
    # centres are on the anchors (frames 4 and 0 of the first segment, 7 of the second) and absorb tokens
    # of other frames of their own segment only
    for g in merged:
        frame_of = (g // 12).tolist()
        assert frame_of[0] in (0, 4, 7)
        assert all((f < 5) == (frame_of[0] < 5) for f in frame_of)
    for members, weights in zip(groups.members, groups.weights, strict=True):
        if len(members) > 1:  # a centre's share is at least beta, the members' shares add up to one
            assert abs(float(weights.sum()) - 1.0) < 1e-6 and float(weights[0]) >= 0.6


def test_fastvid_keeps_its_groups_of_each_segment_in_the_model(adapter, photos):
    if "video" not in _cases(adapter, "fastvid"):
        pytest.skip(f"no video on {adapter.family}")
    request = _requests("video", photos, 3)[2]  # six frames
    sets = _compressing("fastvid")
    pipe = Pipeline(adapter, _method(adapter, "fastvid", sets))
    account = pipe.generate([request], 1)[0].account
    (unit,) = pipe.visual_tokens([request])[0]
    n, count = unit.frame_tokens, unit.num_frames
    frames = unit.position_features()[: count * n].reshape(count, n, -1)
    expected = len(fastvid_groups(frames, float(sets["ratio"])).members)
    assert account.visual_kept == expected + (unit.num_positions - count * n)  # and the trailing newline
    assert account.visual_kept <= int(n * float(sets["ratio"])) * count + (unit.num_positions - count * n)


def _best_saving_by_brute_force(similarity: torch.Tensor, count: int, tau: float) -> int:
    best = 0
    for cuts in itertools.product([False, True], repeat=count - 1):  # a cut after frame t or not
        saved, start = 0, 0
        for end in [t for t, cut in enumerate(cuts) if cut] + [count - 1]:
            if end > start:
                saved += int((similarity[start:end] > tau).all(dim=0).sum()) * (end - start)
            start = end + 1
        best = max(best, saved)
    return best


@given(st.integers(2, 7), st.integers(1, 6), st.floats(0.0, 0.9), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_holitom_segmentation_is_the_best_of_all_segmentations(count, n, tau, seed):
    similarity = torch.rand(count - 1, n, generator=torch.Generator().manual_seed(seed))
    lengths, saved = holitom_segments(similarity, count, tau, 1024)
    assert sum(lengths) == count and all(length >= 1 for length in lengths)
    assert saved == _best_saving_by_brute_force(similarity, count, tau)
    recount, start = 0, 0
    for length in lengths:  # what the segments save is what the dynamic programme says
        if length > 1:
            recount += int((similarity[start : start + length - 1] > tau).all(dim=0).sum()) * (length - 1)
        start += length
    assert recount == saved


def test_holitom_segments_for_the_most_saved_merges_static_tokens_and_keeps_attended_dynamic_ones():
    generator = torch.Generator().manual_seed(0)
    n, d = 12, 16
    background = torch.randn(1, n, d, generator=generator)
    frames = background.repeat(6, 1, 1) + 0.01 * torch.randn(6, n, d, generator=generator)
    frames[:, 10:] = torch.randn(6, 2, d, generator=generator)  # two positions change every frame
    frames[3:, :5] = torch.randn(1, 5, d, generator=generator)  # a scene change on half the picture at frame 3
    scores = torch.rand(6, n, generator=generator)
    groups = holitom_groups(frames, scores, ratio=0.25, tau=0.8)
    # frames 0-2 share positions 0-9, frames 3-5 positions 0-9 too (after the change): two segments of 3
    assert groups.segments == [3, 3]
    members = torch.cat(groups.members)
    assert members.unique().numel() == members.numel()  # no token in two groups
    static = [g for g in groups.members if len(g) > 1]
    for g in static:  # a static cluster holds its positions over all three frames of its segment
        frames_of, positions = (g // n), (g % n)
        assert set(frames_of.tolist()) in ({0, 1, 2}, {3, 4, 5}) and bool((positions < 10).all())
    saved = 2 * 10 * 2
    share = 0.25 * 6 * n / (6 * n - saved)
    dynamic = [int(g[0]) for g in groups.members if len(g) == 1]
    assert len(dynamic) == 6 * math.ceil(share * 2)  # per frame ceil(r' * 2) of its two changing positions
    for f in range(6):  # the most attended of them
        mine = [i % n for i in dynamic if i // n == f]
        assert sorted(mine) == sorted(S.top_k_stable(scores[f, 10:], len(mine)).add(10).tolist())
    assert len(static) == 2 * max(1, round(share * 10))
    for weights in groups.weights:
        assert abs(float(weights.sum()) - 1.0) < 1e-6
    # the budget: about ratio of the video (rounding up per frame and per segment)
    assert abs(len(groups.members) - 0.25 * 6 * n) <= 6 + 2


def test_holitom_merges_the_least_attended_into_their_most_similar_kept_token_inside_the_llm(adapter, photos):
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [5.0, 5.0]]])
    kept = torch.tensor([[True, True, False, False, False, False]])
    merged = torch.tensor([[False, False, True, True, True, False]])
    out = merge_into_kept(hidden, kept, merged, running=False)
    assert torch.allclose(out[0, 0], (hidden[0, 0] + hidden[0, 2]) / 2)
    assert torch.allclose(out[0, 1], (hidden[0, 1] + hidden[0, 3] + hidden[0, 4]) / 3)
    assert torch.equal(out[0, 2:], hidden[0, 2:])  # the merged ones leave with the cut; others stay
    running = merge_into_kept(hidden, kept, merged, running=True)
    assert torch.allclose(running[0, 1], ((hidden[0, 1] + hidden[0, 3]) / 2 + hidden[0, 4]) / 2)
    assert float(running_average_weights(3).sum()) == 1.0
    if "video" not in _cases(adapter, "holitom"):
        return
    request = _requests("video", photos, 3)[1]
    merging = Pipeline(adapter, _method(adapter, "holitom", {"ratio": "0.5", "inner_merge": "0.5"}))
    cut = merging.generate([request], 1)[0]
    outside = Pipeline(adapter, _method(adapter, "holitom", {"ratio": "0.5", "inner_merge": "0"}))
    plain = outside.generate([request], 1)[0]
    assert cut.account.visual_kept == plain.account.visual_kept  # the same tokens enter the LLM
    ((layer, gone),) = cut.account.llm_drops
    assert layer == round(adapter.language_model.config.num_hidden_layers * 18 / 28)  # the released depth, scaled
    visual = plain.account.visual_kept
    assert gone == visual - max(1, round(0.5 * visual))
    assert not torch.equal(merging.last_prefill_logits, outside.last_prefill_logits)


def test_prumerge_keeps_the_attention_outliers_and_even_samples_and_absorbs_by_key(adapter, photos):
    scores = torch.tensor([1.0, 1.1, 0.9, 1.0, 9.0, 1.05, 0.95, 1.0, 7.0, 1.0, 1.02, 0.98])
    assert attention_outliers(scores).tolist() == [4, 8]  # above Q3 + 1.5 IQR
    assert spread_samples(12, torch.tensor([4, 8]), 3.0).tolist() == [0, 2, 6, 10]  # stride 12 / 2 / 3 = 2
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    groups = absorbing_groups(keys, torch.tensor([0, 2]), 1)
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3]]  # each with its nearest by key
    _encoder_stages(adapter)
    sets = _compressing("prumerge")
    method = _method(adapter, "prumerge", sets)
    request = _requests("image", photos, 1)[0]
    with method(adapter):
        pipe = Pipeline(adapter, method)
        (unit,) = pipe.visual_tokens([request])[0]
        (kept,) = pipe.select(request, ["image"], [unit])
    # per view: the outliers of the traced attention plus the even samples, each merged with its neighbours
    scored = torch.isfinite(unit.trace)
    expected = int((~scored).sum())
    for view in unit.provenance[scored, 0].unique().tolist():
        where = torch.nonzero(scored & (unit.provenance[:, 0] == view)).flatten()
        outliers = attention_outliers(unit.trace[where])
        outliers = outliers if outliers.numel() else S.top_k_stable(unit.trace[where], 1)  # none: the peak
        expected += outliers.numel() + spread_samples(where.numel(), outliers, float(sets["spread"])).numel()
    assert kept.num_positions == expected < unit.num_positions
    # the first kept token of the first view: the attention-weighted mean of itself and its neighbours
    where = torch.nonzero(scored & (unit.provenance[:, 0] == unit.provenance[scored, 0].min())).flatten()
    outliers = attention_outliers(unit.trace[where])
    outliers = outliers if outliers.numel() else S.top_k_stable(unit.trace[where], 1)
    chosen = torch.cat([outliers, spread_samples(where.numel(), outliers, float(sets["spread"]))]).sort().values
    group = absorbing_groups(unit.trace_keys[where], chosen, int(sets["neighbours"]))[0]
    weights = unit.trace[where][group].float()
    members = unit.position_features()[where[group]].float()
    row = torch.nonzero(kept.positions == unit.positions[where[chosen[0]]]).flatten()[0]
    expected_feature = (weights[:, None] * members).sum(dim=0) / weights.sum()
    torch.testing.assert_close(kept.position_features()[row].float(), expected_feature, atol=1e-5, rtol=1e-4)


def test_random_keeps_exactly_the_budget_and_is_seeded(adapter, photos):
    units = adapter.prepare_units(photos[:2], None)
    text = torch.zeros(0, adapter.language_model.config.hidden_size)

    def positions(**sets):
        method = _method(adapter, "random", {k: str(v) for k, v in sets.items()})
        tokens = adapter.stock_unit_tokens(units)
        return [u.positions.tolist() for u in method.select_request(adapter, ["image", "image"], tokens, text)]

    sizes = [t.num_positions for t in adapter.stock_unit_tokens(units)]  # per image (Qwen: its own resolution)
    one, again, other = positions(ratio=0.3, seed=1), positions(ratio=0.3, seed=1), positions(ratio=0.3, seed=2)
    assert [len(p) for p in one] == [round(0.3 * n) for n in sizes]
    assert one == again and one != other and one[0] != one[1]  # seeded, per seed and per unit
    assert one[0] != list(range(len(one[0]))) and all(p == sorted(p) for p in one)


def test_divprune_starts_at_the_largest_total_distance_and_goes_max_min():
    g = torch.Generator().manual_seed(0)
    e = torch.eye(8)
    x = torch.cat([
        e[0] + 0.05 * torch.randn(6, 8, generator=g),  # a cluster holding token 0
        e[1] + 0.05 * torch.randn(3, 8, generator=g),
        e[2] + 0.05 * torch.randn(2, 8, generator=g),
        (-e[0] + 0.3 * e[3])[None],  # far from everything: the right first pick
    ])  # fmt: skip
    n = x.shape[0]
    cosine = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T
    distance = 1 - cosine
    first = int(distance.sum(dim=1).argmax())
    assert first == n - 1 != 0
    greedy = [first]
    for _ in range(n - 1):  # max-min: the token farthest from its nearest chosen one
        nearest = distance[:, greedy].min(dim=1).values
        nearest[greedy] = -1
        greedy.append(int(nearest.argmax()))
    scores = DivPrune(ratio=0.25).score(x, torch.zeros(0, 8), 0)
    assert torch.sort(scores, descending=True, stable=True).indices.tolist() == greedy


def test_visionzip_keeps_the_most_attended_patches_and_averages_the_rest_into_groups(adapter, photos):
    """Per view: the ``dominant`` patches by the eager attention of the feature layer (CLS row with CLS,
    mean received without) as they are; the rest in ``contextual`` groups around evenly spaced centres by
    key cosine similarity, each the mean of its members at its centre's stock position."""
    _encoder_stages(adapter)
    d, c = 20, 6
    request = Request(PROMPTS[1], photos[:2])  # base views only on both families
    method = _method(adapter, "visionzip", {"dominant": str(d), "contextual": str(c)})
    with method(adapter):
        pipe = Pipeline(adapter, method)
        stock = pipe.visual_tokens([request])[0]
        kept = pipe.select(request, ["image", "image"], stock)
    views = torch.cat([u.views for u in adapter.prepare_units(photos[:2], None)])
    scores, keys = eager_trace(adapter, views, adapter.feature_layer)
    n = adapter.num_patches
    for v, (before, after) in enumerate(zip(stock, kept, strict=True)):
        top = S.top_k_stable(scores[v], d).tolist()
        rest = [p for p in range(n) if p not in top]
        centres = [rest[i * len(rest) // c] for i in range(c)]
        unit_keys = torch.nn.functional.normalize(keys[v], dim=-1)
        nearest = (unit_keys[rest] @ unit_keys[centres].T).argmax(dim=1).tolist()
        groups = {centre: [centre] for centre in centres}
        for p, j in zip(rest, nearest, strict=True):
            if p not in groups:
                groups[centres[j]].append(p)
        full = before.position_features()
        expected = {p: full[p] for p in [*top, *range(n, before.num_positions)]}  # dominant ones, OneVision's newline
        expected |= {centre: full[members].float().mean(dim=0) for centre, members in groups.items()}
        assert after.positions.tolist() == sorted(expected)
        assert after.kept == after.num_positions == d + c + before.num_positions - n
        got = after.position_features()
        for i, p in enumerate(after.positions.tolist()):
            if p in groups and len(groups[p]) > 1:
                torch.testing.assert_close(got[i].float(), expected[p], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(got[i], expected[p])
        assert sum(len(g) > 1 for g in groups.values()) > 1  # something merged
    account = Pipeline(adapter, method).generate([request], 1)[0].account
    assert account.visual_kept == account.visual_positions == sum(u.num_positions for u in kept)
