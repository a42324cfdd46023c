"""Task names to lmms-eval task configs: built-in suites, stock tasks, and ``--data-files`` overrides.

``--data-files`` keeps a stock task's definition (prompts, scoring, generation settings) and only
swaps where its documents come from: a parquet/json/jsonl/csv file, or a folder written by
``datasets.save_to_disk``. For a group (``mvbench``) it is a folder with one file per subtask, named
after the subtask (``mvbench_action_sequence.json``); subtasks without a file are left out.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from tokcomp.data.tasks import TASKS as SUITES
from tokcomp.errors import TokcompError
from tokcomp.eval.documents import check_documents

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SUITE_GROUP = "tc_suites"
DATA_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
# dataset_kwargs entries that only concern downloading from the hub.
HUB_ONLY_KWARGS = ("token", "revision", "create_link", "force_download", "force_unzip", "From_YouTube")


@dataclass
class TaskPlan:
    """What ``simple_evaluate`` gets for one requested name, and the leaf tasks it stands for."""

    name: str
    configs: list  # task names or config dicts
    leaves: list[str]


def task_manager(names: list[str] | None = None):
    """lmms-eval's task index: tokcomp's suites, plus lmms-eval's own tasks unless only suites are asked for."""
    from lmms_eval.tasks import TaskManager

    only_suites = names is not None and set(names) <= {*SUITES, SUITE_GROUP}
    return TaskManager(verbosity="ERROR", include_path=str(TASKS_DIR), include_defaults=not only_suites)


def suites_data_dir() -> Path:
    """Where the suites' eval files live (``$TOKCOMP_TASKS_DIR``, default ``data/tasks``)."""
    return Path(os.environ.get("TOKCOMP_TASKS_DIR", "data/tasks")).resolve()


def ensure_suite_files(names: list[str], data_dir: Path, log=print) -> None:
    """Write the suites' eval files when missing or made by an older generator (same bytes every time)."""
    import json

    from tokcomp.data.tasks import GENERATOR_VERSION, write_eval_splits

    index_path = data_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}

    def current(name: str) -> bool:
        entry = index.get(name, {})
        return entry.get("generator_version") == GENERATOR_VERSION and (data_dir / name / "eval.parquet").exists()

    missing = [n for n in names if not current(n)]
    if missing:
        log(f"writing eval files for {', '.join(missing)} into {data_dir} (tokcomp make-tasks)")
        write_eval_splits(data_dir, tasks=missing)


def _unknown(name: str, manager) -> TokcompError:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return TokcompError(f"unknown task '{name}'{hint}; `lmms-eval tasks` lists them, tokcomp adds {', '.join(SUITES)}")


def _data_override(config: dict, path: Path) -> dict:
    """Keys that point a task config at a local file or folder of the same schema."""
    kwargs = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k not in HUB_ONLY_KWARGS}
    split = config.get("test_split") or "test"
    if path.is_dir():
        if not (path / "dataset_dict.json").exists() and not (path / "dataset_info.json").exists():
            raise TokcompError(f"{path} is a folder but not one written by datasets' save_to_disk")
        return {"dataset_path": str(path), "dataset_name": None, "dataset_kwargs": {**kwargs, "load_from_disk": True}}
    builder = DATA_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise TokcompError(f"{path}: data files must be {', '.join(DATA_BUILDERS)} or a save_to_disk folder")
    return {
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {**kwargs, "data_files": {split: str(path)}},
    }


def _check_media(config: dict, name: str) -> None:
    """Video tasks read their clips from ``$HF_HOME/<cache_dir>``; without it lmms-eval would download."""
    kwargs = config.get("dataset_kwargs") or {}
    if kwargs.get("video") and kwargs.get("cache_dir"):
        home = Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))
        media = Path(kwargs["cache_dir"]) if os.path.isabs(kwargs["cache_dir"]) else home / kwargs["cache_dir"]
        if not media.is_dir():
            raise TokcompError(f"{name} reads its videos from {media}, which does not exist (set HF_HOME)")


