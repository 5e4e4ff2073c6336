"""Captions of the digits world and the tokenizer that reads them.

Each digit class has word-form captions ("a handwritten digit three") and numeral-form captions ("the number
3"). The text-to-image model of the digits world trains on all of them, so a concept ("three") has exact
prompts (the captions that name it) and paraphrases (the captions of the same class that name it otherwise),
which is what concept-erasure metrics need to test whether an erasure generalises beyond the words it saw.

The tokenizer (`digits_tokenizer/`, shipped in the package) is a CLIP BPE tokenizer whose merges build every
caption word, left to right, into a single token. `write_tokenizer_files` regenerates it from `WORDS`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(n) for n in range(10))
WORD_TEMPLATES = ("{w}", "a handwritten digit {w}", "the number {w}", "a drawing of a {w}", "the digit {w}")
NUMERAL_TEMPLATES = ("{n}", "a handwritten {n}", "the number {n}", "digit {n}")
TOKENIZER_DIR = Path(__file__).with_name("digits_tokenizer")
# Longest caption: <|startoftext|> a drawing of a three <|endoftext|> = 7 tokens; 16 leaves room for
# user prompts while keeping the text encoder's attention cheap.
MODEL_MAX_LENGTH = 16
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def _captions(label: int) -> list[str]:
    words = [t.format(w=NUMBER_WORDS[label]) for t in WORD_TEMPLATES]
    numerals = [t.format(n=NUMERALS[label]) for t in NUMERAL_TEMPLATES]
    return words + numerals


CAPTIONS: dict[int, list[str]] = {label: _captions(label) for label in range(10)}
WORDS: tuple[str, ...] = tuple(sorted({w for caps in CAPTIONS.values() for c in caps for w in c.split()}))
CONCEPTS: tuple[str, ...] = NUMBER_WORDS + NUMERALS


def concept_prompts(concept: str) -> tuple[int, list[str], list[str]]:
    """The class of a digit concept, its exact prompts and its paraphrases.

    Args:
        concept: a number word ("three") or a numeral ("3").

    Returns:
        `(label, exact, paraphrases)`: for "three", the captions of class 3 that contain the word "three"
        and the other captions of class 3 (the numeral forms); for "3", the reverse.

    Raises:
        ConfigError: the concept is neither a number word nor a numeral.
    """
    key = concept.strip().lower()
    if key in NUMBER_WORDS:
        label = NUMBER_WORDS.index(key)
    elif key in NUMERALS:
        label = int(key)
    else:
        raise ConfigError(f"unknown digits concept {concept!r}; accepted concepts: {', '.join(CONCEPTS)}")
    captions = CAPTIONS[label]
    exact = [c for c in captions if key in c.split()]
    paraphrases = [c for c in captions if key not in c.split()]
    return label, exact, paraphrases


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable characters (the BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tokenizer_vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary and merge list in which each of `words` is one token.

    The alphabet is all 256 byte symbols with and without the end-of-word mark, so any text still tokenizes
    (into characters) rather than into unknown tokens. Each word in turn is split by the merges so far (as the
    tokenizer will split it), and its first two pieces are merged until it is one piece: "t h", "th r", "thr e",
    "thre e</w>". A new merge ranks after all earlier ones, so it never changes how an earlier word splits;
    every merged piece enters the vocabulary.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    rank: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], rank)
        while len(pieces) > 1:
            rank[pieces[0], pieces[1]] = len(merges)
            merges.append(f"{pieces[0]} {pieces[1]}")
            if pieces[0] + pieces[1] not in vocab_list:
                vocab_list.append(pieces[0] + pieces[1])
            pieces = _bpe(pieces, rank)
    vocab_list += list(SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(vocab_list)}, merges


def _bpe(pieces: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as CLIP's tokenizer does it: merge the adjacent pair of lowest rank until none is left."""
    while len(pieces) > 1:
        pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def write_tokenizer_files(folder: Path = TOKENIZER_DIR, words: tuple[str, ...] = WORDS) -> None:
    """Write `vocab.json` and `merges.txt` (the files that ship in `digits_tokenizer/`) for `words`."""
    vocab, merges = tokenizer_vocab_and_merges(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def load_digits_tokenizer(folder: Path = TOKENIZER_DIR, model_max_length: int = MODEL_MAX_LENGTH):
    """The digits world's CLIPTokenizer (or another world's, from its `folder`), from the files shipped in the
    package (no download)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
