"""models.t5_tokenizer against transformers' T5TokenizerFast (test-only oracle).

No T5 vocabulary ships or downloads: a tiny unigram SentencePiece model is trained here on a few
sentences (T5's special ids: <pad> 0, </s> 1, <unk> 2), and transformers reads the same files: the
bare `spiece.model` (which it converts itself) and the `tokenizer.json` it saves from it.
"""
import io
import json
import pickle

import pytest
import torch

from models.t5_tokenizer import T5Tokenizer, read_sentencepiece_model

sentencepiece = pytest.importorskip("sentencepiece")

CORPUS = [
    "A photo of a cat sitting on a red chair in the sun.",
    "An astronaut riding a horse on the moon, digital art, highly detailed.",
    "Portrait of an old man with a grey beard, oil painting, 4k.",
    "The quick brown fox jumps over the lazy dog!",
    "Café au lait, naïve façade; 東京 tower at night - neon lights.",
    "a watercolor landscape with mountains and a lake, soft light",
]
PROMPTS = [
    "A photo of a cat",
    "",
    "   leading and trailing spaces   ",
    "two  spaces,\ttab and\nnewline",
    "Full-width ＡＢＣ１２３, circled ① and ligature ﬁ (NFKC-normalised)",
    "unknown characters: 🐱 ☃ 東京",
    "special names in text: </s> <pad> <unk> <extra_id_0> <extra_id_99>",
    "an astronaut riding a horse on the moon, " * 12,  # longer than every max_length below
]


@pytest.fixture(scope="session")
def spm_files(tmp_path_factory):
    """(folder with only spiece.model, folder with tokenizer.json + tokenizer_config.json from transformers)."""
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=90, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    spm_dir = tmp_path_factory.mktemp("t5_spm")
    (spm_dir / "spiece.model").write_bytes(model.getvalue())
    json_dir = tmp_path_factory.mktemp("t5_json")
    T5TokenizerFast.from_pretrained(str(spm_dir)).save_pretrained(str(json_dir))
    assert (json_dir / "tokenizer.json").is_file()
    return spm_dir, json_dir


def reference(folder, prompts, max_length):
    from transformers import T5TokenizerFast

    out = T5TokenizerFast.from_pretrained(str(folder))(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("max_length", [512, 256, 9])
@pytest.mark.parametrize("source", ["spm_folder", "spm_file", "json_folder", "json_file"])
def test_ids_and_mask_match_transformers(spm_files, source, max_length):
    spm_dir, json_dir = spm_files
    folder = spm_dir if source.startswith("spm") else json_dir
    file = "spiece.model" if source.startswith("spm") else "tokenizer.json"
    path = folder if source.endswith("folder") else folder / file
    ours = T5Tokenizer.from_files(path, max_length=max_length)
    ids, mask = ours.with_mask(PROMPTS)
    ref_ids, ref_mask = reference(folder, PROMPTS, max_length)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (len(PROMPTS), max_length)
    assert ids.tolist() == ref_ids.tolist()
    assert mask.tolist() == ref_mask.tolist()
    assert torch.equal(ours(PROMPTS), ids)


def test_spm_and_json_agree_on_the_vocabulary(spm_files):
    spm_dir, json_dir = spm_files
    a, b = T5Tokenizer.from_files(spm_dir), T5Tokenizer.from_files(json_dir)
    assert a.vocab_size == b.vocab_size == 90 + 100  # pieces + sentinels
    assert (a.pad_token_id, a.eos_token_id) == (b.pad_token_id, b.eos_token_id) == (0, 1)
    assert a.encode("<extra_id_0>") == b.encode("<extra_id_0>") == [189]


def test_rows_are_ids_eos_then_pad(spm_files):
    tok = T5Tokenizer.from_files(spm_files[0], max_length=8)
    short = tok.encode("a cat")
    assert 0 < len(short) < 7
    ids, mask = tok.with_mask(["a cat", PROMPTS[-1]])
    assert ids[0].tolist() == short + [1] + [0] * (7 - len(short))
    assert mask[0].tolist() == [1] * (len(short) + 1) + [0] * (7 - len(short))
    assert ids[1].tolist() == tok.encode(PROMPTS[-1])[:7] + [1]  # truncated, EOS kept
    assert mask[1].tolist() == [1] * 8
    assert tok("a cat").shape == (1, 8)
    empty_ids, empty_mask = tok.with_mask([])
    assert empty_ids.shape == empty_mask.shape == (0, 8)
    assert tok.decode(ids[0]) == "a cat"


def test_reader_matches_sentencepiece(spm_files):
    path = spm_files[0] / "spiece.model"
    model = read_sentencepiece_model(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert len(model["pieces"]) == sp.get_piece_size()
    for i, (piece, score, kind) in enumerate(model["pieces"]):
        assert piece == sp.id_to_piece(i)
        assert score == pytest.approx(sp.get_score(i), abs=0)
        assert (kind == 2) == sp.is_unknown(i) and (kind == 3) == sp.is_control(i)
    assert model["model_type"] == 1 and len(model["precompiled_charsmap"]) > 1000


def test_max_length_from_tokenizer_config(spm_files, tmp_path):
    spm_dir = spm_files[0]
    assert T5Tokenizer.from_files(spm_dir).max_length == 512  # no tokenizer_config.json
    (tmp_path / "spiece.model").write_bytes((spm_dir / "spiece.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256, "extra_ids": 3}))
    tok = T5Tokenizer.from_files(tmp_path)
    assert tok.max_length == 256 and tok.vocab_size == 93
    assert T5Tokenizer.from_files(tmp_path, max_length=77).max_length == 77
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert T5Tokenizer.from_files(tmp_path).max_length == 512  # HF's "unset" sentinel


def test_pickles_for_loader_workers(spm_files):
    tok = T5Tokenizer.from_files(spm_files[1], max_length=16)
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(PROMPTS), tok(PROMPTS))


def test_bad_inputs_are_reported(spm_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
        T5Tokenizer.from_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        T5Tokenizer.from_files(tmp_path / "missing.model")
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01junk")
    with pytest.raises(ValueError, match="spiece.model: not a SentencePiece model file"):
        T5Tokenizer.from_files(bad)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizers file"):
        T5Tokenizer.from_files(tmp_path)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        T5Tokenizer.from_files(spm_files[0], max_length=1)
    with pytest.raises(TypeError, match="prompts must be str"):
        T5Tokenizer.from_files(spm_files[0])([None])


def test_vocabulary_without_t5_specials_is_refused(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    file = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(file))
    with pytest.raises(ValueError, match="tokenizer.json: the vocabulary has no '<pad>' token"):
        T5Tokenizer.from_files(file)