def _leaf_config(manager, name: str, data_path: Path | None, suites_dir: Path) -> dict | str:
    config = manager._get_config(name)
    if name in SUITES:
        path = data_path or suites_dir / name / "eval.parquet"
        override = _data_override(config, path)
        if data_path is not None:  # the default files are written (and rewritten) by ensure_suite_files
            _check_suite_documents(data_path, config, name)
        return {"task": name, **override}
    if data_path is None:
        return name
    _check_media(config, name)
    override = _data_override(config, data_path)
    check_documents(data_path, config, name)
    return {"task": name, **override}


def _check_suite_documents(path: Path, config: dict, name: str) -> None:
    from tokcomp.eval.suites import DOC_COLUMNS, VISUAL_COLUMNS

    check_documents(path, config, name, columns=(*DOC_COLUMNS, VISUAL_COLUMNS), hooks=True)


def precheck_data_files(names: list[str], data_files: Path | None) -> None:
    """The checks of ``plan_tasks`` that need no lmms-eval (seconds to import): a suite's ``--data-files``."""
    if data_files is None:
        return
    if not data_files.exists():
        raise TokcompError(f"--data-files {data_files} does not exist")
    if len(names) != 1 or names[0] not in SUITES:
        return
    from tokcomp.eval import suites

    # What tasks/tc_*.yaml say; plan_tasks checks again against the configs lmms-eval reads.
    config = {"test_split": "test", "doc_to_visual": suites.doc_to_visual, "doc_to_text": suites.doc_to_text}
    _data_override(config, data_files)
    _check_suite_documents(data_files, config, names[0])


def plan_tasks(names: list[str], data_files: Path | None = None, suites_dir: Path | None = None, manager=None):
    """Configs for ``simple_evaluate`` for the requested names (tasks, groups, or ``tc_suites``)."""
    manager = manager or task_manager(names)
    suites_dir = suites_dir or suites_data_dir()
    if data_files is not None and not data_files.exists():
        raise TokcompError(f"--data-files {data_files} does not exist")
    if data_files is not None and len(names) > 1:
        raise TokcompError("--data-files goes with exactly one task")
    plans = []
    for name in names:
        if name not in manager.all_tasks:
            raise _unknown(name, manager)
        if manager._name_is_task(name):
            plans.append(TaskPlan(name, [_leaf_config(manager, name, data_files, suites_dir)], [name]))
            continue
        leaves = list(SUITES) if name == SUITE_GROUP else _expand(manager, name)
        if data_files is None:
            configs = (
                [_leaf_config(manager, leaf, None, suites_dir) for leaf in leaves] if name == SUITE_GROUP else [name]
            )
            plans.append(TaskPlan(name, configs, leaves))
            continue
        if not data_files.is_dir():
            raise TokcompError(f"{name} is a group: --data-files must be a folder with one file per subtask")
        chosen = {leaf: _subtask_file(data_files, leaf) for leaf in leaves}
        chosen = {leaf: path for leaf, path in chosen.items() if path is not None}
        if not chosen:
            raise TokcompError(f"{data_files} has no file named after a subtask of {name} (e.g. {leaves[0]}.json)")
        plans.append(
            TaskPlan(
                name, [_leaf_config(manager, leaf, path, suites_dir) for leaf, path in chosen.items()], list(chosen)
            )
        )
    return plans


def _expand(manager, name: str) -> list[str]:
    """Leaf tasks of a group or tag, depth first."""
    out = []
    listed = manager._get_tasklist(name)
    for sub in listed if listed != -1 else _group_tasks(manager, name):
        sub_name = sub if isinstance(sub, str) else sub.get("task")
        out += [sub_name] if manager._name_is_task(sub_name) else _expand(manager, sub_name)
    return out


def _group_tasks(manager, name: str) -> list:
    config = manager._get_config(name)
    tasks = config.get("task", [])
    return tasks if isinstance(tasks, list) else [tasks]


def _subtask_file(folder: Path, leaf: str) -> Path | None:
    for suffix in (*DATA_BUILDERS, ""):
        candidate = folder / f"{leaf}{suffix}"
        if candidate.exists() and (suffix or candidate.is_dir()):
            return candidate
    return None
