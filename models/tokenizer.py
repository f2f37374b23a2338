"""CLIP byte-level BPE tokenizer (the OpenAI CLIP vocabulary shared by CLIP-L, OpenCLIP ViT-H and bigG).

Produces the same ids as `transformers.CLIPTokenizer`:
  1. special tokens `<|startoftext|>` / `<|endoftext|>` written literally in the text become their ids;
  2. the rest is normalised: Unicode NFC, then lowercase (per character, so no Greek final-sigma rule);
  3. split into pieces with the CLIP pattern
     `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`
     (whitespace separates pieces and is dropped; a special-token piece, i.e. one that was not
     spelled exactly in step 1, is cut again into "<|", name, "|>" as the GPT-2 byte-level step does);
  4. each piece's UTF-8 bytes are mapped to printable characters, `</w>` marks the last one, and BPE
     merges are applied by rank.
`unescape_html=True` additionally unescapes HTML entities twice first, as OpenAI CLIP / open_clip do
(they also run `ftfy`, which is not reproduced).

The vocabulary ships as `models/assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT license).
"""
from __future__ import annotations

import gzip
import html
import json
import re
import unicodedata
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_ASSET = Path(__file__).with_name("assets") / "bpe_simple_vocab_16e6.txt.gz"
# The asset holds more merges than the released vocabulary uses: 49152 entries minus 256 byte
# tokens minus 2 specials gives 48894 merges after the header line (as in OpenAI CLIP).
_NUM_MERGES = 49152 - 256 - 2

# Pieces are found on a copy of the text in which every non-ASCII character is replaced by an ASCII
# stand-in of the same class (letter "a", number "0", whitespace " ", other "!"), so the standard
# library `re` can apply the Unicode-class pattern; spans map 1:1 back to the original text.
_PIECES = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\t\n\x0b\x0c\r a-zA-Z0-9]+"
)
_SPECIALS = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# Unicode White_Space (what `\s` means to the reference regex engines). Python's str.isspace also
# counts U+001C..U+001F, which CLIP treats as symbols.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


class _CharClass(dict):
    """str.translate table: ASCII maps to itself, other characters to their class stand-in (cached)."""

    def __missing__(self, code: int) -> int:
        if code < 128:
            value = code
        else:
            ch = chr(code)
            if ch in _WHITESPACE:
                value = ord(" ")
            else:
                major = unicodedata.category(ch)[0]
                value = ord("a") if major == "L" else ord("0") if major == "N" else ord("!")
        self[code] = value
        return value


