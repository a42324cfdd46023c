"""tokcomp-tiny's training curve (PNG) and model card (README.md), both from its training.json."""

from __future__ import annotations

from pathlib import Path

from tokcomp.data.tasks import TASKS


def plot_curve(report: dict, path: str | Path) -> Path:
    """Answer loss per task and validation accuracy per task against answer-stage steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    answer = [h for h in report["loss_history"] if h["stage"] == "answer"]
    for task in TASKS:
        points = [(h["step"], h["loss"][task]) for h in answer if task in h["loss"]]
        if points:
            loss_ax.plot(*zip(*points, strict=True), label=task, linewidth=1)
        curve = [(c["step"], 100 * c["accuracy"][task]) for c in report.get("curve", [])]
        if curve:
            acc_ax.plot(*zip(*curve, strict=True), marker="o", label=task)
    loss_ax.set(xlabel="answer-stage step", ylabel="answer cross-entropy", yscale="log", title="training loss")
    acc_ax.set(xlabel="answer-stage step", ylabel="accuracy (%)", ylim=(0, 100), title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _stage_one(report: dict) -> str:
    """How the encoder learnt to see: its own stage, or taken from an earlier run."""
    what = ("to place each\n  patch near the word embeddings of what it shows (colour, shape, letter, its place in "
            "the string,\n  count, which half of the picture)")  # fmt: skip
    source = report.get("init_from")
    if not source:
        return f"{report['encoder_steps']} steps training the encoder and projector alone {what}."
    scaled = source.get("projector_scaled_by")
    rescale = (f" Its projector's output was then scaled by {scaled:g}, to {report['patch_rms']:g} times the word "
               "embeddings' RMS: visual tokens far larger than the words leave the language model no room to "
               "write into their positions." if scaled else "")  # fmt: skip
    return (f"the vision tower, projector, image newline and word embeddings come from an earlier run\n"
            f"  (state {source['state']}, sha256 {source['sha256']}, at {source['from']}), which trained them {what}\n"
            f"  and then the whole model; its language model was discarded and this one started afresh.{rescale}"
            f" Its time is counted below.")  # fmt: skip


def _follow_ups(report: dict) -> str:
    extra = report.get("follow_ups", 0)
    if not extra:
        return ""
    return (f"; tc_shapes and tc_multi scenes are asked up to {extra} more questions in the same conversation, "
            "every answer trained: many lookups per encoded scene")


def write_model_card(report: dict, path: str | Path) -> Path:
    """The model card: what the model is, what it sees and cannot, how it was trained, its numbers."""
    spec = report["spec"]
    vision, text = spec["vision"], spec["text"]
    rows = []
    for task, result in report.get("eval", {}).items():
        kinds = ", ".join(f"{k} {100 * v:.0f}" for k, v in result["per_kind"].items())
        accuracy, guess = 100 * result["accuracy"], 100 * result["random_guess"]
        rows.append(f"| {task} | {result['items']} | {accuracy:.1f} | {guess:.1f} | {kinds} |")
    runs = "\n".join(
        f"- {r['from']} → {r['to']}: {r['machine']} ({_hours(r['wall_seconds'])} wall)"
        for r in report.get("runs", [])
        if "wall_seconds" in r
    )
    text_md = f"""# tokcomp-tiny

A stock `LlavaOnevisionForConditionalGeneration` (SigLIP vision tower + Qwen2 language model) of
{report['parameters'] / 1e6:.1f} M parameters, trained from scratch on CPU on tokcomp's four built-in
synthetic suites, so that every compression method has a model that really looks at the pictures,
on any machine, with no download. Built by `tokcomp train-tiny`; not a general-purpose model.

## What it is

- Vision: {vision['num_hidden_layers']} layers, width {vision['hidden_size']}, {vision['num_attention_heads']} heads,
  {vision['image_size']} px images in {vision['patch_size']} px patches
  ({(vision['image_size'] // vision['patch_size']) ** 2} patch tokens per view). AnyRes with one
  pinpoint (a lone image is its base view plus one crop); video frames pooled 2×2.
- Language model: {text['num_hidden_layers']} layers, width {text['hidden_size']},
  {text['num_attention_heads']} heads, a word-level vocabulary of the suites' words.
- Its chat template is LLaVA's: `USER: <image>\n<question> ASSISTANT:` (multi-image:
  `first <image> second <image> <question>`).

## What it sees, and what it cannot

- Flat-coloured shapes (circle, square, triangle, cross, diamond) in six colours, one object per
  14 px cell on flat or textured backgrounds; 3–5 capital letters in PIL's default font; which of
  2–4 images shows what; motion, appearance and order across 8–16 frames.
- Nothing else: no natural images, no words outside the suites' vocabulary, no objects that span
  several cells. Its answers to photographs are meaningless.

## How it was trained

- Stage 1: {_stage_one(report)}
- Stage 2: {report['steps']} steps on the answers (cross-entropy on the answer and EOS{_follow_ups(report)}), with the
  per-patch loss kept at weight {report['patch_weight']} and an evidence loss at weight
  {report.get('evidence_weight', 0)}: minus the log of the attention mass that each answer step pays, in
  language-model layer {report.get('evidence_layer')} (the first half of its heads), to the visual tokens that hold
  its answer (the patches of the object asked about, the letter to write next, the frames where the
  object is). Training signal only: at inference the model is a stock one with stock attention.
  AdamW, peak learning rate {report['lr']},
  {report['warmup']} warm-up steps, cosine decay to a tenth; batches per task {report['batch_sizes']}.
- Items seen: {report['items_seen']} (each drawn from its own seeded generator; the train, val and
  eval splits never share a stream).
- Time: {_hours(report['train_seconds'])} wall, {_hours(report['cpu_seconds'])} CPU, torch {report['torch']},
  over these runs (resumable with `tokcomp train-tiny --resume`):
{runs}

![training curve](training-curve.png)

## Numbers (uncompressed, greedy, first eval documents of each suite)

| suite | documents | accuracy (%) | random guess (%) | per question type (%) |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    path = Path(path)
    path.write_text(text_md)
    return path
