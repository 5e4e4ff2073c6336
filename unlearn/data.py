"""What to forget and what to keep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .datasets import ImageTensorDataset, as_image_dataset
from .errors import ConfigError, DataError


@dataclass
class ConceptPrompts:
    """What a generative model is asked to forget, in its own conditions, and how erasure is judged.

    Conditions are prompts (text-to-image) or class ids (class-conditional DDPM).

    Attributes:
        concept: the erased concept as the user named it ("three", "nudity", "3").
        forget: conditions that name the concept: the methods train on them, and `erasure_rate` is measured on
            them (the exact prompts).
        anchor: what the concept should turn into, one per forget condition (SalUn's pseudo prompt or class c',
            ESD's anchor); the empty prompt / null class means "unconditional".
        paraphrases: other wordings of the concept that no method sees: `erasure_rate_paraphrase` is measured
            on them, because erasure that a synonym undoes is not erasure.
        retain: conditions that must survive, with `retain_labels`, the judge label each should produce.
        concept_label: the judge's label for the concept (None: no judge knows it, or several concepts).
        neighbor_labels: retained judge labels that are the erased concept's neighbours (the digits next to
            it): over-erasure shows there first, so they are scored apart (`neighbor_accuracy`).
        parts: for several concepts erased together, one single-concept `ConceptPrompts` each; this object
            then holds all their forget / anchor pairs and paraphrases, and what none of them erases as retain.
        factor: in a world of two factors (the digits × styles world: "digit" or "style"), the factor the
            concept belongs to; `retain_labels` are then labels of that factor ("in-domain"), and
            `retain_cross_labels` give each retain condition's label on the other factor ("cross-domain",
            UnlearnCanvas' retainability, reference/attacks.md §1.6). None in a world of one factor.
        retain_cross_labels: one label of the other factor per retain condition (two-factor worlds), else empty.
    """

    concept: str
    forget: list
    anchor: list
    paraphrases: list = field(default_factory=list)
    retain: list = field(default_factory=list)
    retain_labels: list = field(default_factory=list)
    concept_label: int | None = None
    neighbor_labels: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    factor: str | None = None
    retain_cross_labels: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.forget:
            raise DataError(
                f"the forget set is empty: concept {self.concept!r} has no forget prompt or class"
            )
        if len(self.anchor) not in (1, len(self.forget)):
            raise DataError(
                f"give one anchor, or one per forget condition ({len(self.forget)}), not {len(self.anchor)}"
            )
        if len(self.anchor) == 1:
            self.anchor = list(self.anchor) * len(self.forget)
        if len(self.retain_labels) not in (0, len(self.retain)):
            raise DataError("retain_labels must give one judge label per retain condition")
        if len(self.retain_cross_labels) not in (0, len(self.retain)):
            raise DataError(
                "retain_cross_labels must give one label of the other factor per retain condition"
            )

    def split(self) -> list[ConceptPrompts]:
        """One `ConceptPrompts` per erased concept (a method that trains one thing per concept, such as ANT's
        LoRAs, iterates over them); `[self]` for a single concept."""
        return list(self.parts) or [self]

    @classmethod
    def merge(
        cls,
        parts: Sequence[ConceptPrompts],
        retain: list,
        retain_labels: list,
        retain_cross_labels: Sequence = (),
    ) -> ConceptPrompts:
        """Several concepts erased together: all their forget / anchor pairs and paraphrases, one retain set."""
        parts = list(parts)
        for part in parts:
            part.retain, part.retain_labels = list(retain), list(retain_labels)
            part.retain_cross_labels = list(retain_cross_labels)
        if len(parts) == 1:
            return parts[0]
        erased = {p.concept_label for p in parts}
        neighbors = {n for p in parts for n in p.neighbor_labels} - erased
        return cls(
            concept="+".join(p.concept for p in parts),
            forget=[c for p in parts for c in p.forget],
            anchor=[a for p in parts for a in p.anchor],
            paraphrases=[c for p in parts for c in p.paraphrases],
            retain=list(retain),
            retain_labels=list(retain_labels),
            neighbor_labels=sorted(neighbors),
            parts=parts,
            factor=parts[0].factor,
            retain_cross_labels=list(retain_cross_labels),
        )


@dataclass
class UnlearnData:
    """Forget / retain / test sets of one unlearning task.

    Attributes:
        forget: training examples to forget (D_f).
        retain: training examples to keep (D_r).
        test: held-out examples the model must still get right. For class-wise forgetting the forgotten
            classes are removed from it (the OPTML convention: TA is measured on the remaining classes).
        test_forget: held-out examples of the forgotten classes (empty for random forgetting).
        num_classes: number of classes of the classifier.
        forget_classes: the forgotten class ids, or () for random-example forgetting.
        prompts: for generative models, the concept's conditions (forget, anchor, paraphrases, retain). Their
            forget / retain sets yield `(image, condition)` pairs: a class id, or a prompt.
    """

    forget: ImageTensorDataset
    retain: ImageTensorDataset
    test: ImageTensorDataset
    test_forget: ImageTensorDataset
    num_classes: int
    forget_classes: tuple[int, ...] = ()
    prompts: ConceptPrompts | None = None

    def describe(self) -> str:
        if self.prompts is not None:
            return (
                f"erase {self.prompts.concept!r}: {len(self.forget)} forget / {len(self.retain)} retain images, "
                f"{len(self.prompts.forget)} forget / {len(self.prompts.paraphrases)} paraphrase / "
                f"{len(self.prompts.retain)} retain conditions"
            )
        what = f"classes {list(self.forget_classes)}" if self.forget_classes else "random examples"
        return f"forget {what}: {len(self.forget)} forget / {len(self.retain)} retain / {len(self.test)} test examples"


def concept_task(prompts: ConceptPrompts) -> UnlearnData:
    """A text-to-image (or class-conditional) erasure task given by its prompts alone, for the methods that
    train on prompts only (UCE, ESD, DoCo, ANT): its image sets are empty."""
    empty = ImageTensorDataset(torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long), 1, "none")
    return UnlearnData(
        forget=empty, retain=empty, test=empty, test_forget=empty, num_classes=0, prompts=prompts
    )


def _same_classes(train, test) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Any two map-style `(image, label)` datasets as `ImageTensorDataset`s that agree on the number of
    classes (a test split may lack the last class)."""
    train, test = as_image_dataset(train, "train"), as_image_dataset(test, "test")
    classes = max(train.num_classes, test.num_classes)
    if train.num_classes != classes:
        train = ImageTensorDataset(train.images, train.labels, classes, train.name)
    if test.num_classes != classes:
        test = ImageTensorDataset(test.images, test.labels, classes, test.name)
    return train, test


