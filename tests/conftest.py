"""Shared test setup.

The oracle packages (diffusers, transformers, open_clip) import torchvision. On CPU-only torch the
PyPI torchvision wheel cannot load its compiled ops, and its fake-op registrations then fail at
import. Declaring the two op schemas it registers fakes for lets it import; no test uses them.
"""
import gzip
import json
import os
from pathlib import Path

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

# Under xdist every worker already owns a core; letting each spawn a full thread pool
# oversubscribes the machine and makes tiny-model tests many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


CLIP_BPE_ASSET = Path(__file__).resolve().parents[1] / "models" / "assets" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="session")
def hf_files(tmp_path_factory):
    """vocab.json + merges.txt derived from the shipped BPE file, as in HF CLIP tokenizer folders."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    lines = gzip.decompress(CLIP_BPE_ASSET.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode_reference()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def _bytes_to_unicode_reference() -> list[str]:
    # GPT-2's table, written out independently of models.tokenizer; vocabulary order is the
    # printable bytes first ("!" = 0), then the remapped ones.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run creates its own Accelerator; drop accelerate's process-wide
    singleton state before and after. Training test modules opt in with
    `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state()
    GradientState._reset_state()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP stalls when the test
    workers oversubscribe the cores. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
