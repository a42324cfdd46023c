"""tokcomp-tiny: deterministic task generators, answers checked from pixels, the trained model, training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from skimage.measure import label, regionprops

from tokcomp.data.tasks import (
    COLORS,
    LABEL_PATCH,
    NUMBERS,
    ORDINALS,
    TASKS,
    generate,
    make_item,
    normalize_answer,
    png_bytes,
    random_guess,
    read_eval_split,
    write_eval_splits,
)
from tokcomp.models.adapters import LlavaOnevisionAdapter


# --- an independent reading of the pictures ----------------------------------------------------
def blobs(image, color: str | None = None, min_area: int = 25) -> list[tuple[str, str, float, float]]:
    """(colour, shape, x, y) of every solid palette-coloured region, from the pixels alone."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    found = []
    for name, rgb in COLORS.items():
        if color is not None and name != color:
            continue
        mask = (pixels == np.array(rgb)).all(-1)
        for region in regionprops(label(mask, connectivity=1)):
            if region.area >= min_area:
                y, x = region.centroid
                found.append((name, classify(region), float(x), float(y)))
    return found


def classify(region) -> str:
    """Shape of a small filled region: fill of its box, convexity, and where its widest row is."""
    widths = region.image.sum(1)
    widest = widths.argmax() / max(1, len(widths) - 1)
    if region.extent > 0.9:
        return "square"
    if widest >= 0.75:
        return "triangle"
    if region.extent > 0.755 and region.solidity >= 0.92:
        return "circle"
    if region.extent <= 0.53 and 0.45 <= widest <= 0.65:
        return "diamond"
    return "cross"


def check_shapes(item) -> None:
    (image,) = item.images
    found = blobs(image)
    if item.kind == "count":
        assert NUMBERS[len(found)] == item.answer
    elif item.kind == "color":
        shape = item.question.split()[-1].rstrip("?")
        assert [c for c, s, _, _ in found if s == shape] == [item.answer]
    elif item.kind == "shape":
        color = item.question.split()[4]
        assert [s for c, s, _, _ in found if c == color] == [item.answer]
    else:
        words = item.question.split()
        color, shape = words[2], words[3]
        ((x, y),) = [(x, y) for c, s, x, y in found if (c, s) == (color, shape)]
        side = ("left" if x < 56 else "right") if "left" in words else ("top" if y < 56 else "bottom")
        assert side == item.answer


def check_multi(item) -> None:
    seen = []
    for image in item.images:
        ((color, shape, _, _),) = blobs(image)
        seen.append((color, shape))
    words = item.question.rstrip("?").split()
    if item.kind == "which":
        assert seen.index((words[4], words[5])) == ORDINALS.index(item.answer)
        assert seen.count((words[4], words[5])) == 1
    elif item.kind == "match":
        i, j = ORDINALS.index(words[2]), ORDINALS.index(words[4])
        assert ("yes" if seen[i] == seen[j] else "no") == item.answer
    else:
        assert NUMBERS[sum(s == words[-1] for _, s in seen)] == item.answer


def check_motion(item) -> None:
    frames = item.video
    assert 8 <= len(frames) <= 16
    words = item.question.rstrip("?").split()
    if item.kind == "direction":
        color = words[4]
        (_, _, x0, y0), (_, _, x1, y1) = blobs(frames[0], color)[0], blobs(frames[-1], color)[0]
        dx, dy = x1 - x0, y1 - y0
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == item.answer
    elif item.kind in ("appear", "disappear"):
        first = {c for c, *_ in blobs(frames[0])}
        last = {c for c, *_ in blobs(frames[-1])}
        changed = last - first if item.kind == "appear" else first - last
        assert changed == {item.answer}
    else:
        a, b = words[4].rstrip(","), words[6]
        onset = {c: next(t for t, f in enumerate(frames) if blobs(f, c)) for c in (a, b)}
        assert min(onset, key=onset.get) == item.answer
        assert onset[a] != onset[b]


