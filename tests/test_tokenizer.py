"""CLIPTokenizer against transformers' CLIPTokenizer and open_clip's SimpleTokenizer (recorded ids).

The reference tokenizers are built from vocab.json / merges.txt written into tmp_path from the
shipped BPE file the way the Hugging Face CLIP files were made (256 byte symbols, the same with
`</w>`, the 48894 merges joined, the two specials).
"""
import json
import random
import time
from pathlib import Path

import pytest
import torch

from models.tokenizer import CLIPTokenizer


HAND_WRITTEN = [
    "",
    " ",
    "   \t\n  ",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "masterpiece, best quality, 1girl, solo, long_hair, looking_at_viewer, smile",
    "(masterpiece:1.2), [cat|dog], {blue eyes}, <lora:foo:0.8>",
    "It's we're they've I'm you'll he'd don't ROCK'N'ROLL 'sun 'S ''' ''s",
    "rock'n'roll, o'clock, 'twas, cats' toys",
    "a    lot     of     spaces",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "nbsp\u00a0here ideographic\u3000space en\u2002quad thin\u2009space nel\x85x",
    "zero\u200bwidth joiner\u200d and bom\ufeff",
    "separators\x1c\x1d\x1e\x1f and nul\x00 and bell\x07",
    "café crème brûlée, naïve façade, Ångström, Øresund, smörgåsbord",
    "e\u0301 composed by NFC, a\u0308, Hangul jamo \u1100\u1161\u11a8",
    "straße GROSSE ß ẞ",
    "İstanbul ıi DİYARBAKIR",
    "ΟΔΟΣ Σ ΣΑΣ σοφός ς",
    "Москва, ПРИВЕТ мир",
    "東京タワー 漢字 中文提示词 日本語のテキスト",
    "한국어 텍스트 서울",
    "مرحبا بالعالم",
    "हिन्दी पाठ नमस्ते",
    "ไทย ภาษา",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ ☃",
    "flags 🇯🇵🇺🇸 and keycap 1️⃣",
    "numbers 12345 3.14159 1,000,000 2nd 4k 8K 1080p",
    "superscripts x² ½ ¾ Ⅻ ① ٣ ४ 五",
    "fullwidth ＡＢＣ１２３ ！？",
    "ligatures ﬁne ﬂow",
    "curly “quotes” and ‘single’ — dash – ellipsis…",
    "punctuation!!! ??? ... ,,, ;;; ::: --- ___ *** ### @@@ $$$ %%% ^^^ &&& ~~~ ``` |||",
    "html &amp; &lt;b&gt; &quot;quoted&quot; &#39;s &#x27; &nbsp; &amp;amp;",
    "a <b>bold</b> tag and &amp; inside html",
    "url https://example.com/path?q=1&x=2#frag email user@example.org",
    "path C:\\Users\\name\\file.png and /usr/bin/env",
    "math: a+b=c, x*y/z, 2^10, 5%, $100, €50, £20, ¥1000",
    "<|startoftext|>already has specials<|endoftext|>",
    "mid <|endoftext|> text",
    "<|ENDOFTEXT|> upper and <|startoftext mangled",
    "<|endoftext|><|endoftext|>",
    "backslash \\ and quotes \" '",
    "CamelCaseWordsAndMixed123Numbers456",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a" * 300,
    "x" + "!" * 200,
    "score_9, score_8_up, rating_safe, source_anime",
    "Ⓐⓑⓒ 𝐛𝐨𝐥𝐝 𝕕𝕠𝕦𝕓𝕝𝕖 ℌℑ",
    "combining a\u0300\u0301\u0302 marks",
    "\u00ad soft hyphen and \u2060 word joiner",
]

_WORDS = (
    "a photo of the cat dog portrait landscape highly detailed 8k octane render trending artstation by greg "
    "rutkowski cinematic lighting sunset mountains river forest girl boy robot cyberpunk city neon rain"
).split()
_EXOTIC = [
    "é", "ü", "ñ", "ø", "å", "ç", "Σ", "ß", "İ", "漢", "字", "の", "ア", "한", "ы", "Ж", "ع", "ह", "😀", "👍🏽",
    "❤️", "™", "©", "°", "±", "²", "½", "Ⅻ", "①", "９", "Ａ", "\u00a0", "\u3000", "\u200b", "&amp;", "&lt;",
    "&#39;", "'s", "'LL", "...", "!!", "?", ",", ";", ":", "(", ")", "[", "]", "{", "}", "<", ">", "|", "_",
    "-", "/", "\\", "\"", "#", "@", "$", "%", "^", "*", "+", "=", "~", "`", "\t", "\n", "  ", "1", "42", "3.5",
]


