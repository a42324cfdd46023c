"""The ``tokcomp`` command line: thin wrappers that parse, call the library and print with rich."""

from __future__ import annotations

import functools
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokcomp.defaults import DEFAULT_FRAMES, DEFAULT_MAX_NEW_TOKENS
from tokcomp.errors import TokcompError
from tokcomp.methods.names import METHOD_NAMES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Training-free visual-token compression for vision-language models.",
)
console = Console(stderr=True)
out = Console(soft_wrap=True)


F = TypeVar("F", bound=Callable[..., None])
METHOD_HELP = (  # the command first, so that the help's wrapping never splits it
    "`tokcomp methods` lists them all with their settings. "
    f"A method ({' | '.join(METHOD_NAMES)}, or a+b) or a preset in configs/ (dymu-mid, dycoke, ...)."
)
DTYPE_HELP = (
    "auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16 | float16; a calibration is used in the "
    "dtype it was made in."
)
DEVICE_HELP = "auto (the first GPU if there is one, else the CPU) | cpu | cuda | cuda:N."
DEVICE_MAP_HELP = "Spread a model too large for one GPU over all GPUs (accelerate): auto | balanced | sequential."


# Exit codes: 0 success, 1 regression found (`regress`), 2 bad input or usage, 3 internal error (a bug).
EXIT_REGRESSION, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3


class StdoutError(Exception):
    """Writing standard output failed (a full disk, a closed pipe): not the command's own error."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


class _GuardedStdout:
    """``sys.stdout`` while a command runs: its write errors become :class:`StdoutError`, so they are told
    apart from the command's other OSErrors (and rich does not turn a broken pipe into exit 1)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise StdoutError(exc) from exc

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise StdoutError(exc) from exc

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _fail(message: str, code: int) -> typer.Exit:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return typer.Exit(code)


def _silence_stdout(stream) -> None:
    """After a failed write, send stdout to /dev/null so nothing is retried, not even at interpreter exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())  # the buffered leftovers of `stream` now flush quietly
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture buffer)
        pass
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the interpreter exits


def _stdout_failed(exc: StdoutError, real, code: int) -> typer.Exit:
    """The exit for a failed write to stdout: quietly ``code`` for a pipe closed early, else one line and 2."""
    _silence_stdout(real)
    if isinstance(exc.error, BrokenPipeError):  # output piped into `head` and friends
        return typer.Exit(code)
    return _fail(f"cannot write to standard output: {exc}", EXIT_USAGE)


def _exit_code(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    code = exc.exit_code if isinstance(exc, typer.Exit) else exc.code  # type: ignore[attr-defined]
    return code if isinstance(code, int) else (0 if code is None else 1)


def user_errors(command: F) -> F:
    """The exit-code contract: user errors become one line on stderr and exit 2, bugs one line and exit 3.

    Standard output is flushed here, so a full disk or a closed pipe is reported (exit 2) or, for a pipe
    closed by `head` and friends, ignored, instead of failing at interpreter exit.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        outer = sys.stdout
        real = outer._stream if isinstance(outer, _GuardedStdout) else outer
        sys.stdout = _GuardedStdout(real)
        leaving: BaseException | None = None
        try:
            try:
                result = command(*args, **kwargs)
            except (typer.Exit, SystemExit) as exc:
                leaving = exc
            sys.stdout.flush()
            if leaving is not None:
                raise leaving
            return result
        except StdoutError as exc:
            raise _stdout_failed(exc, real, _exit_code(leaving)) from None
        except (typer.Exit, SystemExit):
            raise
        except TokcompError as exc:
            raise _fail(str(exc), EXIT_USAGE) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get("TOKCOMP_DEBUG"):
                raise
            detail = _one_line(f"{type(exc).__name__}: {exc}")
            raise _fail(
                f"internal error ({detail}); this is a bug: set TOKCOMP_DEBUG=1 for the traceback", EXIT_INTERNAL
            ) from None
        finally:
            if isinstance(sys.stdout, _GuardedStdout):
                sys.stdout = outer
                try:  # after an error: what was printed before it, or quiet if stdout is gone too
                    real.flush()
                except (OSError, ValueError):
                    _silence_stdout(real)

    return wrapper  # type: ignore[return-value]


def _run_sharded(processes: int) -> None:
    """``--processes N``: the typed command runs in N worker processes and exits with their code here."""
    from tokcomp.distributed import launch_if_sharded

    code = launch_if_sharded(sys.argv[1:], processes)
    if code is not None:
        raise typer.Exit(code)


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