def forget_classes(train, test, classes: Sequence[int]) -> UnlearnData:
    """Class-wise forgetting: every training example of `classes` is forgotten.

    `train` and `test` are `ImageTensorDataset`s or any map-style datasets of `(image, label)` pairs (a
    `TensorDataset`, a torchvision dataset; see `as_image_dataset`)."""
    train, test = _same_classes(train, test)
    classes = tuple(sorted({int(c) for c in classes}))
    if not classes:
        raise DataError("the forget set is empty: name at least one class to forget")
    bad = [c for c in classes if not 0 <= c < train.num_classes]
    if bad:
        raise DataError(
            f"class id {bad[0]} is out of range: this dataset has classes 0..{train.num_classes - 1}"
        )
    if len(classes) == train.num_classes:
        raise DataError("cannot forget every class: nothing would be left to retain")
    forgotten = torch.tensor(classes)
    in_train = torch.isin(train.labels, forgotten)
    in_test = torch.isin(test.labels, forgotten)
    if not in_train.any():
        raise DataError(f"the forget set is empty: no training example has class {list(classes)}")
    return UnlearnData(
        forget=train.subset(in_train.nonzero().flatten()),
        retain=train.subset((~in_train).nonzero().flatten()),
        test=test.subset((~in_test).nonzero().flatten()),
        test_forget=test.subset(in_test.nonzero().flatten()),
        num_classes=train.num_classes,
        forget_classes=classes,
    )


