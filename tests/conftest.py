"""Shared fixtures: tiny presets built once per session into a private cache, real photographs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Build presets into a fresh folder so tests never depend on what a machine has cached."""
    root = tmp_path_factory.mktemp("tokcomp-home")
    previous = os.environ.get("TOKCOMP_HOME")
    os.environ["TOKCOMP_HOME"] = str(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no hub at run time: `datasets` should not wait for one
    yield root
    if previous is None:
        os.environ.pop("TOKCOMP_HOME", None)
    else:
        os.environ["TOKCOMP_HOME"] = previous


@pytest.fixture(scope="session")
def llava():
    from tokcomp.models.loading import load_vlm

    return load_vlm("tiny-llava")


@pytest.fixture(scope="session")
def llava_ov():
    from tokcomp.models.loading import load_vlm

    return load_vlm("tiny-llava-ov")


@pytest.fixture(scope="session")
def qwen():
    from tokcomp.models.loading import load_vlm

    return load_vlm("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def qwen3():
    from tokcomp.models.loading import load_vlm

    return load_vlm("tiny-qwen3-vl")


@pytest.fixture(scope="session", params=["tiny-llava", "tiny-llava-ov"])
def adapter(request, llava, llava_ov):
    return {"tiny-llava": llava, "tiny-llava-ov": llava_ov}[request.param]


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Six real photographs and textures from scikit-image's wheel."""
    import skimage.data as d

    names = ["astronaut", "coffee", "chelsea", "rocket", "brick", "gravel"]
    return [Image.fromarray(getattr(d, n)()).convert("RGB") for n in names]


@pytest.fixture(scope="session")
def flat_image() -> Image.Image:
    return Image.fromarray(np.full((256, 256, 3), (120, 160, 200), dtype=np.uint8))


@pytest.fixture(scope="session")
def suites_dir(tmp_path_factory):
    """The built-in suites' eval files (24 items per task) where `tokcomp eval` reads them ($TOKCOMP_TASKS_DIR)."""
    from tokcomp.data.tasks import write_eval_splits

    folder = tmp_path_factory.mktemp("tasks")
    write_eval_splits(folder, n=24)
    patch = pytest.MonkeyPatch()
    patch.setenv("TOKCOMP_TASKS_DIR", str(folder))
    yield folder
    patch.undo()
