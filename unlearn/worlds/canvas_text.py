"""The digits × styles world ("canvas"): styles as image transforms, captions, concepts and the tokenizer.

A small UnlearnCanvas (reference/attacks.md §1.6): every digit is drawn in each of five styles, deterministic
transforms of the same 16x16 image (the 8x8 digit scaled to 12x12 and centred):

- thin: strokes thinned by a steep contrast curve;
- bold: strokes brightened and widened by one pixel (2x2 dilation);
- outlined: the rim around each stroke only (3x3 dilation minus the stroke);
- inverted: dark strokes on white;
- slanted: sheared to the right (x += 0.4 y, as italic type).

Each (digit, style) pair has four captions "a {digit} in {style} style", with the digit as a word or a numeral
and the style by its name or its synonym (`SYNONYMS`: "bold" and "heavy"). The model trains on all four, so a
concept has exact prompts (the captions that name it) and paraphrases (those that name it the other way):
erasing "bold" is tested on "heavy", erasing "three" on "3".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .digits_text import NUMBER_WORDS, NUMERALS

STYLES = ("thin", "bold", "outlined", "inverted", "slanted")
SYNONYMS = {
    "thin": "fine",
    "bold": "heavy",
    "outlined": "hollow",
    "inverted": "negative",
    "slanted": "italic",
}
# The styles scored apart as an erased style's neighbours: those made by a kindred transform (stroke width:
# thin / bold; dilation: bold / outlined; the bright background of inverted is closest to bold's wide strokes;
# slanted keeps the plain stroke as thin does).
STYLE_NEIGHBOURS = {
    "thin": ("bold", "slanted"),
    "bold": ("thin", "outlined"),
    "outlined": ("bold",),
    "inverted": ("bold",),
    "slanted": ("thin",),
}
TEMPLATE = "a {digit} in {style} style"
IMAGE_SIZE = 16
DIGIT_SIZE = 12  # the 8x8 digit is scaled to this and centred
SHEAR = 0.4
TOKENIZER_DIR = Path(__file__).with_name("canvas_tokenizer")
MODEL_MAX_LENGTH = 16  # <|startoftext|> a three in bold style <|endoftext|> = 7 tokens


def combination(digit: int, style: int) -> int:
    """The class id of a (digit, style) pair in the world's datasets: digit × 5 + style."""
    return digit * len(STYLES) + style


def digit_of(label: torch.Tensor | int):
    """The digit of a combination id (or a tensor of them)."""
    return label // len(STYLES)


def style_of(label: torch.Tensor | int):
    """The style index of a combination id (or a tensor of them)."""
    return label % len(STYLES)


def stylize(images: torch.Tensor, style: str) -> torch.Tensor:
    """The 8x8 digits `images` (N, 1, 8, 8) in [0, 1] drawn at 16x16 in `style`; deterministic."""
    pad = (IMAGE_SIZE - DIGIT_SIZE) // 2
    plain = F.interpolate(images.float(), size=DIGIT_SIZE, mode="bilinear", align_corners=False)
    plain = F.pad(plain, (pad, pad, pad, pad)).clamp(0, 1)
    if style == "thin":
        out = (plain - 0.45) * 2.5
    elif style == "bold":
        out = F.max_pool2d(F.pad(plain * 1.5, (0, 1, 0, 1)), 2, 1)
    elif style == "outlined":
        out = (F.max_pool2d(plain, 3, 1, 1) - plain) * 2
    elif style == "inverted":
        out = 1 - plain
    elif style == "slanted":
        theta = torch.tensor([[1.0, SHEAR, 0.0], [0.0, 1.0, 0.0]]).expand(len(plain), 2, 3)
        grid = F.affine_grid(theta, list(plain.shape), align_corners=False)
        out = F.grid_sample(plain, grid, align_corners=False)
    else:
        raise ConfigError(f"unknown style {style!r}; the canvas world's styles: {', '.join(STYLES)}")
    return out.clamp(0, 1)


def _captions(label: int) -> list[str]:
    digit, style = digit_of(label), STYLES[style_of(label)]
    return [
        TEMPLATE.format(digit=d, style=s)
        for d in (NUMBER_WORDS[digit], NUMERALS[digit])
        for s in (style, SYNONYMS[style])
    ]


CAPTIONS: dict[int, list[str]] = {label: _captions(label) for label in range(10 * len(STYLES))}
WORDS: tuple[str, ...] = tuple(sorted({w for caps in CAPTIONS.values() for c in caps for w in c.split()}))


def concept_factor(concept: str) -> tuple[str, int, str]:
    """Which factor a concept names, its label in that factor's judge and its own word.

    Returns:
        `("style", style index, word)` for a style name or synonym, `("digit", digit, word)` for a number word
        or numeral.

    Raises:
        ConfigError: the concept is neither.
    """
    key = concept.strip().lower() if isinstance(concept, str) else str(concept)
    for index, style in enumerate(STYLES):
        if key in (style, SYNONYMS[style]):
            return "style", index, key
    if key in NUMBER_WORDS:
        return "digit", NUMBER_WORDS.index(key), key
    if key in NUMERALS:
        return "digit", int(key), key
    raise ConfigError(
        f"unknown canvas concept {concept!r}; accepted concepts: a style ({', '.join(STYLES)} or a synonym: "
        f"{', '.join(SYNONYMS.values())}) or a digit (zero..nine, 0..9)"
    )


def erased_factor(concepts: list[str]) -> tuple[str, list[tuple[str, int, str]]]:
    """The factor of concepts erased together and each one's `concept_factor`.

    Raises:
        ConfigError: a concept is neither a style nor a digit.
        DataError: they mix styles and digits, name one twice, or name every style or every digit.
    """
    from ..errors import DataError

    found = [concept_factor(str(c)) for c in concepts]
    factor = found[0][0]
    if any(f != factor for f, _, _ in found):
        raise DataError(
            f"data.concept mixes styles and digits ({concepts}); erase concepts of one factor at a time"
        )
    labels = [label for _, label, _ in found]
    if len(set(labels)) < len(labels):
        raise DataError(f"data.concept names the same {factor} twice: {concepts}; name each once")
    if len(labels) >= (len(STYLES) if factor == "style" else 10):
        raise DataError(f"data.concept erases every {factor}: nothing would be left to retain; erase fewer")
    return factor, found


def other_word(word: str) -> str:
    """The other wording of a concept word: a style's synonym (and back), a number word's numeral (and back)."""
    for style, synonym in SYNONYMS.items():
        if word in (style, synonym):
            return synonym if word == style else style
    if word in NUMBER_WORDS:
        return NUMERALS[NUMBER_WORDS.index(word)]
    return NUMBER_WORDS[int(word)]


def load_canvas_tokenizer(folder: Path = TOKENIZER_DIR):
    """The canvas world's CLIPTokenizer, from the files shipped in the package (no download)."""
    from .digits_text import load_digits_tokenizer

    return load_digits_tokenizer(folder, MODEL_MAX_LENGTH)


def write_tokenizer_files(folder: Path = TOKENIZER_DIR) -> None:
    """Write the shipped `canvas_tokenizer/` (every caption word one token; see `digits_text`)."""
    from .digits_text import write_tokenizer_files as write

    write(folder, WORDS)