def forget_fraction(train, test, fraction: float | Mapping[int, float], seed: int = 0) -> UnlearnData:
    """Random-example forgetting: a seeded random `fraction` of the training examples is forgotten; or, with a
    mapping {class id: share}, a seeded random int(share × class size) examples of each named class (LAF's
    random-data protocol is {5: 0.4, 6: 0.4, 7: 0.4, 8: 0.4, 9: 0.4}). `train` and `test` as in
    `forget_classes`."""
    train, test = _same_classes(train, test)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(fraction, Mapping):
        forget_idx = _class_shares(train, fraction, generator)
    else:
        if not 0.0 < fraction < 1.0:
            raise DataError(f"forget fraction must lie strictly between 0 and 1, got {fraction}")
        count = round(fraction * len(train))
        if count == 0:
            raise DataError(f"the forget set is empty: {fraction} of {len(train)} examples rounds to 0")
        order = torch.randperm(len(train), generator=generator)
        forget_idx, _ = order[:count].sort()
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[forget_idx] = False
    if not keep.any():
        raise DataError("cannot forget every training example: nothing would be left to retain")
    return UnlearnData(
        forget=train.subset(forget_idx),
        retain=train.subset(keep.nonzero().flatten()),
        test=test,
        test_forget=test.subset(torch.zeros(0, dtype=torch.long)),
        num_classes=train.num_classes,
        forget_classes=(),
    )


def _class_shares(
    train: ImageTensorDataset, shares: Mapping[int, float], generator: torch.Generator
) -> torch.Tensor:
    """Sorted indices of a random int(share × class size) examples of each class in `shares`."""
    if not shares or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c < train.num_classes for c in shares
    ):
        raise ConfigError(
            f"data.forget_fraction as a mapping needs class ids 0..{train.num_classes - 1} as keys, "
            f"got {dict(shares)!r}"
        )
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in shares.values()
    ):
        raise ConfigError(
            f"each class share in data.forget_fraction must lie in (0, 1], got {dict(shares)!r}"
        )
    chosen = []
    for label in sorted(shares):
        members = (train.labels == label).nonzero().flatten()
        count = int(shares[label] * len(members))  # the reference's int(): rounds down
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    forget_idx, _ = torch.cat(chosen).sort()
    if len(forget_idx) == 0:
        raise DataError(f"the forget set is empty: the shares {dict(shares)!r} select no example")
    return forget_idx


def forget_digits_concept(
    train: ImageTensorDataset,
    test: ImageTensorDataset,
    conditioning: str,
    concept: str | Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    anchor: str | int | None = None,
    seed: int = 0,
) -> UnlearnData:
    """Erasure in the digits world: a class of the class-conditional DDPM, or a digit concept ("three" / "3")
    of the text-to-image model, whose exact prompts, paraphrases and retained captions come from the world.

    The forget set holds the class's training images with their conditions (the class id, or one of the
    concept's exact prompts); the retain set every other training image (with any caption of its class).
    The default anchor is the next digit ((c + 1) mod 10, as SalUn's pseudo label), in the same wording.
    `concept` may list several digits, erased together (`prompts.split()` gives one task per concept); the
    digits next to an erased one are its neighbours (`neighbor_labels`), kept and scored apart.
    """
    from .datasets import CaptionedDataset
    from .worlds.digits_text import CAPTIONS, concept_prompts

    if conditioning == "class":
        if not classes or len(classes) != 1:
            raise DataError(
                "a class-conditional diffusion model erases one class at a time: give one forget_class"
            )
        task = forget_classes(train, test, classes)
        label = task.forget_classes[0]
        kept = [c for c in range(train.num_classes) if c != label]
        task.prompts = ConceptPrompts(
            concept=str(label),
            forget=[label],
            anchor=[(label + 1) % train.num_classes if anchor is None else int(anchor)],
            retain=kept,
            retain_labels=kept,
            concept_label=label,
            neighbor_labels=[(label - 1) % train.num_classes, (label + 1) % train.num_classes],
        )
        return task
    if conditioning != "text" or not concept:
        raise DataError("the digits text-to-image model erases a concept: give data.concept (e.g. three)")
    concepts = [concept] if isinstance(concept, str) else [str(c) for c in concept]
    erased = [concept_prompts(name)[0] for name in concepts]
    parts = []
    for name in concepts:
        label, exact, paraphrases = concept_prompts(name)
        if anchor is None:  # the next digit that is not erased too
            key = name.strip().lower()
            next_label = next((label + k) % 10 for k in range(1, 10) if (label + k) % 10 not in erased)
            next_key = str(next_label) if key.isdigit() else _digit_word(next_label)
            anchors = [" ".join(next_key if w == key else w for w in p.split()) for p in exact]
        else:
            anchors = [str(anchor)]
        parts.append(
            ConceptPrompts(
                concept=name,
                forget=exact,
                anchor=anchors,
                paraphrases=paraphrases,
                concept_label=label,
                neighbor_labels=[(label - 1) % 10, (label + 1) % 10],
            )
        )
    labels = [p.concept_label for p in parts]
    if len(set(labels)) < len(labels):
        raise DataError(f"data.concept names the same digit twice: {concepts}")
    task = forget_classes(train, test, labels)
    kept = [c for c in range(10) if c not in labels]
    retain = [caption for c in kept for caption in CAPTIONS[c]]
    retain_labels = [c for c in kept for _ in CAPTIONS[c]]
    for part in parts:
        part.neighbor_labels = [n for n in part.neighbor_labels if n in kept]
    task.forget = CaptionedDataset(task.forget, {p.concept_label: p.forget for p in parts}, seed=seed)
    task.retain = CaptionedDataset(task.retain, CAPTIONS, seed=seed)
    task.prompts = ConceptPrompts.merge(parts, retain, retain_labels)
    return task


