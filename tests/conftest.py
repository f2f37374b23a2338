"""Shared test setup: offline hub, quiet oracles, one thread policy, CUDA-only tests skipped on CPU.

The oracle packages (diffusers, transformers, peft) run as installed: nothing here patches them.
open_clip, which would need torchvision, is an oracle through recorded data instead
(tests/open_clip_oracle.py).
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

# One thread policy for the whole suite: every test, and every process a test starts, uses one
# intra-op thread. The tensors are tiny and the suite runs one worker per core (`-n 2` on two
# cores), so more threads only contend, and oversubscribed OpenMP pools can stall.
TEST_THREADS = 1
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)  # inherited by subprocesses (CLI and DDP runs)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    # Reset before every test: code under test may change it (e.g. `train.cpu_threads`).
    torch.set_num_threads(TEST_THREADS)


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