def check_text(item) -> None:
    """One letter per cell of one row: the cells holding bright glyph pixels are len(answer) in a row."""
    (image,) = item.images
    pixels = np.asarray(image).astype(int)
    glyph = np.zeros(pixels.shape[:2], bool)
    for name in ("white", "yellow"):
        glyph |= (np.abs(pixels - np.array(COLORS[name])) <= 60).all(-1)
    grid = glyph.shape[0] // LABEL_PATCH
    ink = glyph.reshape(grid, LABEL_PATCH, grid, LABEL_PATCH).sum((1, 3))
    rows, cols = np.nonzero(ink >= 6)
    assert 3 <= len(item.answer) <= 5
    assert len(set(rows)) == 1 and sorted(cols) == list(range(cols.min(), cols.min() + len(item.answer)))


CHECKS = {"tc_shapes": check_shapes, "tc_multi": check_multi, "tc_motion": check_motion, "tc_text": check_text}


# --- generators ------------------------------------------------------------------------------
def _fingerprint(item) -> tuple:
    return (item.question, item.answer, tuple(item.choices), tuple(png_bytes(im) for im in item.images),
            tuple(png_bytes(f) for f in item.video or []))  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic(task):
    first = [_fingerprint(it) for it in generate(task, "eval", 4, seed=3)]
    again = [_fingerprint(make_item(task, "eval", i, seed=3)) for i in (3, 2, 1, 0)][::-1]
    assert first == again
    assert first != [_fingerprint(it) for it in generate(task, "train", 4, seed=3)]


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_correct_by_construction(task):
    items = generate(task, "eval", 40, seed=1)
    for item in items:
        CHECKS[task](item)
        assert not item.choices or item.answer in item.choices
    assert len({it.kind for it in items}) == {"tc_text": 1, "tc_multi": 3}.get(task, 4)


def test_question_and_answer_words_are_in_the_vocabulary():
    from tokcomp.tiny.model import build_tokenizer

    tokenizer = build_tokenizer()
    for task in TASKS:
        for item in generate(task, "train", 30):
            ids = tokenizer(f"{item.prompt} {item.target}", add_special_tokens=False).input_ids
            assert tokenizer.unk_token_id not in ids, item.question