def forget_canvas_concept(
    train: ImageTensorDataset,
    test: ImageTensorDataset,
    concept: str | Sequence[str],
    anchor: str | None = None,
    seed: int = 0,
) -> UnlearnData:
    """Erasure in the digits × styles world (`worlds.canvas_text`): a style ("bold") or a digit ("three"), or
    several of one factor erased together.

    The forget set holds every training image of the concept's (digit, style) pairs, each captioned with one of
    its exact prompts (those that name the concept as the user did); the paraphrases name it the other way
    ("heavy" for "bold", "3" for "three"). The retain conditions are the captions of every other pair, labelled
    by the concept's factor (`retain_labels`, in-domain) and by the other factor (`retain_cross_labels`,
    cross-domain), ordered so that each label's captions cycle through the other factor first (any multiple of
    its size is balanced). The default anchor is the next label of the factor that is not erased (the next
    style, as the digits world's next digit), in the same wording.
    """
    from .datasets import CaptionedDataset
    from .worlds.canvas_text import (
        CAPTIONS,
        STYLE_NEIGHBOURS,
        STYLES,
        SYNONYMS,
        combination,
        erased_factor,
        other_word,
    )
    from .worlds.digits_text import NUMBER_WORDS, NUMERALS

    concepts = [concept] if isinstance(concept, str) else [str(c) for c in concept]
    factor, found = erased_factor(concepts)
    erased = [label for _, label, _ in found]
    size, other_size = (len(STYLES), 10) if factor == "style" else (10, len(STYLES))

    def pair(label: int, other: int) -> int:
        return combination(other, label) if factor == "style" else combination(label, other)

    def word_of(label: int, like: str) -> str:
        """The word of `label` in the wording of `like` (a style name or synonym, a number word or numeral)."""
        if factor == "style":
            return SYNONYMS[STYLES[label]] if like in SYNONYMS.values() else STYLES[label]
        return NUMERALS[label] if like.isdigit() else NUMBER_WORDS[label]

    parts, forget_captions = [], {}
    for name, (_, label, word) in zip(concepts, found):
        captions = [c for o in range(other_size) for c in CAPTIONS[pair(label, o)]]
        exact = [c for c in captions if word in c.split()]
        paraphrases = [c for c in captions if other_word(word) in c.split()]
        for o in range(other_size):
            forget_captions[pair(label, o)] = [c for c in CAPTIONS[pair(label, o)] if word in c.split()]
        if anchor is None:
            next_label = next((label + k) % size for k in range(1, size) if (label + k) % size not in erased)
            swap = word_of(next_label, word)
            anchors = [" ".join(swap if w == word else w for w in c.split()) for c in exact]
        else:
            anchors = [str(anchor)]
        if factor == "style":
            neighbors = [STYLES.index(n) for n in STYLE_NEIGHBOURS[STYLES[label]]]
        else:
            neighbors = [(label - 1) % 10, (label + 1) % 10]
        parts.append(
            ConceptPrompts(
                concept=name,
                forget=exact,
                anchor=anchors,
                paraphrases=paraphrases,
                concept_label=label,
                neighbor_labels=[n for n in neighbors if n not in erased],
                factor=factor,
            )
        )
    task = forget_classes(train, test, sorted(forget_captions))
    retain, retain_labels, retain_cross = [], [], []
    for label in (k for k in range(size) if k not in erased):
        for wording in range(len(CAPTIONS[0])):
            for o in range(other_size):
                retain.append(CAPTIONS[pair(label, o)][wording])
                retain_labels.append(label)
                retain_cross.append(o)
    task.forget = CaptionedDataset(task.forget, forget_captions, seed=seed)
    task.retain = CaptionedDataset(task.retain, CAPTIONS, seed=seed)
    task.prompts = ConceptPrompts.merge(parts, retain, retain_labels, retain_cross)
    return task


