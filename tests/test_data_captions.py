"""Caption files (encodings, empty, multi-line) and tag shuffle / keep / dropout / prefix."""
import numpy as np

from data.captions import (
    CaptionProcessor,
    CaptionSettings,
    decode_caption,
    normalise_caption,
    read_caption_file,
)


def _rng(i: int) -> np.random.Generator:
    return np.random.default_rng([0, i])


def test_decode_utf8_bom_utf16_and_cp1252(tmp_path):
    assert decode_caption("café, 東京".encode()) == ("café, 東京", None)
    assert decode_caption(b"\xef\xbb\xbfhello") == ("hello", None)
    assert decode_caption("naïve".encode("utf-16")) == ("naïve", None)
    text, problem = decode_caption("café “quoted”".encode("cp1252"))
    assert text == "café “quoted”" and "not valid UTF-8" in problem and "cp1252" in problem
    (tmp_path / "a.txt").write_bytes("r\xe9sum\xe9".encode("latin-1"))
    text, problem = read_caption_file(str(tmp_path / "a.txt"))
    assert text == "résumé" and problem


def test_read_caption_file_missing_empty_multiline(tmp_path):
    assert read_caption_file(str(tmp_path / "none.txt")) == (None, None)
    (tmp_path / "e.txt").write_bytes(b"  \n\n")
    assert read_caption_file(str(tmp_path / "e.txt")) == ("", "empty caption file")
    (tmp_path / "m.txt").write_text("a cat,\n  sitting   on a mat \r\n\n", encoding="utf-8")
    assert read_caption_file(str(tmp_path / "m.txt")) == ("a cat, sitting on a mat", None)


def test_normalise_nfc():
    assert normalise_caption("cafe\u0301") == "café"  # decomposed -> composed


def test_keep_tokens_and_shuffle_deterministic():
    proc = CaptionProcessor(CaptionSettings(shuffle_tags=True, keep_tokens=2))
    cap = "sks, person, red hat, smiling, outdoors, sunny, blue sky"
    outs = [proc(cap, _rng(i)) for i in range(20)]
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "person"] and sorted(tags) == sorted(cap.split(", "))
    assert len(set(outs)) > 5
    assert proc(cap, _rng(7)) == proc(cap, _rng(7))


def test_tag_dropout_and_caption_dropout_rates():
    proc = CaptionProcessor(CaptionSettings(tag_dropout=0.5, keep_tokens=1))
    cap = ", ".join(f"t{i}" for i in range(40))
    kept = [len(proc(cap, _rng(i)).split(", ")) - 1 for i in range(50)]
    assert 15 < np.mean(kept) < 25  # ~half of the 39 droppable tags
    assert all(proc(cap, _rng(i)).startswith("t0") for i in range(20))
    drop = CaptionProcessor(CaptionSettings(caption_dropout=0.3, caption_prefix="trig"))
    outs = [drop("a, b", _rng(i)) for i in range(400)]
    assert 0.2 < outs.count("") / 400 < 0.4
    assert all(o == "trig, a, b" for o in outs if o)


def test_prefix_separator_and_no_duplicate_prefix():
    proc = CaptionProcessor(CaptionSettings(caption_prefix="ohwx", tag_separator="|", shuffle_tags=True))
    out = proc("a| b |c", _rng(1))
    assert out.startswith("ohwx| ") and sorted(out.split("| ")[1:]) == ["a", "b", "c"]
    assert CaptionProcessor(CaptionSettings(caption_prefix="ohwx")).base("ohwx, dog") == "ohwx, dog"
    plain = CaptionProcessor(CaptionSettings())
    assert plain("A photo of a dog, at night.", _rng(0)) == "A photo of a dog, at night."
