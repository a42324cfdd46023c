"""Stock ``model.generate`` with a method attached: compressed, exact where nothing is compressed,
the same as tokcomp's own pipeline, under greedy, sampling and beam search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from stock_inputs import stock_inputs

import tokcomp
from tokcomp.errors import TokcompError
from tokcomp.methods.registry import build_method
from tokcomp.pipeline import Pipeline, Request

PROMPTS = ["describe the picture", "what is in this image? answer in one word"]
# A neutral setting per image method: it runs the method's code and keeps every token.
NEUTRAL = {
    "none": {},
    "random": {"ratio": "1.0"},
    "divprune": {"ratio": "1.0"},
    "adaptive": {"rho": "1.0", "floor": "1.0"},
    "fastv": {"R": "1.0"},
    "dart": {"R": "1.0"},
    "pyramiddrop": {"keep": "1.0"},
    "cdpruner": {"ratio": "1.0"},
    "prumerge": {"spread": "1000", "neighbours": "0"},
    "tome": {"r": "0"},
    "dymu": {"threshold": "inf"},
    "dtome": {"threshold": "inf"},
}
COMPRESSING = ["random-25", "divprune-25", "adaptive-20", "fastv", "tome-mid", "dymu-mid", "dtome-mid", "visionzip"]
# Per registered method, a compressing setting driven through stock generate in every mode (video for DyCoke).
BY_METHOD = {
    "none": ("none", None),
    "dymu": ("dymu-mid", None),
    "dtome": ("dtome-mid", None),
    "tome": ("tome-mid", None),
    "dycoke": ("dycoke", None),
    "adaptive": ("adaptive-20", None),
    "fastv": ("fastv", None),
    "random": ("random-25", None),
    "divprune": ("divprune-25", None),
    "visionzip": ("visionzip", {"dominant": "20", "contextual": "4"}),
    "dart": ("dart", None),
    "pyramiddrop": ("pyramiddrop", None),
    "cdpruner": ("cdpruner", None),
    "vidcom2": ("vidcom2", None),
    "fastvid": ("fastvid", None),
    "holitom": ("holitom", None),
    "prumerge": ("prumerge", None),
}


def _method(adapter, spec, sets=None):
    return build_method(spec, adapter.name, adapter.num_layers, sets=sets)


def _generate(model, inputs, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.fixture(scope="module")
def inputs(adapter, photos):
    return stock_inputs(adapter, PROMPTS, [[photos[0]], [photos[1]]])


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_a_neutral_method_under_stock_generate_is_the_plain_model(adapter, inputs, name):
    plain = _generate(adapter.model, inputs)
    method = _method(adapter, name, NEUTRAL[name])
    with method(adapter.model):
        mine = _generate(adapter.model, inputs)
    assert torch.equal(mine.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(mine.logits, plain.logits, strict=True))
    assert [a.visual_kept for a in method.accounts] == [a.visual_full for a in method.accounts]


@pytest.mark.parametrize("spec", COMPRESSING)
def test_stock_generate_compresses_exactly_as_the_pipeline(adapter, inputs, photos, spec):
    """Greedy stock generate with the method attached gives the pipeline's answers, logits and accounts."""
    method = _method(adapter, spec)
    with method(adapter.model):
        mine = _generate(adapter.model, inputs)
    accounts = method.accounts
    requests = [Request(p, [im]) for p, im in zip(PROMPTS, photos[:2], strict=True)]
    pipe = Pipeline(adapter, method)
    reference = pipe.generate(requests, max_new_tokens=4)
    assert len(accounts) == 2
    if spec != "fastv":  # FastV prunes inside the LLM: its prefill input is whole
        assert all(a.visual_kept < a.visual_full for a in accounts)
    for b, generation in enumerate(reference):
        assert accounts[b].visual_kept == generation.account.visual_kept
        assert accounts[b].visual_positions == generation.account.visual_positions
        assert accounts[b].per_image == generation.account.per_image
        new = mine.sequences[b, inputs["input_ids"].shape[1] :].tolist()
        assert new[: len(generation.token_ids)] == generation.token_ids
    torch.testing.assert_close(mine.logits[0], pipe.last_prefill_logits, rtol=1e-5, atol=1e-5)