def _digit_word(label: int) -> str:
    from .worlds.digits_text import NUMBER_WORDS

    return NUMBER_WORDS[label]


def forget_generated_concept(
    model,
    concept: str | Sequence[str],
    forget_prompts: Sequence[str] | None = None,
    paraphrases: Sequence[str] | None = None,
    retain_prompts: Sequence[str] | None = None,
    anchor: str | None = None,
    num_images: int = 64,
    concept_label: int | Sequence[int] | None = None,
    retain_labels: Sequence[int] | None = None,
    guidance: float = 7.5,
    steps: int = 25,
    seed: int = 0,
) -> UnlearnData:
    """Concept erasure without a dataset (Stable Diffusion): the original model draws its own forget and retain
    images, `num_images` each, from the forget prompts and from the retain prompts (or the anchor), as SalUn's
    SD code does for nudity (800 images of the nude prompt, 800 of the clothed one). `concept` may list several
    concepts (100 celebrities): the forget prompts and paraphrases are then templates over "{concept}", and
    `concept_label`, when the judge knows them, lists one label per concept.
    """
    from .datasets import CaptionedDataset

    anchor = "" if anchor is None else str(anchor)
    keep = list(retain_prompts or ([anchor] if anchor else []))
    if not keep:
        raise DataError("nothing to retain: give data.retain_prompts or a non-empty data.anchor")
    parts = []
    if not isinstance(concept, str):  # several concepts: the prompts are templates over "{concept}"
        templates, paraphrase_templates = list(forget_prompts or ["{concept}"]), list(paraphrases or [])
        labels = list(concept_label) if isinstance(concept_label, (list, tuple)) else [None] * len(concept)
        if len(labels) != len(concept):
            raise DataError(
                f"give one concept label per concept: {len(labels)} labels for {len(concept)} concepts"
            )
        parts = [
            ConceptPrompts(
                concept=name,
                forget=[t.format(concept=name) for t in templates],
                anchor=[anchor],
                paraphrases=[t.format(concept=name) for t in paraphrase_templates],
                concept_label=label,
            )
            for name, label in zip(concept, labels)
        ]
        prompts = ConceptPrompts.merge(parts, keep, list(retain_labels or []))
        concept, forget_prompts, paraphrases = prompts.concept, prompts.forget, prompts.paraphrases
    forget_prompts = list(forget_prompts or [concept])

    def drawn(texts: list[str], offset: int) -> CaptionedDataset:
        conditions = [texts[i % len(texts)] for i in range(num_images)]
        images = model.generate(conditions, steps=steps, guidance=guidance, seed=seed + offset)
        labels = torch.tensor([i % len(texts) for i in range(num_images)])
        base = ImageTensorDataset(images, labels, len(texts), "generated")
        return CaptionedDataset(base, {i: [p] for i, p in enumerate(texts)}, seed=seed)

    forget, retain = drawn(forget_prompts, 0), drawn(keep, 1)
    empty = ImageTensorDataset(forget.dataset.images[:0], torch.zeros(0, dtype=torch.long), 1, "generated")
    if not parts:
        prompts = ConceptPrompts(
            concept=concept,
            forget=forget_prompts,
            anchor=[anchor],
            paraphrases=list(paraphrases or []),
            retain=keep,
            retain_labels=list(retain_labels or []),
            concept_label=concept_label,
        )
    return UnlearnData(
        forget=forget,
        retain=retain,
        test=empty,
        test_forget=empty,
        num_classes=0,
        prompts=prompts,
    )
