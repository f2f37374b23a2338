"""Shared test setup.

The oracle packages (diffusers, transformers, open_clip) import torchvision. On CPU-only torch the
PyPI torchvision wheel cannot load its compiled ops, and its fake-op registrations then fail at
import. Declaring the two op schemas it registers fakes for lets it import; no test uses them.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _declare_torchvision_ops() -> None:
    try:
        torch.ops.load_library  # noqa: B018 - torch is importable
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            return
        from pathlib import Path

        so = Path(spec.origin).parent / "_C.so"
        try:
            torch.ops.load_library(str(so))
            return
        except Exception:
            pass
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
        )
        globals()["_TV_LIB"] = lib  # keep the library object alive
    except Exception:
        pass


_declare_torchvision_ops()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