def _palette_share(picture, patch: int = LABEL_PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the palette colour covering most of it (index + 1, 0 for none) and its share."""
    pixels = np.asarray(picture).astype(int)
    grid = pixels.shape[0] // patch
    shares = np.stack([(pixels == np.array(rgb)).all(-1) for rgb in COLORS.values()], -1).astype(float)
    shares = shares.reshape(grid, patch, grid, patch, len(COLORS)).mean((1, 3))
    return shares.argmax(-1) + 1, shares.max(-1)


@pytest.mark.parametrize("task", ["tc_shapes", "tc_multi", "tc_motion"])
def test_patch_labels_agree_with_the_pixels(task):
    for item in generate(task, "train", 6):
        pictures = item.video or item.images
        assert len(item.labels) == len(pictures)
        for picture, labels in zip(pictures, item.labels, strict=True):
            colour, share = _palette_share(picture)
            labelled = labels["color"] > 0
            assert (labels["color"][labelled] == colour[labelled]).all() and (share[labelled] >= 0.15).all()
            assert labelled[share >= 0.5].all()  # a mostly covered patch is always labelled
            assert ((labels["shape"] > 0) == labelled).all()
            assert len(set(labels["count"].ravel())) == 1 and labels["count"][0, 0] == len(blobs(picture))


def test_text_labels_spell_the_answer_left_to_right():
    from tokcomp.data.tasks import TEXT_ALPHABET

    for item in generate("tc_text", "train", 8):
        (labels,) = item.labels
        chars, order = labels["char"], labels["ordinal"]
        assert (labels["count"] == len(item.answer)).all() and ((chars > 0) == (order > 0)).all()
        assert set(order[order > 0]) == set(range(1, len(item.answer) + 1))  # every character has patches
        for k in range(1, len(item.answer) + 1):
            assert {TEXT_ALPHABET[c - 1] for c in chars[order == k]} == {item.answer[k - 1]}
        columns = [np.nonzero(order == k)[1].mean() for k in range(1, len(item.answer) + 1)]
        assert columns == sorted(columns)


def test_eval_splits_are_files_regenerated_byte_for_byte(tmp_path):
    paths = write_eval_splits(tmp_path / "a", n=3, seed=0)
    again = write_eval_splits(tmp_path / "b", n=3, seed=0)
    for task in TASKS:
        assert paths[task].read_bytes() == again[task].read_bytes()
        expected = generate(task, "eval", 3)
        assert [_fingerprint(it) for it in read_eval_split(paths[task])] == [_fingerprint(it) for it in expected]
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["tc_text"]["random_guess"] == 0.0 and 0 < index["tc_multi"]["random_guess"] < 1


def test_random_guess_and_normalisation():
    assert normalize_answer(" K Q Z. ") == normalize_answer("kqz") == "kqz"
    assert random_guess(generate("tc_shapes", "eval", 20)) > 0.1


# --- model -----------------------------------------------------------------------------------
def test_training_inputs_match_what_the_pipeline_feeds_the_llm():
    from tokcomp.tiny.model import TEST_SPEC, build_image_processor, build_model, build_tokenizer
    from tokcomp.tiny.train import _unit_features

    tokenizer = build_tokenizer()
    model = build_model(TEST_SPEC, tokenizer).eval()
    adapter = LlavaOnevisionAdapter(model, tokenizer, build_image_processor(TEST_SPEC), "t")
    items = [make_item(task, "eval", 0) for task in TASKS]
    units = [adapter.prepare_units(it.images, it.video) for it in items]
    with torch.no_grad():
        for unit_list, features in zip(units, _unit_features(adapter, units), strict=True):
            for stock, mine in zip(adapter.stock_unit_tokens(unit_list), features, strict=True):
                assert torch.equal(stock.unique, mine)


def test_a_two_step_training_run_saves_a_loadable_checkpoint(tmp_path):
    from tokcomp.models.loading import load_vlm
    from tokcomp.tiny.evaluate import answer_items
    from tokcomp.tiny.train import main

    assert main(["--out", str(tmp_path), "--steps", "2", "--encoder-steps", "2", "--test-config",
                 "--batch-scale", "0.25", "--eval-items", "1", "--threads", "1"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["steps"] == 2 and report["encoder_steps"] == 2 and set(report["eval"]) == set(TASKS)
    adapter = load_vlm(str(tmp_path))
    assert len(answer_items(adapter, generate("tc_multi", "eval", 1))) == 1


def test_a_missing_committed_checkpoint_is_a_clear_error(monkeypatch, tmp_path):
    from tokcomp.errors import TokcompError
    from tokcomp.models import loading

    monkeypatch.setitem(loading.COMMITTED, "tokcomp-tiny", tmp_path / "nowhere")
    with pytest.raises(TokcompError, match="checkpoint is missing"):
        loading.load_vlm("tokcomp-tiny")


# Question types tokcomp-tiny answers well above chance (count 1/8, colour 1/6 by guessing; see the
# model card), and the share of them it must get right among the first 24 tc_shapes eval items.
SMOKE_KINDS = ("count", "color")
SMOKE_MIN_CORRECT = 0.5


def test_tokcomp_tiny_loads_offline_and_answers_eval_items():
    """The committed checkpoint, through the same loading path as any model, reads a few eval items."""
    from tokcomp.models.loading import load_vlm
    from tokcomp.tiny.evaluate import answer_items

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    adapter = load_vlm("tokcomp-tiny")
    assert adapter.model.config.tokcomp_preset == "tokcomp-tiny"
    items = [it for it in generate("tc_shapes", "eval", 24) if it.kind in SMOKE_KINDS]
    answers = answer_items(adapter, items)
    correct = [normalize_answer(a) == normalize_answer(it.answer) for it, a in zip(items, answers, strict=True)]
    pairs = [(a, it.answer) for a, it in zip(answers, items, strict=True)]
    assert sum(correct) >= SMOKE_MIN_CORRECT * len(items), pairs


def test_training_resumes_where_it_stopped_and_adds_up_its_runs(tmp_path):
    """A run stopped early saves its state; --resume finishes it with the same settings; training.json,
    the curve and the model card record both runs."""
    from tokcomp.tiny.train import main, state_dir_for

    common = ["--out", str(tmp_path / "ckpt"), "--test-config", "--batch-scale", "0.25", "--threads", "1",
              "--eval-items", "1", "--curve-every", "2", "--curve-items", "1", "--log-every", "1"]  # fmt: skip
    assert main([*common, "--steps", "4", "--encoder-steps", "2", "--evidence-weight", "0.5",
                 "--stop-after-minutes", "0.0001"]) == 0  # fmt: skip
    assert (state_dir_for(tmp_path / "ckpt") / "state.pt").is_file() and not (tmp_path / "ckpt").exists()
    saved = torch.load(state_dir_for(tmp_path / "ckpt") / "state.pt", weights_only=False)
    moments = [v for entry in saved["optimizer"]["state"].values() for k, v in entry.items() if k != "step"]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)  # compact; cast back on resume
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())
    # the saved settings win, except the loss weights and curriculum given again, which the run records
    # (switched on in the encoder stage, the curriculum starts with the answer stage)
    assert main([*common, "--resume", "--query-weight", "0.5", "--query-layer", "0", "--curriculum-steps", "2",
                 "--bind-weight", "0.3", "--kind-weight", "position=3", "--task-weight", "tc_text=1"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "ckpt" / "training.json").read_text())
    assert report["steps"] == 4 and report["evidence_weight"] == 0.5 and len(report["runs"]) == 2
    assert report["query_weight"] == 0.5 and report["curriculum_from"] == 0 and report["query_layer"] == 0
    assert report["bind_layer"] == 0 and report["kind_weights"] == {"position": 3.0}
    assert report["task_weights"] == {"tc_shapes": 3, "tc_text": 1, "tc_multi": 2, "tc_motion": 2}
    assert report["runs"][1]["changed"] == {"query_weight": 0.5, "query_layer": 0, "curriculum_steps": 2,
                                            "bind_weight": 0.3, "kind_weights": {"position": 3.0},
                                            "task_weights": {"tc_text": 1}}  # fmt: skip
    finished = torch.load(state_dir_for(tmp_path / "ckpt") / "state.pt", weights_only=False)
    assert (finished["stage"], finished["step"], len(finished["runs"])) == ("answer", 4, 2)  # saved at the end too
    assert [c["step"] for c in report["curve"]] == [2, 4] and report["cpu_seconds"] > 0
    assert (tmp_path / "ckpt" / "training-curve.png").stat().st_size > 1000
    assert "## Numbers" in (tmp_path / "ckpt" / "README.md").read_text()


def test_resuming_without_a_saved_state_is_a_clear_error(tmp_path, capsys):
    from tokcomp.tiny.train import main

    assert main(["--out", str(tmp_path / "none"), "--resume", "--test-config"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_curriculum_draws_fewer_objects_from_the_same_stream():
    """Difficulty 1 is the eval distribution item for item; difficulty 0 keeps scenes small."""
    from tokcomp.data.tasks import make_item

    for task in TASKS:
        for i in range(20):
            full, default = make_item(task, "train", i, difficulty=1.0), make_item(task, "train", i)
            assert (full.question, full.answer) == (default.question, default.answer)
    assert all(make_item("tc_shapes", "train", i, difficulty=0.0).labels[0]["count"].max() <= 2 for i in range(40))
    assert all(len(make_item("tc_multi", "train", i, difficulty=0.0).images) == 2 for i in range(40))


def test_kind_weights_ask_some_questions_more_often_and_leave_the_eval_stream_alone():
    from tokcomp.data.tasks import make_item

    for task in TASKS:
        for i in range(20):
            plain, unweighted = make_item(task, "eval", i), make_item(task, "eval", i, kind_weights={})
            assert (plain.question, plain.answer) == (unweighted.question, unweighted.answer)
    kinds = [make_item("tc_shapes", "train", i, kind_weights={"position": 6.0}).kind for i in range(300)]
    assert kinds.count("position") > 150  # 6 of 9 expected (2/3), against 1 in 4 unweighted
    assert {make_item("tc_multi", "train", i, kind_weights={"match": 0.0}).kind for i in range(60)} == {"which",
                                                                                                      "count"}


@pytest.mark.parametrize(
    "flag,value",
    [("--kind-weight", "position"), ("--kind-weight", "nosuchkind=2"), ("--kind-weight", "position=x"),
     ("--kind-weight", "position=-1"), ("--task-weight", "tc_text=0.5"), ("--task-weight", "tc_nothing=1")],
)  # fmt: skip
def test_a_bad_weight_is_one_clear_error(flag, value, tmp_path, capsys):
    from tokcomp.tiny.train import main

    assert main(["--out", str(tmp_path / "c"), "--test-config", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and not (tmp_path / "c").exists()


def _spliced_prompts(tasks, n):
    """A tiny untrained adapter and, per item of ``tasks``, (item, prompt ids, spliced prompt) as
    training builds them."""
    from tokcomp.models.adapters import LlavaOnevisionAdapter
    from tokcomp.models.visual import identity_tokens
    from tokcomp.pipeline import Pipeline
    from tokcomp.tiny.model import TEST_SPEC, build_image_processor, build_model, build_tokenizer
    from tokcomp.tiny.train import _unit_features, request_of

    tokenizer = build_tokenizer()
    adapter = LlavaOnevisionAdapter(build_model(TEST_SPEC, tokenizer).eval(), tokenizer,
                                    build_image_processor(TEST_SPEC), "t")  # fmt: skip
    pipe = Pipeline(adapter)
    out = []
    for task in tasks:
        for item in generate(task, "train", n):
            request = request_of(item)
            units = adapter.prepare_units(list(request.images), None)
            with torch.no_grad():
                tokens = [identity_tokens(f, []) for f in _unit_features(adapter, [units])[0]]
            ids = pipe.prompt_ids(request)
            out.append((item, ids, pipe.splice_ids(ids, tokens, [u.kind for u in units])))
    return adapter, out


def test_the_binding_loss_pairs_each_picture_with_the_word_naming_it():
    """In "first <image> second <image> ...", every token of picture k is paired with the ordinal
    word right before it; pictures cover the visual positions exactly; nothing to bind with one image."""
    from tokcomp.tiny.train import binding_pairs

    adapter, prompts = _spliced_prompts(("tc_multi", "tc_shapes"), 4)
    tokenizer = adapter.tokenizer
    for item, ids, spliced in prompts:
        pairs = binding_pairs(adapter, ids, spliced.visual_unique)
        if item.task == "tc_shapes":
            assert pairs == []
            continue
        assert len(pairs) == len(item.images)
        covered = torch.cat([rows for rows, _ in pairs])
        assert torch.equal(covered, spliced.visual_unique.nonzero().flatten())
        text_positions = (~spliced.visual_unique).nonzero().flatten().tolist()
        words = dict(zip(text_positions, tokenizer.convert_ids_to_tokens(
            [t for t in ids.tolist() if t != adapter.image_token_id]), strict=True))  # fmt: skip
        assert [words[key] for _, key in pairs] == ["first", "second", "third", "fourth"][: len(item.images)]
        assert all(key == int(rows[0]) - 1 for rows, key in pairs)


def test_the_query_loss_marks_the_question_words_that_name_the_lookup():
    """Key words are the question's colour, shape and ordinal words after the last picture, never the
    pictures' own names ("first <image> second <image> ...")."""
    from tokcomp.tiny.train import key_positions

    adapter, prompts = _spliced_prompts(("tc_shapes", "tc_multi", "tc_text"), 12)
    tokenizer = adapter.tokenizer
    found = {}
    for item, ids, spliced in prompts:
        keys = key_positions(adapter, ids, spliced.visual_unique)
        assert not (keys & spliced.visual_unique).any()
        text = [t for t in ids.tolist() if t != adapter.image_token_id]
        words = tokenizer.convert_ids_to_tokens(text)
        marked = [w for w, k in zip(words, keys[~spliced.visual_unique], strict=True) if k]
        found[item.question] = marked
    assert found["what color is the diamond?"] == ["diamond"]
    assert found["which image shows a red square?"] == ["red", "square"]
    assert all(v == [] for q, v in found.items() if q in ("read the text.", "what does the text say?"))
    match = next(q for q in found if q.startswith("do the "))
    assert found[match] == match.split()[2:5:2]  # "do the first and third images match?": first, third


def _kind_of(task: str, question: str) -> str:
    """The question type of a follow-up, from its wording (the generators' templates)."""
    if task == "tc_multi":
        return "which" if question.startswith("which") else "match" if "match" in question else "count"
    if question.startswith("what color"):
        return "color"
    if question.startswith("what shape"):
        return "shape"
    return "count" if question.startswith("how many") else "position"


@pytest.mark.parametrize("task", ["tc_shapes", "tc_multi"])
def test_follow_up_questions_are_answered_right_and_leave_the_item_alone(task):
    """Follow-ups are correct by the pixels, distinct, and drawn after the item (which stays the same)."""
    from dataclasses import replace

    asked = 0
    for i in range(30):
        plain, packed = make_item(task, "train", i), make_item(task, "train", i, follow_ups=4)
        assert _fingerprint(plain) == _fingerprint(packed) and not plain.follow_ups
        questions = [plain.question, *(q for q, _ in packed.follow_ups)]
        assert len(set(questions)) == len(questions) and len(packed.follow_ups) <= 4
        for question, answer in packed.follow_ups:
            CHECKS[task](replace(packed, question=question, answer=answer, kind=_kind_of(task, question)))
        asked += len(packed.follow_ups)
    assert asked >= 60  # most scenes have room for several
    assert all(not make_item(t, "train", 0, follow_ups=3).follow_ups for t in ("tc_text", "tc_motion"))


def test_follow_up_turns_are_the_chat_template_of_a_longer_conversation():
    from tokcomp.tiny.model import build_tokenizer
    from tokcomp.tiny.train import turn_ids

    tok = build_tokenizer()
    first, reply, then = "what color is the square?", "red", "how many objects are there?"
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": then}]  # fmt: skip

    def ids(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids

    expected = ids(conversation)
    built = [*ids(conversation[:1]), *tok(reply, add_special_tokens=False).input_ids, tok.eos_token_id,
             *turn_ids(tok, then).tolist()]  # fmt: skip
    assert built == expected


def test_the_answer_loss_covers_every_turn_at_its_own_positions():
    """batch_loss with follow-ups is the cross-entropy of every answer token (and EOS) of the whole
    conversation, spliced in one piece and run through the language model."""
    import torch.nn.functional as F

    from tokcomp.models.visual import identity_tokens
    from tokcomp.pipeline import Pipeline
    from tokcomp.tiny.model import TEST_SPEC, build_image_processor, build_model, build_tokenizer
    from tokcomp.tiny.train import batch_loss, request_of, turn_ids

    tok = build_tokenizer()
    model = build_model(TEST_SPEC, tok).eval()
    adapter = LlavaOnevisionAdapter(model, tok, build_image_processor(TEST_SPEC), "t")
    item = make_item("tc_shapes", "train", 1, follow_ups=2)
    assert len(item.follow_ups) == 2
    pipe = Pipeline(adapter)
    ids, answers = pipe.prompt_ids(request_of(item)).tolist(), []
    for k, (question, reply) in enumerate([(item.question, item.answer), *item.follow_ups]):
        if k:
            ids += turn_ids(tok, question).tolist()
        reply_ids = [*tok(reply, add_special_tokens=False).input_ids, tok.eos_token_id]
        answers += list(range(len(ids), len(ids) + len(reply_ids)))
        ids += reply_ids
    with torch.no_grad():
        units = adapter.prepare_units(list(item.images), None)
        tokens = [identity_tokens(u.unique, []) for u in adapter.stock_unit_tokens(units)]
        spliced = pipe.splice_ids(torch.tensor(ids), tokens, ["image"])
        shift = spliced.embeds.shape[0] - len(ids)  # the image placeholder became the image's tokens
        hidden = adapter.language_model(inputs_embeds=spliced.embeds[None]).last_hidden_state[0]
        rows = torch.tensor(answers) + shift
        expected = F.cross_entropy(adapter.lm_head(hidden[rows - 1]).float(), torch.tensor(ids)[rows - shift])
        loss = batch_loss(adapter, [item])[0]
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not torch.allclose(loss, batch_loss(adapter, [make_item("tc_shapes", "train", 1)])[0])


def test_a_run_can_start_from_another_runs_encoder_with_a_fresh_language_model(tmp_path):
    """--init-from takes the vision tower, projector and word embeddings, rescales the visual tokens to
    --patch-rms, starts the language model afresh at the answer stage, and counts the source's time."""
    from tokcomp.tiny.train import (
        _encode_batch,
        main,
        rms,
        seed_from_state,
        state_dir_for,
    )

    common = ["--test-config", "--batch-scale", "0.25", "--threads", "1", "--eval-items", "0", "--log-every", "1",
              "--curve-every", "0"]
    assert main(["--out", str(tmp_path / "a"), *common, "--steps", "1", "--encoder-steps", "2"]) == 0
    source = state_dir_for(tmp_path / "a") / "state.pt"
    before = torch.load(source, weights_only=False)
    layer = "model.language_model.layers.0.self_attn.q_proj.weight"
    before["model"][layer] += 1.0  # a language model far from a fresh one
    torch.save(before, source)
    assert main(["--out", str(tmp_path / "b"), *common, "--steps", "2", "--init-from", str(source),
                 "--patch-rms", "1.0", "--patch-cosine", "16", "--follow-ups", "2", "--save-minutes", "0.0001",
                 "--stop-after-minutes", "0.0001"]) == 0  # fmt: skip
    after = torch.load(state_dir_for(tmp_path / "b") / "state.pt", weights_only=False)
    assert (after["stage"], after["step"]) == ("answer", 1)  # no encoder stage, one step then stopped
    assert after["settings"]["init_from"]["from"] == "answer:1" and after["settings"]["follow_ups"] == 2
    assert after["cpu_seconds"] > before["cpu_seconds"] and len(after["runs"]) == len(before["runs"]) + 1
    tower = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(after["model"][tower], before["model"][tower], atol=0.05)  # one small step from it
    from tokcomp.tiny.model import TEST_SPEC, build_image_processor, build_model, build_tokenizer

    tok = build_tokenizer()
    fresh = build_model(TEST_SPEC, tok).state_dict()[layer]
    assert torch.allclose(after["model"][layer], fresh, atol=0.05)  # fresh, one small step from its start
    model = build_model(TEST_SPEC, tok)
    adapter = LlavaOnevisionAdapter(model, tok, build_image_processor(TEST_SPEC), "t")
    seed_from_state(adapter, source, 0.5, log=lambda _: None)
    assert torch.equal(model.state_dict()[tower], before["model"][tower])
    units = [adapter.prepare_units(list(make_item("tc_shapes", "train", i).images), None) for i in range(12)]
    with torch.no_grad():
        ratio = rms(_encode_batch(adapter, units)[1]) / rms(model.get_input_embeddings().weight)
    assert 0.4 < float(ratio) < 0.6
    assert main(["--out", str(tmp_path / "c"), *common, "--init-from", str(tmp_path / "nothing.pt")]) == 2


def test_a_task_held_out_by_task_start_joins_the_rotation_at_its_step(tmp_path, capsys):
    """--task-start keeps a task out of the answer stage until its step, then it trains like the others."""
    from tokcomp.tiny.train import TASK_WEIGHTS, main, rotation_at

    late = {"tc_text": 5}
    assert "tc_text" not in rotation_at(4, TASK_WEIGHTS, late)
    assert sorted(rotation_at(5, TASK_WEIGHTS, late)) == sorted(rotation_at(0, TASK_WEIGHTS, {}))
    common = ["--test-config", "--batch-scale", "0.25", "--threads", "1", "--eval-items", "0", "--curve-every", "0",
              "--log-every", "1", "--encoder-steps", "1", "--task-weight", "tc_text=3"]  # fmt: skip
    assert main(["--out", str(tmp_path / "ckpt"), *common, "--steps", "6", "--task-start", "tc_text=3"]) == 0
    report = json.loads((tmp_path / "ckpt" / "training.json").read_text())
    trained = {h["step"]: h["loss"] for h in report["loss_history"] if h["stage"] == "answer"}
    assert not any("tc_text" in trained[step] for step in (1, 2, 3))  # history step k is answer step k - 1
    assert any("tc_text" in trained[step] for step in (4, 5, 6)) and report["task_start"] == {"tc_text": 3}
    everyone_late = [f"--task-start={task}=2" for task in TASK_WEIGHTS]
    assert main(["--out", str(tmp_path / "none"), *common, "--steps", "2", *everyone_late]) == 2
    assert "no task trains from answer step 0" in capsys.readouterr().err