def test_the_output_keeps_the_stock_prompt_and_sampling_and_beams_run(llava, photos):
    inputs = stock_inputs(llava, PROMPTS[:1], [[photos[2]]])
    length = inputs["input_ids"].shape[1]
    m = tokcomp.method("random-25")
    with m(llava.model):
        torch.manual_seed(0)
        sampled = llava.model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.8)
        beams = llava.model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert torch.equal(sampled[:, :length], inputs["input_ids"]) and sampled.shape[1] > length
    assert beams.shape[0] == 2 and torch.equal(beams[:, :length], inputs["input_ids"].expand(2, -1))
    assert len(m.accounts) == 1 and m.accounts[0].visual_kept == m.accounts[0].visual_full // 4


def test_a_method_with_per_sequence_decode_state_refuses_beam_search(llava_ov, photos):
    frames = [photos[k % 6] for k in range(8)]
    inputs = stock_inputs(llava_ov, ["what happens?"], [[]], videos=[frames])
    m = tokcomp.method("dycoke")
    with m(llava_ov.model):
        with pytest.raises(TokcompError, match="beam search is not supported"):
            llava_ov.model.generate(**inputs, max_new_tokens=3, num_beams=2)
        out = llava_ov.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    (account,) = m.accounts
    assert account.visual_kept < account.visual_full


def test_a_padded_batch_equals_each_request_alone(adapter, photos):
    prompts = ["a", "tell me everything you can see in this picture please"]
    method = _method(adapter, "divprune-25")
    batch = stock_inputs(adapter, prompts, [[photos[3]], [photos[4]]])
    with method(adapter.model):
        together = adapter.model.generate(**batch, max_new_tokens=4, do_sample=False)
        alone = []
        for prompt, photo in zip(prompts, photos[3:5], strict=True):
            one = stock_inputs(adapter, [prompt], [[photo]])
            out = adapter.model.generate(**one, max_new_tokens=4, do_sample=False)
            alone.append(out[0, one["input_ids"].shape[1] :])
    length = batch["input_ids"].shape[1]
    for b in range(2):
        assert together[b, length : length + len(alone[b])].tolist() == alone[b].tolist()


def test_detaching_restores_the_stock_model(llava, photos):
    model = llava.model
    inputs = stock_inputs(llava, PROMPTS[:1], [[photos[0]]])
    before = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    m = tokcomp.method("dymu-mid")
    with m(model):
        assert "generate" in model.__dict__
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "generate" not in model.__dict__ and not hasattr(model, "_tokcomp_adapter")
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), before)


def test_unknown_names_and_unsupported_models_are_clear():
    with pytest.raises(TokcompError, match="unknown method"):
        tokcomp.method("no-such-method")
    with pytest.raises(TokcompError, match="not supported"), tokcomp.method("random-25")(torch.nn.Linear(2, 2)):
        pass


