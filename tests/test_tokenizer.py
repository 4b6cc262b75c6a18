"""The byte-level BPE tokenizer: round trips, training, the tokenizer.json format, bad files."""

from __future__ import annotations

import json

import pytest

from detlib.tokenizer import ENDOFTEXT, Tokenizer, TokenizerError, load_tokenizer, train_bpe

TRICKY = [
    "",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Héllo wörld! 12345 cafe\u0301 — 日本語テキスト 😀 \t\r\n  trailing   ",
    "I'LL don't you'RE they'VE\n\n\n",
    "naïve ﬁ Ⅻ ² ٣ \x00\x1f\x7f",
    f"one{ENDOFTEXT}two {ENDOFTEXT}{ENDOFTEXT}",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def test_shipped_tokenizer_size_and_special(tok: Tokenizer) -> None:
    assert tok.vocab_size == 4096
    assert tok.token_id(ENDOFTEXT) == 4095
    assert tok.encode(ENDOFTEXT) == [4095]
    assert len(tok.encode(ENDOFTEXT, allow_special=False)) > 1  # spelled out, not the special id


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    # NFC normalization is part of encoding: the round trip gives the NFC form
    import unicodedata

    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_round_trip_random_bytes(tok: Tokenizer) -> None:
    import random

    rng = random.Random(0)
    for _ in range(20):
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)])) for _ in range(60))
        import unicodedata

        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_compresses_shakespeare(tok: Tokenizer) -> None:
    text = "Good night, good night! parting is such sweet sorrow"
    ids = tok.encode(text)
    assert len(ids) < len(text) / 3, "a BPE trained on the plays should need few tokens for their words"
    assert tok.decode(ids[:3]) == "Good night,"[: len(tok.decode(ids[:3]))]


def test_partial_utf8_decodes_to_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # an emoji is not in a Shakespeare vocabulary: it falls back to bytes
    assert tok.decode(ids[:1]) == "\ufffd"


def test_train_is_deterministic_and_merges_frequent_pairs() -> None:
    text = "the cat the hat the bat " * 50 + "zebra"
    a = train_bpe(text, 256 + 10 + 1)
    b = train_bpe(text, 256 + 10 + 1)
    assert a.merges == b.merges
    assert len(a.merges) == 10
    assert a.merges[0] in {("Ġ", "t"), ("a", "t"), ("t", "h"), ("h", "e")}
    assert len(a.encode(" the")) == 1
    for t in (text, "zebra crossing"):
        assert a.decode(a.encode(t)) == t


def test_save_load(tmp_path, tok: Tokenizer) -> None:
    small = train_bpe("hello world, hello there " * 20, 300)
    small.save(tmp_path / "tokenizer.json")
    back = Tokenizer.from_file(tmp_path)
    assert back.fingerprint() == small.fingerprint() != tok.fingerprint()
    assert back.encode("hello there") == small.encode("hello there")


def test_matches_huggingface_tokenizers(tok: Tokenizer) -> None:
    """Our encoder gives the ids of the reference implementation on the same tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from detlib.tokenizer import default_tokenizer_path

    ref = tokenizers.Tokenizer.from_file(str(default_tokenizer_path()))
    corpus = (default_tokenizer_path().parent / "corpus" / "shakespeare_plays.txt").read_text()[:20000]
    for text in [corpus, *TRICKY]:
        assert tok.encode(text) == ref.encode(text).ids, text[:40]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["model"].update(type="WordPiece"), "model must be BPE"),
        (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Whitespace"}), "pre-tokenizer"),
        (lambda d: d["model"]["vocab"].pop("Ġ"), "byte tokens"),
        (lambda d: d.update(post_processor={"type": "TemplateProcessing"}), "post_processor"),
    ],
)
def test_bad_files(tmp_path, tok: Tokenizer, mutate, message: str) -> None:
    doc = tok.to_json()
    mutate(doc)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(path)


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_file(bad)


def test_decode_rejects_unknown_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5000])


def test_reads_merges_written_as_strings(tmp_path, tok: Tokenizer) -> None:
    """Older tokenizer.json files (GPT-2, early Qwen) write each merge as one "a b" string."""
    doc = tok.to_json()
    doc["model"]["merges"] = [" ".join(m) for m in doc["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    old = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert old.fingerprint() == tok.fingerprint()


def test_chat_special_tokens_match_huggingface_tokenizers(tmp_path, tok: Tokenizer) -> None:
    """A Qwen3-like file with several added tokens (chat markers): split exactly as `tokenizers` splits."""
    tokenizers = pytest.importorskip("tokenizers")
    doc = tok.to_json()
    for i, content in enumerate(["<|im_start|>", "<|im_end|>", "<think>", "</think>"], start=tok.vocab_size):
        doc["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    ours, ref = Tokenizer.from_file(path), tokenizers.Tokenizer.from_file(str(path))
    text = "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nNay, answer me"
    assert ours.encode(text) == ref.encode(text).ids
    assert ours.decode(ours.encode(text)) == text
    assert "<think>" not in ours.decode(ours.encode(text), skip_special=True)