def generated_prompts(count: int, seed: int = 1234) -> list[str]:
    """Random mixes of ordinary words and the awkward characters above, some longer than 77 tokens."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        n = rng.choice([1, 3, 8, 20, 40, 90])
        parts = []
        for _ in range(n):
            r = rng.random()
            if r < 0.55:
                word = rng.choice(_WORDS)
                parts.append(word.upper() if rng.random() < 0.1 else word.capitalize() if rng.random() < 0.1 else word)
            else:
                parts.append(rng.choice(_EXOTIC))
            parts.append(rng.choice([" ", " ", ", ", "", "  "]))
        prompts.append("".join(parts))
    return prompts


PROMPTS = HAND_WRITTEN + generated_prompts(220)


@pytest.fixture(scope="module")
def hf_tokenizers(hf_files):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    clip_l = HFCLIPTokenizer.from_pretrained(str(hf_files))
    bigg = HFCLIPTokenizer.from_pretrained(str(hf_files), pad_token="!")
    return clip_l, bigg


def _hf_ids(tok, texts, max_length=77):
    return torch.tensor(tok(texts, padding="max_length", max_length=max_length, truncation=True).input_ids)


def test_prompt_set_is_varied():
    assert len(PROMPTS) >= 200
    ours = CLIPTokenizer()
    lengths = [len(ours.encode(p)) for p in PROMPTS]
    assert sum(n > 75 for n in lengths) >= 10, "need prompts that get truncated"
    assert sum(not p.isascii() for p in PROMPTS) >= 100


def _hf_ids_padded_with(tok, texts, pad_id):
    """transformers' ids (BOS, truncated tokens, EOS) padded to 77 with pad_id by hand."""
    rows = tok(texts, truncation=True, max_length=77).input_ids
    return torch.tensor([row + [pad_id] * (77 - len(row)) for row in rows])


@pytest.mark.parametrize("pad_id", [49407, 0], ids=["pad-eos", "pad-zero"])
def test_ids_match_transformers(hf_tokenizers, pad_id):
    # Reference: transformers' CLIPTokenizer (EOS padding); for pad 0 its padding is replaced by 0
    # explicitly, which is how open_clip, kohya and ComfyUI pad SDXL's second encoder.
    if pad_id == 49407:
        want = _hf_ids(hf_tokenizers[0], PROMPTS)
    else:
        want = _hf_ids_padded_with(hf_tokenizers[0], PROMPTS, pad_id)
    ours = CLIPTokenizer(pad_token_id=pad_id)
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    bad = [i for i in range(len(PROMPTS)) if not torch.equal(got[i], want[i])]
    assert not bad, (
        f"{len(bad)} prompts differ, first: {PROMPTS[bad[0]]!r}\n{got[bad[0]].tolist()}\n{want[bad[0]].tolist()}"
    )


def test_pad_bang_folder_convention(hf_tokenizers):
    """diffusers' SDXL tokenizer_2 declares pad_token "!"; transformers then also treats every "!"
    in the text as that special token (id 0). We keep "!" ordinary text, as the OpenCLIP tokenizer
    SDXL was trained with does; prompts without "!" are identical."""
    hf_bang = hf_tokenizers[1]
    ours = CLIPTokenizer(pad_token_id=0)
    without = [p for p in PROMPTS if "!" not in p]
    assert len(without) >= 150
    assert torch.equal(ours(without), _hf_ids(hf_bang, without))
    assert _hf_ids(hf_bang, ["wow!!!"])[0, 2:5].tolist() == [0, 0, 0]
    assert ours.encode("wow!!!") == hf_tokenizers[0]("wow!!!", add_special_tokens=False).input_ids
    assert ours.encode("wow!!!")[-1] == 995  # "!!!</w>"


def test_encode_matches_transformers_without_truncation(hf_tokenizers):
    hf = hf_tokenizers[0]
    ours = CLIPTokenizer()
    for p in PROMPTS:
        assert ours.encode(p) == hf(p, add_special_tokens=False).input_ids, p


