"""Byte-level BPE: the tokenizer of the course's model, and of real Qwen3 checkpoints.

Why byte-level BPE rather than characters: a model over ~4000 sub-word tokens spreads its probability
over many plausible continuations (" the", " thee", " thou", ...), so the top two logits are often
close: exactly the near-ties where a last-bit difference between kernels flips the greedy choice and
the texts diverge. A character model has ~70 symbols with far fewer such ties. Byte-level also means
any string round-trips: every byte has a token, so nothing is ever "unknown".

The files are in the Hugging Face ``tokenizer.json`` format (model ``BPE`` with ``vocab`` and
``merges``; a ``Split`` pre-tokenizer with a regular expression, then ``ByteLevel``; an optional ``NFC``
normalizer; special tokens in ``added_tokens``). That is the format Qwen3 checkpoints ship, so one
pure-Python encoder serves both: no ``tokenizers`` package needed. Supported is what Qwen3's
tokenizer uses; anything else in the file is rejected with an error that names it.

Encoding, as Hugging Face ``tokenizers`` does it:
1. split the text on special tokens (matched literally, longest first);
2. NFC-normalize the other pieces (if the file asks for it);
3. cut them into pre-tokens with the regular expression (words with their leading space, numbers
   one digit at a time, punctuation runs, whitespace runs);
4. map each pre-token's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table) and apply
   the merges in rank order until none applies.

Python's ``re`` has no ``\\p{L}``/``\\p{N}``; they are expanded into explicit code-point ranges from
:mod:`unicodedata` (letters: categories L*, numbers: N*). ``\\s`` may differ from Rust's on a few
control characters (U+001C..U+001F count as space in Python).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

#: Qwen2/Qwen3's pre-tokenizer expression (also used by the course tokenizer, so both behave alike).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file that is missing, malformed, or uses features this encoder does not implement."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte 0..255 as one printable character (printable Latin-1 bytes map to
    themselves, the others to U+0100 onwards), so that byte strings can be JSON keys."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_ranges() -> dict[str, str]:
    """Character-class bodies (``a-zA-Z...``) for Unicode letters (L) and numbers (N)."""
    out: dict[str, list[str]] = {"L": [], "N": []}
    start: dict[str, int | None] = {"L": None, "N": None}
    for cp in range(sys.maxunicode + 2):
        major = unicodedata.category(chr(cp))[0] if cp <= sys.maxunicode else ""
        for key in ("L", "N"):
            if major == key and start[key] is None:
                start[key] = cp
            elif major != key and start[key] is not None:
                lo, hi = start[key], cp - 1
                out[key].append(re.escape(chr(lo)) + ("" if lo == hi else "-" + re.escape(chr(hi))))
                start[key] = None
    return {k: "".join(v) for k, v in out.items()}


def translate_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a Rust/Oniguruma-style pattern with ``\\p{L}`` and ``\\p{N}`` for Python's ``re``."""
    if "\\p{" not in pattern:
        return re.compile(pattern)
    ranges = _unicode_ranges()
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            m = re.match(r"\\p\{(\w+)\}", pattern[i:])
            if m:
                if m.group(1) not in ranges:
                    raise TokenizerError(f"pre-tokenizer pattern uses \\p{{{m.group(1)}}}; only \\p{{L}} and \\p{{N}}")
                body = ranges[m.group(1)]
                out.append(body if in_class else f"[{body}]")
                i += len(m.group(0))
                continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return re.compile("".join(out))


