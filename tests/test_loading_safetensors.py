"""models.checkpoints.safetensors_io: validated memory-mapped reading, sharded indexes, atomic streaming writes.
The `safetensors` package is the oracle for the file format in both directions."""
import json

import pytest
import torch
from safetensors.torch import load_file as oracle_load
from safetensors.torch import save_file as oracle_save

from models.checkpoints.safetensors_io import (
    SafetensorsError,
    TensorStore,
    read_header,
    save_file,
    write_stream,
)


def sample():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "i64": torch.arange(77)[None],
        "scalar": torch.tensor(4.6052),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False, True]),
    }


def test_our_writer_is_read_by_safetensors_and_vice_versa(tmp_path):
    tensors = sample()
    ours = save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    back = oracle_load(str(ours))
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    oracle_save(tensors, str(tmp_path / "theirs.safetensors"), metadata={"a": "b"})
    with TensorStore.open(tmp_path / "theirs.safetensors") as store:
        assert store.metadata == {"a": "b"} and len(store) == len(tensors)
        for key, value in tensors.items():
            assert store.shape(key) == tuple(value.shape) and store.dtype(key) == value.dtype
            assert torch.equal(store[key], value)
            owned = store.materialize(key)
            assert torch.equal(owned, value)
            assert torch.equal(store[key], value)  # pages dropped by materialize are re-read
        assert store.nbytes() == sum(v.nbytes for v in tensors.values())


def test_writer_converts_dtype_and_aligns(tmp_path):
    tensors = {"b": torch.randn(3).half(), "a": torch.randn(5, dtype=torch.float64), "ids": torch.arange(3)}
    path = save_file(tensors, tmp_path / "x.safetensors", dtype=torch.bfloat16)
    infos, _ = read_header(path)
    assert {k: i.dtype for k, i in infos.items()} == {"a": torch.bfloat16, "b": torch.bfloat16, "ids": torch.int64}
    assert all(i.begin % i.dtype.itemsize == 0 for i in infos.values())
    assert torch.equal(oracle_load(str(path))["a"], tensors["a"].bfloat16())


def test_writer_is_atomic_and_refuses_meta(tmp_path):
    target = tmp_path / "model.safetensors"
    save_file({"x": torch.ones(2)}, target)

    class Boom(Exception):
        pass

    def produce(name):
        if name == "b":
            raise Boom  # fails after "a" was written
        return torch.ones(2)

    with pytest.raises(Boom):
        write_stream(target, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))], produce)
    assert torch.equal(oracle_load(str(target))["x"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp left behind
    with pytest.raises(ValueError, match="'w' is on the meta device"):
        save_file({"w": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")


def test_sharded_index(tmp_path):
    tensors = sample()
    keys = sorted(tensors)
    oracle_save({k: tensors[k] for k in keys[:3]}, str(tmp_path / "m-00001-of-00002.safetensors"))
    oracle_save({k: tensors[k] for k in keys[3:]}, str(tmp_path / "m-00002-of-00002.safetensors"))
    weight_map = {k: f"m-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with TensorStore.open(index) as store:
        assert sorted(store) == keys
        assert all(torch.equal(store[k], tensors[k]) for k in keys)
        assert store.source_of(keys[4]).endswith("m-00002-of-00002.safetensors")
    weight_map[keys[0]] = "m-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SafetensorsError, match=f"tensor '{keys[0]}' is not in shard m-00002.*stale"):
        TensorStore.open(index)
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(SafetensorsError, match="shard.*not on disk.*m-00002-of-00002"):
        TensorStore.open(index)


def test_header_validation_names_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    oracle_save({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors is truncated: tensor 'w' ends at byte \d+ .*re-download"):
        read_header(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a zip (torch.save) renamed .safetensors
    with pytest.raises(SafetensorsError, match="t.safetensors: header length"):
        read_header(path)


def test_zero_copy_views_are_private_and_outlive_the_store(tmp_path):
    import gc

    from models.bundle import build_model
    from models.checkpoints.loading import load_model
    from models.checkpoints.single_file import save_single_file

    path = save_single_file(build_model("tiny-sd15", seed=9), tmp_path / "m.safetensors")
    before = path.read_bytes()
    bundle = load_model(path)  # fp32 file, fp32 target: parameters are copy-on-write file views
    gc.collect()  # the store is gone; the views must stay valid
    weight = bundle.unet.state_dict()["out.2.weight"]
    original = weight.clone()
    with torch.no_grad():
        weight.add_(1.0)  # private: the file does not change
    assert torch.equal(weight, original + 1)
    assert path.read_bytes() == before
    assert torch.equal(load_model(path, mmap=False).unet.state_dict()["out.2.weight"], original)


@pytest.mark.gpu
def test_load_straight_to_cuda_in_half(tmp_path):
    from models.bundle import build_model
    from models.checkpoints.loading import load_model
    from models.checkpoints.single_file import save_single_file

    bundle = build_model("tiny-sdxl", seed=10)
    path = save_single_file(bundle, tmp_path / "m.safetensors")
    cuda = load_model(path, dtype=torch.float16, device="cuda")
    for name, module in bundle.modules().items():
        for key, value in module.state_dict().items():
            got = cuda.modules()[name].state_dict()[key]
            assert got.device.type == "cuda" and got.dtype == torch.float16
            assert torch.equal(got.cpu(), value.half()), key