@pytest.mark.parametrize("spec", ["dycoke", "dycoke-ttm", "dymu-dycoke"])
def test_video_under_stock_generate_matches_the_pipeline(llava_ov, photos, spec):
    frames = [photos[k % 6].rotate(7 * k) for k in range(8)]
    inputs = stock_inputs(llava_ov, ["what happens in the video?"], [[]], videos=[frames])
    method = _method(llava_ov, spec)
    with method(llava_ov.model):
        mine = _generate(llava_ov.model, inputs)
    pipe = Pipeline(llava_ov, method)
    (reference,) = pipe.generate([Request("what happens in the video?", video=frames)], max_new_tokens=4)
    (account,) = method.accounts
    assert account.visual_kept == reference.account.visual_kept < account.visual_full
    new = mine.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[: len(reference.token_ids)] == reference.token_ids
    torch.testing.assert_close(mine.logits[0], pipe.last_prefill_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_multi_image_requests_follow_the_stock_grouping(llava_ov, photos, grouped):
    """With ``batch_num_images`` several images of a request get their base view each; without it the
    stock model treats every image as a lone one (AnyRes), and so does tokcomp."""
    inputs = stock_inputs(llava_ov, ["first <image> second <image> same?"], [photos[:2]])
    if not grouped:
        inputs.pop("batch_num_images")
        texts = [llava_ov.build_prompt("<image> <image> same?", 2, False)]
        for unit in (u for im in photos[:2] for u in llava_ov.prepare_units([im], None)):
            texts[0] = texts[0].replace("<image>", "\x00" * llava_ov._image_token_count(unit), 1)
        ids = llava_ov.tokenizer([texts[0].replace("\x00", "<image>")], return_tensors="pt", add_special_tokens=False)
        inputs.update(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    plain = _generate(llava_ov.model, inputs)
    method = _method(llava_ov, "random", {"ratio": "1.0"})
    with method(llava_ov.model):
        mine = _generate(llava_ov.model, inputs)
    assert torch.equal(mine.sequences, plain.sequences) and torch.equal(mine.logits[0], plain.logits[0])
    assert [p["views"] for p in method.accounts[0].per_image] == ([1, 1] if grouped else [5, 5])


MODES = {"sample": {"do_sample": True, "top_k": 10, "temperature": 0.7}, "beams": {"num_beams": 2}}


def test_every_registered_method_has_a_stock_generate_row():
    from tokcomp.methods.registry import METHODS

    assert set(BY_METHOD) == set(METHODS), "add the new method to BY_METHOD"


@pytest.mark.parametrize("mode", ["greedy", *sorted(MODES)])
@pytest.mark.parametrize("spec", [*sorted(BY_METHOD), "dymu-dycoke"])
def test_every_method_runs_under_greedy_sampling_and_beams_or_refuses(llava_ov, photos, spec, mode):
    spec, sets = BY_METHOD.get(spec, (spec, None))
    video = spec in ("dycoke", "dymu-dycoke", "vidcom2", "fastvid", "holitom")
    frames = [photos[k % 6] for k in range(4)]
    inputs = stock_inputs(llava_ov, ["what is it?"], [[] if video else [photos[5]]], videos=[frames] if video else None)
    method = _method(llava_ov, spec, sets)
    with method(llava_ov.model):
        if mode == "beams" and not method.supports_beam_search:
            with pytest.raises(TokcompError, match="beam search is not supported"):
                _generate(llava_ov.model, inputs, **MODES[mode])
            return
        out = _generate(llava_ov.model, inputs, **MODES.get(mode, {"do_sample": False}))
    assert out.sequences.shape[1] > inputs["input_ids"].shape[1] and len(method.accounts) == 1
    (account,) = method.accounts
    if spec in ("none", "fastv", "dart", "pyramiddrop"):  # these prune inside the LLM: the prefill input is whole
        assert account.visual_kept == account.visual_full
    else:
        assert account.visual_kept < account.visual_full


def test_the_readme_example_method_runs_under_stock_generate(llava, photos):
    """The "write your own method" example of the README, as printed there."""
    from tokcomp.methods.pruning import TokenScorer
    from tokcomp.methods.settings import REGISTERED, register

    @register
    @dataclass
    class PromptSimilar(TokenScorer):
        name: ClassVar[str] = "prompt-similar"
        ratio: float = 0.25

        def score(self, features, text, unit):
            query = text.float().mean(dim=0)
            return torch.nn.functional.cosine_similarity(features.float(), query[None], dim=-1)

    inputs = stock_inputs(llava, PROMPTS[:1], [[photos[0]]])
    method = PromptSimilar(ratio=0.3)
    with method(llava.model):
        out = llava.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    (account,) = method.accounts
    assert account.visual_kept == round(0.3 * account.visual_full)
    neutral = PromptSimilar(ratio=1.0)
    with neutral(llava.model):
        same = llava.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(same, llava.model.generate(**inputs, max_new_tokens=3, do_sample=False))
    try:  # registered: known by name, its settings typed from its fields
        handle = tokcomp.method("prompt-similar", ratio="0.5")
        with handle(llava.model):
            llava.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert isinstance(handle.resolved, PromptSimilar) and handle.resolved.ratio == 0.5
        assert handle.accounts[0].visual_kept == round(0.5 * handle.accounts[0].visual_full)
    finally:
        REGISTERED.pop("prompt-similar")
