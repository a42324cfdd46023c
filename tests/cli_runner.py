"""Running the ``tokcomp`` command in-process, as the CLI tests do."""

from __future__ import annotations

import sys

import pytest

from tokcomp.cli import main


def run_tokcomp(argv: list[str], capsys) -> tuple[int, str, str]:
    """``tokcomp ARGV...``: (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["tokcomp", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