_CHAR_CLASS = _CharClass()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> printable character (GPT-2 / CLIP byte-level mapping): printable Latin-1 bytes
    keep their own character, the others get 256 + n. Insertion order is the vocabulary order
    (printable bytes first: "!" is id 0), so iterate `.values()` to build a vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def default_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges in rank order) built from the shipped OpenAI BPE file, identical to the
    `vocab.json` / `merges.txt` of Hugging Face CLIP tokenizers (49408 tokens)."""
    if not _ASSET.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary missing: {_ASSET} (reinstall the package)")
    lines = gzip.decompress(_ASSET.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


class CLIPTokenizer:
    """Text -> CLIP token ids.

    pad_token_id: id used after EOS: 49407 (EOS, OpenAI CLIP-L convention) or 0 (`!`, OpenCLIP
        convention used by SDXL's second and SD2's tokenizer). It only fills the row: a "!" in the
        text stays ordinary text, as in open_clip, kohya and ComfyUI (transformers, given
        pad_token "!", would also turn every "!" of the prompt into id 0).
    max_length: row length of `__call__` output, BOS and EOS included (77).
    unescape_html: also html-unescape the text twice first (OpenAI/open_clip cleaning; off by
        default to match Hugging Face tokenizers, which diffusers and ComfyUI use).
    vocab, merges: a custom vocabulary (see `from_files`); default: the shipped CLIP vocabulary.
    """

    def __init__(
        self,
        pad_token_id: int = 49407,
        max_length: int = 77,
        *,
        unescape_html: bool = False,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | tuple[tuple[str, str], ...] | None = None,
    ):
        if (vocab is None) != (merges is None):
            raise ValueError("CLIPTokenizer: pass both vocab and merges, or neither (shipped vocabulary)")
        if vocab is None:
            vocab, merges = default_vocab()
        for special in (BOS_TOKEN, EOS_TOKEN):
            if special not in vocab:
                raise ValueError(f"CLIPTokenizer: vocabulary has no {special!r} token")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"CLIPTokenizer: max_length must be an int >= 2 (BOS + EOS), got {max_length!r}")
        self.encoder: dict[str, int] = vocab
        self.decoder: dict[int, str] = {i: t for t, i in vocab.items()}
        if not isinstance(pad_token_id, int) or pad_token_id not in self.decoder:
            raise ValueError(f"CLIPTokenizer: pad_token_id={pad_token_id!r} is not an id of the vocabulary")
        self.bpe_ranks: dict[tuple[str, str], int] = {tuple(m): i for i, m in enumerate(merges)}  # type: ignore[misc]
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.unescape_html = unescape_html
        table = bytes_to_unicode()
        self._byte_chars = tuple(table[b] for b in range(256))
        self._byte_decoder = {c: b for b, c in table.items()}
        # Prompts repeat words constantly; caching BPE per piece makes tokenizing mostly dict hits.
        self._piece_ids = lru_cache(maxsize=1 << 16)(self._bpe_ids)

    def __getstate__(self) -> dict:
        # Picklable for DataLoader workers that tokenize: the BPE cache is rebuilt on unpickling.
        return {k: v for k, v in self.__dict__.items() if k != "_piece_ids"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._piece_ids = lru_cache(maxsize=1 << 16)(self._bpe_ids)

    # ---- construction from Hugging Face tokenizer folders ---------------------------------
    @classmethod
    def from_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        pad_token: str | int | None = None,
        *,
        max_length: int | None = None,
        unescape_html: bool = False,
    ) -> CLIPTokenizer:
        """Load `vocab.json` + `merges.txt` (diffusers `tokenizer/`, `tokenizer_2/` folders).

        pad_token: token text (e.g. "!" or "<|endoftext|>") or id; None reads `pad_token` from
            `special_tokens_map.json` / `tokenizer_config.json` next to vocab.json, else uses EOS.
        max_length: None reads `model_max_length` from tokenizer_config.json, else 77.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        try:
            vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read CLIP vocabulary {vocab_json}: {exc}") from exc
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_json}: expected a JSON object token -> id")
        merges = []
        for lineno, line in enumerate(merges_txt.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip() or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{merges_txt}:{lineno}: expected two space-separated symbols, got {line!r}")
            merges.append((parts[0], parts[1]))

        config = _read_tokenizer_config(vocab_json.parent)
        if pad_token is None:
            pad_token = config.get("pad_token", EOS_TOKEN)
        if isinstance(pad_token, str):
            if pad_token not in vocab:
                raise ValueError(f"pad token {pad_token!r} (from {vocab_json.parent}) is not in {vocab_json}")
            pad_id = vocab[pad_token]
        else:
            pad_id = pad_token
        if max_length is None:
            max_length = config.get("model_max_length", 77)
            if not isinstance(max_length, int) or max_length > 4096:  # HF writes a huge sentinel when unset
                max_length = 77
        return cls(pad_id, max_length, unescape_html=unescape_html, vocab=vocab, merges=merges)

    # ---- properties -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def bos_token_id(self) -> int:
        return self.encoder[BOS_TOKEN]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    # ---- encoding -------------------------------------------------------------------------
    def _bpe_ids(self, piece: str) -> tuple[int, ...]:
        """BPE of one pre-tokenised piece -> ids."""
        if piece in (BOS_TOKEN, EOS_TOKEN):
            # Reached only for specials spelled in another case (lowercasing restored them). The
            # reference's byte-level step re-splits such a piece into "<|", the name and "|>".
            return self._bpe_ids("<|") + self._bpe_ids(piece[2:-2]) + self._bpe_ids("|>")
        word = [self._byte_chars[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = None
            best_rank = None
            for pair in pairwise(word):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged = []
            i = 0
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        unk = self.eos_token_id  # HF CLIP's unk token; unreachable with a consistent vocabulary
        return tuple(self.encoder.get(token, unk) for token in word)

    def _encode_segment(self, text: str, out: list[int]) -> None:
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
            # str.lower() applies the final-sigma rule; the reference lowercases per character.
            text = text.replace("Σ", "σ").lower()
            classes = text.translate(_CHAR_CLASS)
        else:
            text = text.lower()
            classes = text
        piece_ids = self._piece_ids
        for m in _PIECES.finditer(classes):
            out.extend(piece_ids(text[m.start() : m.end()]))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        if self.unescape_html:
            text = html.unescape(html.unescape(text))
        ids: list[int] = []
        if "<|" in text:
            for i, segment in enumerate(_SPECIALS.split(text)):
                if i % 2:  # literal special tokens map straight to their ids
                    ids.append(self.encoder[segment])
                elif segment:
                    self._encode_segment(segment, ids)
        else:
            self._encode_segment(text, ids)
        return ids

    def __call__(self, texts: str | list[str] | tuple[str, ...]) -> torch.Tensor:
        """Batch of prompts -> int64 tensor (B, max_length): BOS, the first max_length - 2 tokens,
        EOS, then `pad_token_id` up to max_length (EOS is always kept on truncation)."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer expects a str or a list of str")
        keep = self.max_length - 2
        bos, eos, pad = self.bos_token_id, self.eos_token_id, self.pad_token_id
        rows = []
        for text in texts:
            ids = self.encode(text)[:keep]
            rows.append([bos, *ids, eos] + [pad] * (keep - len(ids)))
        if not rows:
            return torch.empty(0, self.max_length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Ids -> text (lowercased, single spaces between words); skips BOS/EOS/pad by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id} if skip_special else set()
        data = bytearray()
        for i in ids:
            if i in specials:
                continue
            token = self.decoder.get(i)
            if token is None:
                raise ValueError(f"CLIPTokenizer.decode: id {i} is outside the vocabulary (size {self.vocab_size})")
            end = token.endswith("</w>")
            data.extend(self._byte_decoder[c] for c in (token[:-4] if end else token))
            if end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()


def _read_tokenizer_config(folder: Path) -> dict:
    """pad_token / model_max_length from a HF tokenizer folder (special_tokens_map.json wins)."""
    result: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from exc
        pad = data.get("pad_token")
        if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
            pad = pad.get("content")
        if isinstance(pad, str):
            result["pad_token"] = pad
        if "model_max_length" in data:
            result["model_max_length"] = data["model_max_length"]
    return result
