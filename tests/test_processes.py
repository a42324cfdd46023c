"""`tokcomp eval --processes N`: documents sharded over N processes (gloo on the CPU), the same rows as one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_tokcomp

from tokcomp.distributed import World, current_world, gather_dicts
from tokcomp.errors import TokcompError


def _rows(run: Path) -> dict:
    rows = {}
    for line in (run / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("timings")  # measured, so never equal
        rows[row["task"], row["doc_id"]] = row
    return rows


def test_two_processes_give_exactly_the_rows_of_one(suites_dir, tmp_path, capsys):
    argv = ["eval", "--task", "tc_text", "--method", "dymu-mid", "--limit", "5"]  # 5 documents: shards of 3 and 2
    code, _, err = run_tokcomp([*argv, "--out", str(tmp_path / "one")], capsys)
    assert code == 0, err
    code, _, err = run_tokcomp([*argv, "--out", str(tmp_path / "two"), "--processes", "2"], capsys)
    assert code == 0, err
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == 5 and one == two
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["processes"] == 2 and results["tasks"]["tc_text"]["samples"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one folder each, no leftovers


def test_a_bad_input_in_a_multi_process_run_is_one_line(suites_dir, tmp_path, capfd):
    # capfd: rank 0 writes to the real stderr, which it inherits
    code, _, err = run_tokcomp(["eval", "--task", "tc_shapes", "--limit", "2", "--method", "no-such-method",
                                "--out", str(tmp_path / "x"), "--processes", "2"], capfd)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "unknown method 'no-such-method'" in err, err
    assert not (tmp_path / "x").exists()


def test_the_world_comes_from_the_launcher_environment(monkeypatch):
    assert current_world() == World()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = current_world()
    assert (world.rank, world.size, world.is_main) == (1, 3, False)
    assert gather_dicts({"a": 1}, World()) == {"a": 1}


def test_calibrating_over_two_processes_gives_the_thresholds_of_one(tmp_path, capsys):
    import yaml

    argv = ["calibrate", "--model", "tiny-llava", "--budget", "mid", "--data", "builtin:skimage", "--num-images",
            "9", "--batch-size", "4"]  # fmt: skip
    for n in (1, 2):
        code, _, err = run_tokcomp([*argv, "--out", str(tmp_path / f"{n}.yaml"), "--processes", str(n)], capsys)
        assert code == 0, err
    one, two = (yaml.safe_load((tmp_path / f"{n}.yaml").read_text()) for n in (1, 2))
    assert one["thresholds"] == two["thresholds"] and one["achieved"] == two["achieved"]
    assert one["num_images"] == two["num_images"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.yaml", "2.yaml"]


def test_only_rank_0_probes_the_output_folder(monkeypatch, tmp_path):
    # Every rank runs the command's checks; two probing one new folder raced (one removed it under the other).
    from tokcomp.io import ensure_writable_dir

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ensure_writable_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(TokcompError, match="is a file"):
        ensure_writable_dir(tmp_path / "taken")
