"""Replace a generated block of a Markdown file (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``).

Used by ``make readme-results`` to put ``tokcomp report``'s Markdown table into the README::

    python -m tokcomp.results.readme_block README.md results-table results/tokcomp-tiny/report.md
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tokcomp.errors import TokcompError
from tokcomp.io import atomic_write_text


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with the block ``name`` holding ``content`` (the markers stay)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise TokcompError(f"expected one '{start}' followed by one '{end}'")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m tokcomp.results.readme_block FILE.md BLOCK CONTENT_FILE", file=sys.stderr)
        return 2
    target, name, source = Path(args[0]), args[1], Path(args[2])
    try:
        for path in (target, source):
            if not path.is_file():
                raise TokcompError(f"{path} does not exist")
        atomic_write_text(target, replace_block(target.read_text(), name, source.read_text()))
    except TokcompError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