class Tokenizer:
    """A byte-level BPE tokenizer: ``encode`` text to ids, ``decode`` ids to text.

    Build one with :meth:`from_file` (a ``tokenizer.json``) or :func:`train_bpe`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: dict[str, int],
        pattern: str = QWEN_PATTERN,
        nfc: bool = True,
        ignore_merges: bool = False,
    ) -> None:
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self.nfc = nfc
        self.ignore_merges = ignore_merges
        byte_chars = bytes_to_unicode()
        missing = [c for c in byte_chars.values() if c not in self.vocab]
        if missing:
            raise TokenizerError(f"vocab lacks {len(missing)} of the 256 byte tokens (first: {missing[0]!r}): "
                                 "not a byte-level BPE vocabulary")
        for a, b in self.merges:
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise TokenizerError(f"merge ({a!r}, {b!r}) names a token missing from the vocab")
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.id_to_token: dict[int, str] = {i: t for t, i in self.vocab.items()}
        for tok, i in self.special_tokens.items():
            if i in self.id_to_token and self.id_to_token[i] != tok:
                raise TokenizerError(f"special token {tok!r} reuses id {i} of {self.id_to_token[i]!r}")
            self.id_to_token[i] = tok
        self.vocab_size = max(self.id_to_token) + 1
        self._byte_decoder = {c: b for b, c in byte_chars.items()}
        self._split = translate_pattern(pattern)
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._cache: dict[str, list[int]] = {}

    # ---- encoding -------------------------------------------------------------------------------
    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-token (already mapped to byte characters), merging pairs by rank."""
        if self.ignore_merges and piece in self.vocab:
            return [self.vocab[piece]]
        word = list(piece)
        while len(word) > 1:
            best = min(range(len(word) - 1), key=lambda i: self.ranks.get((word[i], word[i + 1]), 1 << 62))
            pair = (word[best], word[best + 1])
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return [self.vocab[t] for t in word]

    def pre_tokenize(self, text: str) -> list[str]:
        """Cut ordinary text (no special tokens) into pre-tokens, as the ``Split`` pre-tokenizer does."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        pieces, pos = [], 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos : m.start()])
            if m.end() > m.start():
                pieces.append(m.group(0))
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    def _encode_ordinary(self, text: str) -> list[int]:
        table = bytes_to_unicode()
        ids: list[int] = []
        for piece in self.pre_tokenize(text):
            got = self._cache.get(piece)
            if got is None:
                got = self._bpe("".join(table[b] for b in piece.encode("utf-8")))
                if len(self._cache) < 1_000_000:
                    self._cache[piece] = got
            ids.extend(got)
        return ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens (e.g. ``<|endoftext|>``) written in the text become their
        ids when ``allow_special``; otherwise they are encoded as ordinary characters."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not allow_special or self._special_re is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._encode_ordinary(text[pos : m.start()]))
            ids.append(self.special_tokens[m.group(0)])
            pos = m.end()
        ids.extend(self._encode_ordinary(text[pos:]))
        return ids

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``. Byte sequences that are not valid UTF-8 (a prefix cut inside a character)
        decode to U+FFFD, as Hugging Face's decoder does."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            tok = self.id_to_token.get(i)
            if tok is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if tok in self.special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special:
                    out.append(tok)
            else:
                buf.extend(self._byte_decoder[c] for c in tok)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_id(self, token: str) -> int:
        """The id of a token string (special or ordinary), or a KeyError that says which."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.vocab:
            return self.vocab[token]
        raise KeyError(f"token {token!r} is not in this tokenizer")

    def fingerprint(self) -> str:
        """A short hash of vocab, merges and special tokens: two tokenizers with one fingerprint encode alike."""
        doc = json.dumps([sorted(self.vocab.items()), self.merges, sorted(self.special_tokens.items()),
                          self.pattern, self.nfc, self.ignore_merges])
        return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16]

    # ---- files ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The tokenizer as a Hugging Face ``tokenizer.json`` document (``tokenizers`` can load it)."""
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t, i in sorted(self.special_tokens.items(), key=lambda x: x[1])]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": "NFC"} if self.nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges, "vocab": dict(self.vocab),
                      "merges": [list(m) for m in self.merges]},
        }

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (one merge per line would be nicer to diff; this is what HF reads)."""
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json`` of a byte-level BPE tokenizer (GPT-2, Qwen2/3 style)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer file at {path}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path} is not valid JSON: {err}") from err
        return cls._from_json(doc, str(path))

    @classmethod
    def _from_json(cls, doc: dict, where: str) -> Tokenizer:
        model = doc.get("model") or {}
        if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
            raise TokenizerError(f"{where}: model must be BPE with vocab and merges, got type {model.get('type')!r}")
        if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise TokenizerError(f"{where}: BPE options byte_fallback/continuing_subword_prefix/end_of_word_suffix "
                                 "are not byte-level BPE; not supported")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        normalizer = doc.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            raise TokenizerError(f"{where}: normalizer {normalizer.get('type')!r} is not supported (only NFC or none)")
        pattern = cls._pattern_of(doc.get("pre_tokenizer"), where)
        decoder = doc.get("decoder")
        if decoder is not None and decoder.get("type") != "ByteLevel":
            raise TokenizerError(f"{where}: decoder {decoder.get('type')!r} is not supported (only ByteLevel)")
        post = doc.get("post_processor")
        if post is not None and post.get("type") not in ("ByteLevel",):
            raise TokenizerError(f"{where}: post_processor {post.get('type')!r} would add tokens; not supported")
        specials = {t["content"]: int(t["id"]) for t in doc.get("added_tokens", [])}
        return cls(model["vocab"], merges, specials, pattern=pattern, nfc=normalizer is not None,
                   ignore_merges=bool(model.get("ignore_merges", False)))

    @staticmethod
    def _pattern_of(pre: dict | None, where: str) -> str:
        """The split expression of a ``Sequence[Split, ByteLevel]`` or a ``ByteLevel(use_regex)`` pre-tokenizer."""
        gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
        steps = (pre or {}).get("pretokenizers", [pre]) if pre else []
        pattern = None
        for step in steps:
            kind = step.get("type")
            if kind == "Split":
                if step.get("behavior") != "Isolated" or step.get("invert"):
                    raise TokenizerError(f"{where}: Split pre-tokenizer must be Isolated, not inverted")
                pattern = step["pattern"].get("Regex")
                if pattern is None:
                    raise TokenizerError(f"{where}: Split pre-tokenizer needs a Regex pattern")
            elif kind == "ByteLevel":
                if step.get("add_prefix_space"):
                    raise TokenizerError(f"{where}: ByteLevel add_prefix_space=true is not supported")
                if step.get("use_regex", True):
                    pattern = gpt2
            else:
                raise TokenizerError(f"{where}: pre-tokenizer {kind!r} is not supported (Split, ByteLevel)")
        if pattern is None:
            raise TokenizerError(f"{where}: no pre-tokenizer expression found; expected Split + ByteLevel")
        return pattern


def train_bpe(
    text: str, vocab_size: int, special_tokens: Sequence[str] = (ENDOFTEXT,), pattern: str = QWEN_PATTERN
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``text``: 256 byte tokens, then the most frequent adjacent pair
    merged again and again (counted over pre-tokens, never across them), then the special tokens.

    Deterministic: ties between equally frequent pairs go to the pair of smaller token ids. Pair counts
    are updated incrementally (only the words that contain the merged pair are touched), so ~4000
    merges over a few MB take seconds, not hours.
    """
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    probe = Tokenizer({c: b for b, c in bytes_to_unicode().items()}, [], {}, pattern=pattern)
    specials_re = re.compile("|".join(map(re.escape, special_tokens))) if special_tokens else None
    counts: Counter[str] = Counter()
    for chunk in (specials_re.split(text) if specials_re else [text]):
        counts.update(probe.pre_tokenize(chunk))
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    names = [bytes_to_unicode()[b] for b in range(256)]  # token id -> string

    pair_count: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[wi]
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed again when it changed
        if -neg < 2:
            break
        new_id = len(names)
        names.append(names[pair[0]] + names[pair[1]])
        merges.append((names[pair[0]], names[pair[1]]))
        changed: set[tuple[int, int]] = set()
        for wi in list(where.get(pair, ())):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                changed.add(p)
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == pair[0] and w[i + 1] == pair[1]:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            kept = set(zip(out, out[1:]))
            for p in zip(w, w[1:]):
                if p not in kept:
                    where[p].discard(wi)
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where.setdefault(p, set()).add(wi)
                changed.add(p)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
    vocab = {name: i for i, name in enumerate(names)}
    specials = {tok: len(names) + k for k, tok in enumerate(special_tokens)}
    return Tokenizer(vocab, merges, specials, pattern=pattern)


def default_tokenizer_path() -> Path:
    """``data/tokenizer.json`` of the repository: the course model's tokenizer."""
    return Path(__file__).resolve().parent.parent / "data" / "tokenizer.json"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The course tokenizer (``data/tokenizer.json``), or the ``tokenizer.json`` at ``path``."""
    return Tokenizer.from_file(default_tokenizer_path() if path is None else path)