def test_known_ids():
    # Ids of the released CLIP vocabulary (as in every SD tokenizer folder).
    tok = CLIPTokenizer()
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("!") == [256] and tok.encoder["!"] == 0 and tok.encoder["a</w>"] == 320


def test_truncation_keeps_eos_and_padding():
    ours = CLIPTokenizer(pad_token_id=0)
    long = "cat " * 200
    row = ours(long)[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] != 49407).all()
    short = ours(["cat", ""])
    cat_id = ours.encode("cat")
    assert short[0, :3].tolist() == [49406, *cat_id, 49407] and (short[0, 3:] == 0).all()
    assert short[1, :2].tolist() == [49406, 49407] and (short[1, 2:] == 0).all()
    eos_pad = CLIPTokenizer()(["cat"])
    assert (eos_pad[0, 2:] == 49407).all()
    # Exactly max_length - 2 tokens fill the row without truncation.
    row = ours(" ".join(["cat"] * 75))[0]
    assert row.tolist() == [49406] + cat_id * 75 + [49407]


def test_short_max_length_matches_transformers(hf_tokenizers):
    ours = CLIPTokenizer(max_length=10)
    assert torch.equal(ours(PROMPTS[:40]), _hf_ids(hf_tokenizers[0], PROMPTS[:40], max_length=10))


OPEN_CLIP_IDS = Path(__file__).resolve().parent / "fixtures" / "open_clip_tokenizer_ids.json"


def test_matches_open_clip_where_cleaning_agrees():
    """open_clip's SimpleTokenizer ids, recorded by tests/fixtures/make_open_clip_fixtures.py for the
    prompts of PROMPTS on which its cleaning (ftfy + HTML unescape) and ours (NFC + HTML unescape)
    agree. open_clip pads with 0."""
    recorded = json.loads(OPEN_CLIP_IDS.read_text(encoding="utf-8"))
    prompts, rows = recorded["prompts"], recorded["ids"]
    assert len(prompts) == len(rows) >= 150 and set(prompts) <= set(PROMPTS)
    want = torch.zeros(len(rows), 77, dtype=torch.long)
    for i, row in enumerate(rows):
        want[i, : len(row)] = torch.tensor(row)
    got = CLIPTokenizer(pad_token_id=0, unescape_html=True)(prompts)
    bad = [i for i in range(len(prompts)) if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} differ, first {prompts[bad[0]]!r}"


def test_html_unescape_option():
    plain, unescaped = CLIPTokenizer(), CLIPTokenizer(unescape_html=True)
    assert unescaped.encode("&amp;amp; &lt;") == plain.encode("& <")
    assert plain.encode("&amp;") != plain.encode("&")


def test_from_files_round_trip(hf_files, tmp_path):
    default = CLIPTokenizer()
    loaded = CLIPTokenizer.from_files(hf_files / "vocab.json", hf_files / "merges.txt")
    assert loaded.vocab_size == default.vocab_size == 49408
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (49406, 49407, 49407)
    assert torch.equal(loaded(PROMPTS[:60]), default(PROMPTS[:60]))

    # A diffusers tokenizer_2 folder: pad "!" in special_tokens_map.json.
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((hf_files / name).read_bytes())
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "model_max_length": 77}))
    tok2 = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    assert tok2.pad_token_id == 0 and tok2.max_length == 77
    assert torch.equal(tok2(PROMPTS[:60]), CLIPTokenizer(pad_token_id=0)(PROMPTS[:60]))
    assert CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=49407).pad_token_id == 49407
    with pytest.raises(ValueError, match="not in"):
        CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token="<pad>")


def test_decode_and_errors():
    tok = CLIPTokenizer()
    assert tok.decode(tok(["A Photo of a CAT, 4k café"])[0]) == "a photo of a cat , 4 k café"
    with pytest.raises(TypeError):
        tok([1, 2])
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTokenizer(pad_token_id=10**6)
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)
    assert tok([]).shape == (0, 77)


def test_speed_1000_prompts_per_second():
    tok = CLIPTokenizer()
    prompts = generated_prompts(1000, seed=99)  # fresh tokenizer: cold BPE cache
    start = time.perf_counter()
    out = tok(prompts)
    elapsed = time.perf_counter() - start
    assert out.shape == (1000, 77)
    assert elapsed < 1.0, f"tokenizing 1000 prompts took {elapsed:.2f} s"
