"""Pieces shared by the end-to-end training tests (test_train, test_reliability_*): where the
quickstart config and images live, a copy of some of those images, and the environment for a
`python -m trainer` subprocess. The accelerate-state reset they all need is the
`fresh_accelerate_state` fixture in conftest.py."""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY_LORA = ROOT / "tests" / "fixtures" / "tiny_lora.yaml"
"""A LoRA run on the random-weight tiny-sdxl over examples/quickstart_data: what most training tests
start from (the quickstart itself trains the pretrained toy-sdxl, which is slower)."""
EXAMPLES = ROOT / "examples" / "quickstart_data"


def trainer_env() -> dict:
    """Environment for a trainer subprocess: one thread (tests run two at a time on two cores),
    the repository importable, and no mixed-precision setting inherited from the caller."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def copy_quickstart_images(out: Path, count: int, captions: bool = True) -> Path:
    """Copy the first `count` quickstart images (sorted by name) into `out`, with their .txt
    captions when `captions`; returns `out`."""
    images = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))[:count]
    assert len(images) == count, f"{EXAMPLES} needs at least {count} images"
    for img in images:
        shutil.copy(img, out / img.name)
        if captions:
            shutil.copy(img.with_suffix(".txt"), out / (img.stem + ".txt"))
    return out


def shape_checker():
    """examples/shape_checker.py as a module (examples/ is not a package): `classify(image)` reads
    colour, shape and background back from a shapes-world picture."""
    if "shape_checker" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shape_checker", ROOT / "examples" / "shape_checker.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["shape_checker"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["shape_checker"]
