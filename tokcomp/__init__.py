"""tokcomp: training-free visual-token compression for stock Hugging Face VLMs.

``tokcomp.method(name, **settings)`` gives a method to attach to a stock model (see tokcomp.api).
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("method", "MethodHandle"):  # imported on first use: `import tokcomp` stays light for the CLI
        from tokcomp import api

        return getattr(api, name)
    raise AttributeError(f"module 'tokcomp' has no attribute {name!r}")
