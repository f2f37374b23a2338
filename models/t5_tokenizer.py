"""T5 tokenizer (SentencePiece unigram vocabulary) giving the ids of transformers' `T5TokenizerFast`.

Reads the model's own files, nothing ships with this package:
  - `tokenizer.json` (a Hugging Face tokenizer folder, e.g. FLUX.1 `tokenizer_2/`), loaded as is, or
  - `spiece.model` (the SentencePiece model, e.g. google/t5-v1_1-xxl), from which the tokenizer
    transformers builds is rebuilt: the pieces with their scores as a unigram model, the model's
    precompiled normalisation table, whitespace split + "▁" word prefix, and `<extra_id_N>`
    sentinels (100 by default) after the pieces in reverse order, as special tokens.
Both run on the `tokenizers` library. A folder holding both uses `tokenizer.json`.

Rows are: the prompt's ids (special-token names written in the prompt, such as `</s>`, become their
ids), cut to `max_length - 1`, then EOS (`</s>`, 1), then pad (`<pad>`, 0) up to `max_length` (512
for FLUX.1-dev, 256 for schnell):

    tok = T5Tokenizer.from_files("FLUX.1-dev/tokenizer_2", max_length=512)
    ids = tok(["a cat", "a dog"])                 # (2, 512) int64
    ids, mask = tok.with_mask(["a cat"])          # mask (1, 512) int64: 1 up to and including EOS
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["T5Tokenizer", "read_sentencepiece_model"]

TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"
_DEFAULT_MAX_LENGTH = 512
# SentencePiece piece types (sentencepiece_model.proto): NORMAL=1, UNKNOWN=2, CONTROL=3,
# USER_DEFINED=4, UNUSED=5, BYTE=6.
_UNKNOWN, _CONTROL = 2, 3


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "the T5 tokenizer needs the `tokenizers` package (a lorasmith dependency): pip install 'tokenizers>=0.19'"
        ) from None
    return tokenizers


class T5Tokenizer:
    """Prompts -> (B, max_length) int64 T5 token ids, EOS-terminated and padded; see the module docstring.

    tokenizer: a `tokenizers.Tokenizer` that encodes without adding EOS itself.
    max_length: row length, EOS included (>= 2).
    """

    def __init__(self, tokenizer, max_length: int = _DEFAULT_MAX_LENGTH, source: str = "T5 tokenizer"):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"{source}: max_length must be an int >= 2 (a token and EOS), got {max_length!r}")
        self._tok = tokenizer
        self.max_length = max_length
        self.source = source
        ids = {}
        for name in ("<pad>", "</s>"):
            ids[name] = tokenizer.token_to_id(name)
            if ids[name] is None:
                raise ValueError(f"{source}: the vocabulary has no {name!r} token; is this a T5 tokenizer?")
        self.pad_token_id, self.eos_token_id = ids["<pad>"], ids["</s>"]

    @classmethod
    def from_files(cls, path: str | Path, max_length: int | None = None, extra_ids: int | None = None) -> T5Tokenizer:
        """Load from a folder (holding `tokenizer.json` or `spiece.model`) or one of those files.

        max_length: None reads `model_max_length` from the folder's tokenizer_config.json, else 512.
        extra_ids: sentinels added to a `spiece.model` vocabulary; None reads `extra_ids` from
            tokenizer_config.json, else 100 (T5). Ignored for `tokenizer.json`, which lists its own.
        """
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            candidates = [path / TOKENIZER_JSON, path / SPIECE_MODEL]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"{path}: no {TOKENIZER_JSON} or {SPIECE_MODEL}; pass the T5 tokenizer folder "
                    "(a diffusers FLUX.1 folder keeps it in tokenizer_2/)"
                )
            path = found
        elif not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file or folder (expected a T5 {TOKENIZER_JSON} or {SPIECE_MODEL})"
            )
        config = _read_tokenizer_config(folder)
        if max_length is None:
            max_length = config.get("model_max_length", _DEFAULT_MAX_LENGTH)
            if not isinstance(max_length, int) or max_length > 4096:  # HF writes a huge sentinel when unset
                max_length = _DEFAULT_MAX_LENGTH
        if path.suffix == ".json":
            try:
                tok = _tokenizers().Tokenizer.from_file(str(path))
            except Exception as exc:  # the Rust side raises plain Exceptions
                raise ValueError(f"{path}: not a readable tokenizers file ({exc})") from None
            # Files saved after a padded call keep those settings; rows are cut and padded here.
            tok.no_truncation()
            tok.no_padding()
        else:
            if extra_ids is None:
                extra_ids = config.get("extra_ids", 100)
            tok = _tokenizer_from_spm(path, extra_ids)
        return cls(tok, max_length=max_length, source=str(path))

    # ------------------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens (sentinels) included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without EOS, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"{self.source}: prompts must be str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def with_mask(self, texts: str | list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (ids, mask), both (B, max_length) int64; mask is 1 on the prompt and its EOS."""
        if isinstance(texts, str):
            texts = [texts]
        rows, masks = [], []
        for text in texts:
            ids = self.encode(text)[: self.max_length - 1] + [self.eos_token_id]
            pad = self.max_length - len(ids)
            rows.append(ids + [self.pad_token_id] * pad)
            masks.append([1] * len(ids) + [0] * pad)
        if not rows:
            empty = torch.empty(0, self.max_length, dtype=torch.long)
            return empty, empty.clone()
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    def __call__(self, texts: str | list[str] | tuple[str, ...]) -> torch.Tensor:
        """Prompts -> ids (B, max_length) int64: prompt ids (cut to max_length - 1), EOS, pad."""
        return self.with_mask(texts)[0]

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Ids -> text; skips EOS, pad and sentinels by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, folder: str | Path) -> Path:
        """Write `tokenizer.json` and a tokenizer_config.json holding this row length into `folder`
        (what a FLUX.1 diffusers `tokenizer_2/` holds; `from_files` reads it back). Returns `folder`."""
        from .checkpoints.fileio import write_json, write_text

        folder = Path(folder)
        write_text(folder / TOKENIZER_JSON, self._tok.to_str())
        write_json(folder / "tokenizer_config.json", {"tokenizer_class": "T5TokenizerFast", "model_max_length":
                   self.max_length, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
        return folder


def _read_tokenizer_config(folder: Path) -> dict:
    """`model_max_length` / `extra_ids` from tokenizer_config.json, when the folder has one."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc}); fix or delete it") from None
    return {k: data[k] for k in ("model_max_length", "extra_ids") if isinstance(data.get(k), int)}


# ---- spiece.model --------------------------------------------------------------------------
def _tokenizer_from_spm(path: Path, extra_ids: int):
    """A `tokenizers.Tokenizer` equal to the one transformers builds for T5 from `spiece.model`."""
    tk = _tokenizers()
    if not isinstance(extra_ids, int) or extra_ids < 0:
        raise ValueError(f"{path}: extra_ids must be an int >= 0, got {extra_ids!r}")
    model = read_sentencepiece_model(path)
    if model["model_type"] != 1:
        raise ValueError(f"{path}: a SentencePiece model of type {model['model_type']} (T5 uses unigram, type 1)")
    pieces = model["pieces"]
    unk = [i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN]
    if not unk:
        raise ValueError(f"{path}: the SentencePiece model has no unknown-token piece")
    vocab = [(piece, score) for piece, score, _ in pieces]
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    vocab += [(s, 0.0) for s in sentinels]
    tok = tk.Tokenizer(tk.models.Unigram(vocab, unk_id=unk[0], byte_fallback=False))
    if model["precompiled_charsmap"]:
        tok.normalizer = tk.normalizers.Precompiled(model["precompiled_charsmap"])
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.WhitespaceSplit(),
        tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = tk.decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # Control pieces (<pad>, </s>) and <unk> written in a prompt map to their ids, like the sentinels.
    specials = [piece for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)] + sentinels
    tok.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def read_sentencepiece_model(path: str | Path) -> dict:
    """The parts of a SentencePiece `ModelProto` file a unigram tokenizer needs.

    Returns {"pieces": [(piece, score, type), ...] in id order, "model_type": int (1 = unigram),
    "precompiled_charsmap": bytes (the normaliser table; empty for the identity normaliser)}.
    Decoded directly from the protobuf wire format (fields of sentencepiece_model.proto), so
    neither `sentencepiece` nor `protobuf` is needed.
    """
    path = Path(path)
    data = path.read_bytes()
    pieces: list[tuple[str, float, int]] = []
    model_type, charsmap = 1, b""  # proto defaults: UNIGRAM, no table
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:  # repeated SentencePiece pieces
                piece, score, kind = "", 0.0, 1
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = bytes(v).decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                pieces.append((piece, score, kind))
            elif field == 2 and wire == 2:  # TrainerSpec
                model_type = next((v for f, w, v in _fields(value) if f == 3 and w == 0), model_type)
            elif field == 3 and wire == 2:  # NormalizerSpec
                charsmap = next((bytes(v) for f, w, v in _fields(value) if f == 2 and w == 2), charsmap)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"{path}: not a SentencePiece model file ({exc})") from None
    if not pieces:
        raise ValueError(f"{path}: not a SentencePiece model file (no pieces)")
    return {"pieces": pieces, "model_type": model_type, "precompiled_charsmap": charsmap}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of each field of one protobuf message: value is an int for
    varints, a memoryview for length-delimited and fixed-width fields."""
    buf = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        yield field, wire, value
