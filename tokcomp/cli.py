"""The ``tokcomp`` command line: thin wrappers that parse, call the library and print with rich."""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokcomp.errors import TokcompError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Training-free visual-token compression for vision-language models.",
)
console = Console(stderr=True)
out = Console(soft_wrap=True)


F = TypeVar("F", bound=Callable[..., None])


def user_errors(command: F) -> F:
    """User errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except TokcompError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # output piped into `head` and friends
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter shutdown quiet
            raise typer.Exit(0) from None
        except Exception as exc:
            if os.environ.get("TOKCOMP_DEBUG"):
                raise
            print(
                f"error: internal error ({type(exc).__name__}: {exc}); set TOKCOMP_DEBUG=1 for details", file=sys.stderr
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _progress() -> Progress:
    """A progress bar on stderr that clears itself, so an error that follows stays a single line."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _check_budget_syntax(budget: str) -> None:
    if budget.strip().lower() not in ("low", "mid", "high") and not budget.strip().isdigit():
        raise TokcompError(f"unknown budget '{budget}': use low, mid, high or a token count")


@app.command()
@user_errors
def calibrate(
    model: str = typer.Option(..., "--model", "-m", help="Preset name (tiny-llava, tiny-llava-ov) or checkpoint path."),
    budget: str = typer.Option(..., "--budget", "-b", help="low | mid | high | <mean tokens per image>."),
    data: str = typer.Option(
        ..., "--data", "-d", help="Image folder, image file, hf:NAME[:SPLIT[:COLUMN]] or builtin:skimage."
    ),
    out_path: Path = typer.Option(..., "--out", "-o", help="Where to write the calibration YAML."),
    num_images: int = typer.Option(None, "--num-images", "-n", help="Use at most N images (after shuffling)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per calibration batch (B in B*r_i)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the image order."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32 | bfloat16 | float16."),
    token_order: str = typer.Option("spatial", "--token-order", help="spatial | reference (DyMU's layout)."),
) -> None:
    """Calibrate per-layer DToMe thresholds so the mean token count meets a budget."""
    from tokcomp.calibrate import calibrate as run_calibration
    from tokcomp.calibrate import resolve_budget
    from tokcomp.data.images import open_image_source
    from tokcomp.io import ensure_writable
    from tokcomp.models.loading import load_vlm

    _check_budget_syntax(budget)
    if token_order not in ("spatial", "reference"):
        raise TokcompError(f"unknown token order '{token_order}' (spatial or reference)")
    ensure_writable(out_path)
    items = open_image_source(data)
    adapter = load_vlm(model, dtype=dtype)
    target = resolve_budget(budget, adapter.num_patches)
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_step(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done)

        result = run_calibration(
            adapter,
            items,
            target,
            data_source=data,
            batch_size=batch_size,
            seed=seed,
            num_images=num_images,
            token_order=token_order,
            on_step=on_step,
        )
    result.save(out_path)
    table = Table(title=f"{model}: budget {result.budget}", show_header=True)
    for column in ("layer", "r", "threshold"):
        table.add_column(column, justify="right")
    for i, (r, tau) in enumerate(zip(result.r_per_layer, result.thresholds, strict=True)):
        table.add_row(str(i), str(r), "inf" if math.isinf(tau) else f"{tau:.4f}")
    out.print(table)
    a = result.achieved
    off = 100 * (a.mean - result.target_tokens) / result.target_tokens
    out.print(
        f"target {result.target_tokens} of {result.num_patches} patch tokens; achieved mean {a.mean:.1f} "
        f"± {a.std:.1f} (min {a.min}, max {a.max}; {off:+.1f}% vs target) over {result.num_images} images"
    )
    if abs(off) > 10:
        console.print("[yellow]warning: achieved mean is more than 10% from the target; use more images[/]")
    out.print(f"wrote {out_path}")


@app.command("inspect")
@user_errors
def inspect_cmd(
    image: str = typer.Argument(..., help="An image file or builtin:skimage/NAME."),
    model: str = typer.Option(..., "--model", "-m", help="Preset name or checkpoint path."),
    calib: Path = typer.Option(..., "--calib", "-c", help="Calibration YAML from `tokcomp calibrate`."),
    out_path: Path = typer.Option(..., "--out", "-o", help="PNG to write."),
) -> None:
    """Draw which patches DToMe merges for one image, and the tokens left after each layer."""
    from tokcomp.config import Calibration
    from tokcomp.data.images import open_image_source
    from tokcomp.io import ensure_writable
    from tokcomp.methods.dtome import ThresholdRule
    from tokcomp.models.loading import load_vlm
    from tokcomp.visualize import save_merge_figure

    if out_path.suffix.lower() != ".png":
        raise TokcompError(f"--out must be a .png file, got {out_path}")
    ensure_writable(out_path)
    calibration = Calibration.load(calib)
    items = open_image_source(image)
    if len(items) != 1:
        raise TokcompError(f"{image} is a folder of {len(items)} images; give one image")
    picture = items[0].load()
    adapter = load_vlm(model)
    calibration.check_compatible(adapter.num_layers, adapter.vision_weights_hash(), str(calib))
    pixels = adapter.encoder_views([picture])
    encoded = adapter.encode(pixels, ThresholdRule(calibration.thresholds), token_order=calibration.token_order)[0]
    source = encoded.source.numpy()
    if adapter.drops_cls is False and adapter.has_cls:
        source = source - 1
    save_merge_figure(
        out_path,
        adapter.view_image(picture),
        source,
        adapter.grid,
        encoded.layer_counts,
        adapter.feature_layer,
        f"{items[0].name} · {model} · budget {calibration.budget}",
    )
    counts = ", ".join(str(c) for c in encoded.layer_counts)
    out.print(
        f"{items[0].name}: {encoded.num_tokens} tokens of {adapter.num_patches} at layer {adapter.feature_layer} "
        f"(after each layer: {counts})"
    )
    out.print(f"wrote {out_path}")


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def apply(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="Preset name or checkpoint path."),
    method: str = typer.Option("none", "--method", help="none | dymu | dtome | tome, or a preset in configs/."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction."),
    image: list[str] = typer.Option(None, "--image", "-i", help="Image file(s) or builtin:skimage/NAME."),
    video: str = typer.Option(None, "--video", help="Video file (mp4, ...) or a folder of frames."),
    frames: int = typer.Option(8, "--frames", help="Frames sampled uniformly from the video."),
    calib: Path = typer.Option(None, "--calib", "-c", help="Calibration YAML (dymu, dtome)."),
    settings: list[str] = typer.Option(None, "--set", help="Method setting key=value (repeatable)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate (greedy)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Load a VLM, attach a method, answer one prompt, and account for the visual tokens."""
    import json

    from tokcomp.data.images import open_image_source
    from tokcomp.data.video import load_video
    from tokcomp.methods.registry import build_method, parse_sets
    from tokcomp.models.loading import load_vlm
    from tokcomp.pipeline import Pipeline, Request

    images_spec = list(image or [])
    if ctx.args:
        if not images_spec:
            raise TokcompError(f"unexpected arguments: {' '.join(ctx.args)}")
        images_spec.extend(ctx.args)  # --image a.png b.png
    if not images_spec and not video:
        raise TokcompError("give --image PATH [PATH ...] or --video PATH")
    pictures = []
    for spec in images_spec:
        items = open_image_source(spec)
        if len(items) != 1:
            raise TokcompError(f"{spec} holds {len(items)} images; pass image files")
        pictures.append(items[0].load())
    clip = load_video(video, frames) if video else None
    sets = parse_sets(settings)
    adapter = load_vlm(model)
    chosen = build_method(method, model, adapter.num_layers, str(calib) if calib else None, sets)
    with chosen(adapter):
        result = Pipeline(adapter, chosen).generate([Request(prompt, pictures, clip)], max_new_tokens)[0]
    payload = {"model": model, **result.to_dict(), "method": chosen.settings()}
    if as_json:
        print(json.dumps(payload, default=str))
        return
    out.print(f"[bold]{result.answer or '(empty answer)'}[/]")
    acc = result.account
    share = 100 * acc.visual_kept / acc.visual_full if acc.visual_full else 100.0
    rows = [
        ("method", chosen.name),
        ("visual tokens (full → kept)", f"{acc.visual_full} → {acc.visual_kept} ({share:.1f}%)"),
        ("LLM prompt length (full → kept)", f"{acc.prompt_tokens_full} → {acc.prompt_tokens_kept}"),
    ]
    for i, unit in enumerate(acc.per_image):
        rows.append((f"{unit['kind']} {i}", f"{unit['full']} → {unit['kept']}"))
    if acc.visual_positions != acc.visual_kept:
        rows.append(("visual positions in the LLM (VTU)", str(acc.visual_positions)))
    if acc.per_layer:
        rows.append(("encoder tokens per layer", ", ".join(map(str, acc.per_layer))))
    rows.append(("visual keys attended per decode step", f"{acc.decode_visual_attended:.1f}"))
    rows.append(("KV cache at the end", f"{acc.kv_bytes / 1024:.1f} KiB"))
    for method_name, numbers in acc.methods.items():
        for key, value in numbers.items():
            rows.append((f"{method_name}: {key.replace('_', ' ')}", str(value)))
    for key, value in result.timings_ms.items():
        rows.append((f"{key} (ms)", f"{value:.1f}"))
    out.print(_table("token account", rows))


@app.command()
@user_errors
def bench(
    model: str = typer.Option(
        ..., "--model", "-m", help="Preset, checkpoint path, or a real shape (llava-1.5-7b-shape)."
    ),
    method: str = typer.Option(..., "--method", help="Method or preset to compare with the plain model."),
    input_spec: str = typer.Option("image", "--input", help="image | images:N | video:FRAMES"),
    calib: Path = typer.Option(None, "--calib", "-c", help="Calibration YAML (dymu, dtome)."),
    settings: list[str] = typer.Option(None, "--set", help="Method setting key=value (repeatable)."),
    repeat: int = typer.Option(3, "--repeat", help="Measured repetitions (after warm-up)."),
    warmup: int = typer.Option(1, "--warmup", help="Warm-up repetitions, not measured."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", help="Tokens generated per run."),
    llm_layers: int = typer.Option(None, "--llm-layers", help="Real shapes: keep only N decoder layers."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="CPU: measure peak RSS in fresh processes."),
    out_path: Path = typer.Option(None, "--out", "-o", help="Write the report as JSON."),
) -> None:
    """Latency, memory, KV cache and FLOPs of a method against the plain model, in the same run."""
    from tokcomp.bench import cpu_peaks, parse_input, run_bench, write_report
    from tokcomp.io import ensure_writable
    from tokcomp.methods.registry import build_method, parse_sets
    from tokcomp.models.loading import load_vlm

    parse_input(input_spec)
    if out_path is not None:
        ensure_writable(out_path)
    sets = parse_sets(settings)
    adapter = load_vlm(model, llm_layers=llm_layers)
    chosen = build_method(method, model, adapter.num_layers, str(calib) if calib else None, sets)
    chosen.check(adapter)
    method_args = {"spec": method, "calib": str(calib) if calib else None, "sets": sets}
    measure_memory = (lambda: cpu_peaks(model, method_args, input_spec, llm_layers, max_new_tokens)) if memory else None
    with _progress() as progress:
        task = progress.add_task("benchmarking", total=warmup + repeat)
        report = run_bench(
            adapter, chosen, input_spec, repeat, warmup, max_new_tokens, measure_memory,
            on_step=lambda done, total: progress.update(task, completed=done),
        )  # fmt: skip
    table = Table(title=f"{model} · {report['method']['method']} · {report['input']} · {report['machine']}")
    for column in ("metric", "full", "method", "ratio", "note"):
        table.add_column(column, justify="left" if column in ("metric", "note") else "right")
    for name, m in report["metrics"].items():
        ratio = "" if m["ratio"] is None else f"{m['ratio']:.3f}x"
        table.add_row(name, f"{m['full']:.4g}", f"{m['method']:.4g}", ratio, m.get("note", ""))
    out.print(table)
    if out_path is not None:
        write_report(report, out_path)
        out.print(f"wrote {out_path}")


_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("make-tasks", context_settings=_FORWARD)
@user_errors
def make_tasks(ctx: typer.Context) -> None:
    """Write the built-in task suites' eval splits (tc_shapes, tc_text, tc_multi, tc_motion) as parquet.

    Options (see `tokcomp make-tasks --help`): --out DIR, --num-items N, --seed S, --tasks ..., --mp4."""
    from tokcomp.tiny.tasks import main as tasks_main

    raise typer.Exit(tasks_main(ctx.args))


@app.command("train-tiny", context_settings=_FORWARD)
@user_errors
def train_tiny(ctx: typer.Context) -> None:
    """Train tokcomp-tiny from scratch on the built-in task generators (CPU; see `--help`)."""
    from tokcomp.tiny.train import main as train_main

    raise typer.Exit(train_main(ctx.args))


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