def _check_calibration(calib: Path | None) -> None:
    """A ``--calib`` file is read once up front (cheap), so a bad one is reported before the model loads."""
    if calib is not None:
        from tokcomp.config import Calibration

        Calibration.load(calib)


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
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    token_order: str = typer.Option("spatial", "--token-order", help="spatial | reference (DyMU's layout)."),
    processes: int = typer.Option(
        1, "--processes", help="Shard the batches over N local processes; thresholds are averaged over all."
    ),
) -> None:
    """Calibrate per-layer DToMe thresholds so the mean token count meets a budget."""
    from tokcomp.data.images import open_image_source
    from tokcomp.io import ensure_writable

    _check_budget_syntax(budget)
    if token_order not in ("spatial", "reference"):
        raise TokcompError(f"unknown token order '{token_order}' (spatial or reference)")
    ensure_writable(out_path, keep_folders=False)
    items = open_image_source(data)
    _run_sharded(processes)
    from tokcomp.calibrate import calibrate as run_calibration  # torch: only once the input is known good
    from tokcomp.calibrate import resolve_budget
    from tokcomp.distributed import join_world, leave_world
    from tokcomp.models.loading import load_vlm

    world, device = join_world(device)
    adapter = load_vlm(model, dtype=dtype, device=device, device_map=device_map)
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
    leave_world(world)
    if not world.is_main:  # every process holds the same thresholds; rank 0 writes them
        return
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
        f"target {result.target_tokens} of {result.num_patches} {adapter.merge_unit}; achieved mean {a.mean:.1f} "
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
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
) -> None:
    """Draw which patches DToMe merges for one image, and the tokens left after each layer."""
    from tokcomp.config import Calibration
    from tokcomp.data.images import open_image_source
    from tokcomp.io import ensure_writable

    if out_path.suffix.lower() != ".png":
        raise TokcompError(f"--out must be a .png file, got {out_path}")
    ensure_writable(out_path, keep_folders=False)
    calibration = Calibration.load(calib)
    items = open_image_source(image)
    if len(items) != 1:
        raise TokcompError(f"{image} is a folder of {len(items)} images; give one image")
    picture = items[0].load()
    from tokcomp.methods.dtome import ThresholdRule  # torch and matplotlib: only once the input is known good
    from tokcomp.models.loading import load_vlm
    from tokcomp.visualize import save_merge_figure

    adapter = load_vlm(model, dtype=dtype, device=device, device_map=device_map)
    calibration.check_compatible(adapter.num_layers, adapter.vision_weights_hash(), adapter.dtype_name, str(calib))
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
        unit=adapter.merge_unit,
    )
    counts = ", ".join(str(c) for c in encoded.layer_counts)
    out.print(
        f"{items[0].name}: {encoded.num_tokens} tokens of {adapter.num_patches} {adapter.merge_unit} at layer "
        f"{adapter.feature_layer} "
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
    method: str = typer.Option("none", "--method", help=METHOD_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction."),
    image: list[str] = typer.Option(None, "--image", "-i", help="Image file(s) or builtin:skimage/NAME."),
    video: str = typer.Option(None, "--video", help="Video file (mp4, ...) or a folder of frames."),
    frames: int = typer.Option(DEFAULT_FRAMES, "--frames", help="Frames sampled uniformly from the video."),
    calib: Path = typer.Option(None, "--calib", "-c", help="Calibration YAML (dymu, dtome)."),
    settings: list[str] = typer.Option(None, "--set", help="Method setting key=value (repeatable)."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", help="Tokens to generate (greedy)."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Load a VLM, attach a method, answer one prompt, and account for the visual tokens."""
    import json

    from tokcomp.data.images import open_image_source
    from tokcomp.data.video import load_video

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
    _check_calibration(calib)
    # torch and transformers only now: a missing or broken input is reported at once.
    from tokcomp.methods.registry import build_method, parse_sets
    from tokcomp.models.loading import load_vlm
    from tokcomp.pipeline import Pipeline, Request

    sets = parse_sets(settings)
    adapter = load_vlm(model, dtype=dtype, device=device, device_map=device_map)
    chosen = build_method(method, model, adapter.num_layers, str(calib) if calib else None, sets,
                          adapter.supports_encoder_merging)
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
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    input_spec: str = typer.Option("image", "--input", help="image | images:N | video:FRAMES"),
    calib: Path = typer.Option(None, "--calib", "-c", help="Calibration YAML (dymu, dtome)."),
    settings: list[str] = typer.Option(None, "--set", help="Method setting key=value (repeatable)."),
    repeat: int = typer.Option(3, "--repeat", help="Measured repetitions (after warm-up)."),
    warmup: int = typer.Option(1, "--warmup", help="Warm-up repetitions, not measured."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", help="Tokens generated per run."),
    llm_layers: int = typer.Option(None, "--llm-layers", help="Real shapes: keep only N decoder layers."),
    vision_layers: int = typer.Option(
        None, "--vision-layers", help="Real shapes: keep only N encoder layers (vision time is extrapolated)."
    ),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="CPU: measure peak RSS in fresh processes."),
    out_path: Path = typer.Option(None, "--out", "-o", help="Write the report as JSON."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Latency, memory, KV cache and FLOPs of a method against the plain model, in the same run."""
    from tokcomp.benchmark.bench import cpu_peaks, parse_input, run_bench, write_report
    from tokcomp.io import ensure_writable
    from tokcomp.methods.registry import build_method, parse_sets
    from tokcomp.models.loading import load_vlm

    parse_input(input_spec)
    if out_path is not None:
        ensure_writable(out_path, keep_folders=False)
    sets = parse_sets(settings)
    adapter = load_vlm(model, dtype=dtype, llm_layers=llm_layers, vision_layers=vision_layers, device=device)
    chosen = build_method(method, model, adapter.num_layers, str(calib) if calib else None, sets,
                          adapter.supports_encoder_merging)
    chosen.check(adapter)
    method_args = {"spec": method, "calib": str(calib) if calib else None, "sets": sets, "dtype": adapter.dtype_name}
    measure_memory = (
        (lambda: cpu_peaks(model, method_args, input_spec, llm_layers, max_new_tokens, vision_layers))
        if memory
        else None
    )
    with _progress() as progress:
        task = progress.add_task("benchmarking", total=warmup + repeat)
        report = run_bench(
            adapter, chosen, input_spec, repeat, warmup, max_new_tokens, measure_memory,
            on_step=lambda done, total: progress.update(task, completed=done),
        )  # fmt: skip
    report["command"] = shlex.join(["tokcomp", *sys.argv[1:]])
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


@app.command("bench-md")
@user_errors
def bench_md(
    reports: list[Path] = typer.Argument(None, help="JSON reports of `tokcomp bench`; each file's name is its case."),
    out_path: Path = typer.Option(None, "--out", "-o", help="Write the Markdown here (atomically), not to stdout."),
) -> None:
    """Write BENCHMARKS.md from `tokcomp bench` reports: machine, commands, medians, ratios, targets met."""
    from tokcomp.benchmark.benchmarks_md import write_benchmarks
    from tokcomp.io import ensure_writable

    if not reports:
        raise TokcompError("no reports given: pass the JSON files `tokcomp bench --out` wrote")
    if out_path is not None:
        ensure_writable(out_path, keep_folders=False)
    text = write_benchmarks(reports, out_path)
    if out_path is None:
        sys.stdout.write(text)
    else:
        console.print(f"wrote {out_path}")


@app.command("methods")
@user_errors
def methods_command(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """List every method with its settings and defaults, and every preset in configs/."""
    import json

    from tokcomp.methods.registry import method_catalog, preset_catalog

    catalog, presets = method_catalog(), preset_catalog()
    if as_json:
        payload = {
            "methods": {m.name: {"summary": m.summary, "settings": {
                s.name: {"type": s.kind, "default": s.default, **({"alias": s.alias} if s.alias else {})}
                for s in m.settings}} for m in catalog},
            "presets": {p.name: {"method": p.method, "settings": p.settings, "description": p.description}
                        for p in presets},
        }  # fmt: skip
        print(json.dumps(payload, default=str))
        return
    table = Table(title="methods (--method NAME, settings with --set key=value; a+b combines two)")
    for column in ("method", "what it does", "settings (default)"):
        table.add_column(column)
    for m in catalog:
        settings = ", ".join(f"{s.name}={s.default!r}" + (f" ({s.alias})" if s.alias else "")
                             for s in m.settings) or "—"  # fmt: skip
        table.add_row(m.name, m.summary, settings)
    _wide_out().print(table)
    table = Table(title="presets (--method NAME; configs/NAME.yaml)")
    for column in ("preset", "method", "settings", "description"):
        table.add_column(column)
    for p in presets:
        settings = ", ".join(f"{key}={value!r}" for key, value in p.settings.items()) or "—"
        table.add_row(p.name, p.method, settings, p.description)
    _wide_out().print(table)


EVAL_TASK_HELP = (
    "Task(s), comma-separated: tc_shapes, tc_text, tc_multi, tc_motion, tc_suites (all four), "
    "textvqa_val, mvbench, videomme or any other lmms-eval task."
)
DATA_FILES_HELP = (
    "Local documents for the task in its own schema: a parquet/json/jsonl/csv file, a save_to_disk folder, "
    "or for a group a folder of <subtask>.<ext> files."
)


@app.command("eval")
@user_errors
def eval_command(
    task: str = typer.Option(..., "--task", "-t", help=EVAL_TASK_HELP),
    model: str = typer.Option("tokcomp-tiny", "--model", "-m", help="Preset name or checkpoint path."),
    method: str = typer.Option("none", "--method", help=METHOD_HELP),
    calib: Path = typer.Option(None, "--calib", "-c", help="Calibration YAML (dymu, dtome)."),
    settings: list[str] = typer.Option(None, "--set", help="Method setting key=value (repeatable)."),
    limit: int = typer.Option(None, "--limit", help="Documents per task (default: all)."),
    out_dir: Path = typer.Option(None, "--out", help="Output folder (default results/eval/<model>/<method>)."),
    data_files: Path = typer.Option(None, "--data-files", help=DATA_FILES_HELP),
    batch_size: int = typer.Option(1, "--batch-size", help="Requests per forward (timings are shared in a batch)."),
    frames: int = typer.Option(DEFAULT_FRAMES, "--frames", help="Frames sampled from each video file."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show lmms-eval's own log lines and progress bars."),
    processes: int = typer.Option(
        1, "--processes", help="Shard the documents over N local processes (one GPU each on a GPU machine)."
    ),
    paired_timing: bool = typer.Option(
        False, "--paired-timing", help="Also time the plain model on every sample, interleaved (same-run speed ratios)."
    ),
    label: str = typer.Option(None, "--label", help="The run's name in reports (default: the --method value)."),
) -> None:
    """Evaluate a model with a method on lmms-eval tasks; write results.json and samples.jsonl."""
    if not verbose:  # tqdm reads this when it is imported, so before lmms-eval and datasets are
        os.environ.setdefault("TQDM_DISABLE", "1")
    from tokcomp.eval.tasks import precheck_data_files
    from tokcomp.io import ensure_writable_dir

    names = [t.strip() for t in task.split(",") if t.strip()]
    if not names:
        raise TokcompError("--task names no task")
    if batch_size < 1 or frames < 1:
        raise TokcompError("--batch-size and --frames must be at least 1")
    safe_model = Path(model).name if Path(model).exists() else model
    out_dir = out_dir or Path("results/eval") / safe_model / method.replace("/", "_")
    # Bad input is reported before torch, lmms-eval and the model load (seconds each).
    ensure_writable_dir(out_dir)
    precheck_data_files(names, data_files)
    _check_calibration(calib)
    _run_sharded(processes)
    from tokcomp.eval.runner import EvalRequest, run_eval
    from tokcomp.methods.registry import parse_sets

    request = EvalRequest(
        tasks=names, model=model, method=method, calib=str(calib) if calib else None, settings=parse_sets(settings),
        limit=limit, data_files=data_files, batch_size=batch_size, frames=frames, dtype=dtype, verbose=verbose,
        device=device, device_map=device_map, paired_timing=paired_timing, label=label,
    )  # fmt: skip
    results = run_eval(request, out_dir, log=lambda m: console.print(m))
    if not results:  # a worker of a multi-process run: rank 0 reports
        return
    table = Table(title=f"{model} · {method}")
    for column in ("task", "metric", "score", "visual tokens (mean / full)", "TTFT ms"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, entry in results["tasks"].items():
        tokens = entry.get("visual_tokens", {})
        share = f"{tokens['mean']:.1f} / {tokens['full']:.1f}" if tokens else "—"
        score = f"{100 * entry['score']:.1f}%" if entry["score"] is not None else "—"
        ttft = f"{entry['timings']['ttft_ms']:.1f}" if "timings" in entry else "—"
        table.add_row(name, str(entry["metric"]), score, share, ttft)
    out.print(table)
    console.print(f"wrote {out_dir / 'results.json'} and {out_dir / 'samples.jsonl'}")


def _wide_out() -> Console:
    """Stdout for wide tables: the terminal's width, or up to 200 columns when piped (CI logs, files)."""
    return out if out.is_terminal else Console(width=200, soft_wrap=True)


@app.command()
@user_errors
def report(
    results: list[Path] = typer.Argument(None, help="Run folders of `tokcomp eval` (or their results.json)."),
    fmt: str = typer.Option(None, "--format", "-f", help="table | md | csv | html (default: from --out, or table)."),
    plot: Path = typer.Option(None, "--plot", help="Also draw accuracy vs. visual tokens into this PNG."),
    out_path: Path = typer.Option(None, "--out", "-o", help="Write the md / csv / html report here, not to stdout."),
) -> None:
    """Runs side by side: accuracy, visual tokens and speed against the uncompressed run of each task."""
    from tokcomp.io import ensure_writable, write_all
    from tokcomp.results.report import build_table, mismatched_samples, render, resolve_format, rich_table, save_plot
    from tokcomp.results.runs import load_run

    if not results:
        raise TokcompError("no results given: pass one or more `tokcomp eval` output folders")
    chosen = resolve_format(fmt, out_path)
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise TokcompError(f"--plot must be a .png file, got {plot}")
        ensure_writable(plot, keep_folders=False)
    if out_path is not None:
        ensure_writable(out_path, keep_folders=False)
    table = build_table([load_run(path) for path in results])
    for note in mismatched_samples(table):
        console.print(f"[yellow]warning: {escape(note)}[/]", soft_wrap=True)
    # Status lines go to stderr whenever stdout carries the document itself.
    status = console if chosen != "table" and out_path is None else out
    if chosen == "table":
        _wide_out().print(rich_table(table))
    elif out_path is None:
        sys.stdout.write(render(table, chosen))
        sys.stdout.flush()
    outputs = []  # the document and the plot are written all or none
    if out_path is not None:
        document = render(table, chosen)
        outputs.append((out_path, lambda tmp: tmp.write_text(document, encoding="utf-8")))
    if plot is not None:
        outputs.append((plot, lambda tmp: save_plot(table, tmp)))
    write_all(outputs)
    for path, _ in outputs:
        status.print(f"wrote {path}")


@app.command()
@user_errors
def regress(
    baseline: Path = typer.Option(..., "--baseline", help="The reference `tokcomp eval` run folder."),
    current: Path = typer.Option(..., "--current", help="The run folder to check against it."),
    tolerances: Path = typer.Option(
        None, "--tolerances", help="Tolerance YAML (default: configs/regress-tolerances.yaml)."
    ),
) -> None:
    """Fail (exit 1) when a run lost accuracy, gained visual tokens or flipped samples against a baseline."""
    from tokcomp.results.regress import print_comparison
    from tokcomp.results.regress import regress as compare

    comparison = compare(baseline, current, tolerances)
    code = 0 if comparison.passed else 1
    try:
        print_comparison(comparison, _wide_out())
    except StdoutError as exc:  # piped into `head`: the verdict, not the pipe, decides the exit code
        if not isinstance(exc.error, BrokenPipeError):
            raise
    raise typer.Exit(code)


_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("make-tasks", context_settings=_FORWARD)
@user_errors
def make_tasks(ctx: typer.Context) -> None:
    """Write the built-in task suites' eval splits (tc_shapes, tc_text, tc_multi, tc_motion) as parquet.

    Options (see `tokcomp make-tasks --help`): --out DIR, --num-items N, --seed S, --tasks ..., --mp4."""
    from tokcomp.data.tasks import main as tasks_main

    raise typer.Exit(tasks_main(ctx.args))


@app.command("train-tiny", context_settings=_FORWARD)
@user_errors
def train_tiny(ctx: typer.Context) -> None:
    """Train tokcomp-tiny from scratch on the built-in task generators (CPU; see `--help`)."""
    from tokcomp.tiny.train import main as train_main

    raise typer.Exit(train_main(ctx.args))


def main() -> None:
    """Console entry point; stdout failing outside a command (``--help``) is handled as in one."""
    real = sys.stdout
    sys.stdout = _GuardedStdout(real)
    try:
        app()
    except StdoutError as exc:
        raise SystemExit(_stdout_failed(exc, real, 0).exit_code) from None
    finally:
        if isinstance(sys.stdout, _GuardedStdout):
            sys.stdout = real


if __name__ == "__main__":
    main()
