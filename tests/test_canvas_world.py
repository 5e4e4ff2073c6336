"""The digits × styles world (a small UnlearnCanvas): styles, captions, the erasure task, the recipe checks, and
the harness's in-domain / cross-domain retainability, scored on the real styled images and on a tiny model."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusion import TINY_T2I, TINY_TEXT

from unlearn.data import forget_canvas_concept
from unlearn.datasets import load_dataset
from unlearn.errors import ConfigError, DataError
from unlearn.worlds import canvas_text, digits_canvas
from unlearn.worlds.canvas_text import CAPTIONS, STYLES, combination, digit_of, style_of, stylize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def canvas():
    return load_dataset("digits_canvas", "train"), load_dataset("digits_canvas", "test")


def test_styles_are_deterministic_distinct_transforms_of_the_same_digits():
    digits = load_dataset("digits", "test").images[:50]
    drawn = {style: stylize(digits, style) for style in STYLES}
    for style, images in drawn.items():
        assert images.shape == (50, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
        assert torch.equal(images, stylize(digits, style)), style
    for a in STYLES:
        for b in STYLES:
            if a < b:  # every pair of styles differs clearly on every image
                gap = (drawn[a] - drawn[b]).abs().flatten(1).mean(1)
                assert gap.min() > 0.03, (a, b, float(gap.min()))
    with pytest.raises(ConfigError, match="unknown style 'wavy'"):
        stylize(digits, "wavy")


def test_the_dataset_holds_every_digit_in_every_style(canvas):
    train, test = canvas
    digits_train = load_dataset("digits", "train")
    assert len(train) == len(STYLES) * len(digits_train) and train.num_classes == 50
    assert train.images.shape[1:] == (1, 16, 16)
    assert torch.equal(digit_of(train.labels[: len(digits_train)]), digits_train.labels)
    assert torch.equal(style_of(train.labels).bincount(), torch.full((len(STYLES),), len(digits_train)))
    assert len(test) == len(STYLES) * len(load_dataset("digits", "test"))


def test_the_tokenizer_ships_and_reads_every_caption_word_as_one_token(tmp_path):
    canvas_text.write_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt"):  # the shipped files are what the generator writes
        assert (tmp_path / name).read_text() == (canvas_text.TOKENIZER_DIR / name).read_text()
    tokenizer = canvas_text.load_canvas_tokenizer()
    for captions in CAPTIONS.values():
        assert len(captions) == 4
        for caption in captions:
            assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2, caption
    assert CAPTIONS[combination(3, STYLES.index("bold"))] == [
        "a three in bold style",
        "a three in heavy style",
        "a 3 in bold style",
        "a 3 in heavy style",
    ]


def test_concepts_name_a_style_or_a_digit_in_two_wordings():
    assert canvas_text.concept_factor("Bold") == ("style", STYLES.index("bold"), "bold")
    assert canvas_text.concept_factor("italic") == ("style", STYLES.index("slanted"), "italic")
    assert canvas_text.concept_factor("3") == ("digit", 3, "3")
    assert canvas_text.concept_factor("three") == ("digit", 3, "three")
    assert [canvas_text.other_word(w) for w in ("bold", "heavy", "three", "3")] == [
        "heavy",
        "bold",
        "3",
        "three",
    ]
    with pytest.raises(ConfigError, match="unknown canvas concept 'purple'"):
        canvas_text.concept_factor("purple")
    with pytest.raises(DataError, match="mixes styles and digits"):
        canvas_text.erased_factor(["bold", "three"])
    with pytest.raises(DataError, match="names the same style twice"):
        canvas_text.erased_factor(["bold", "heavy"])
    with pytest.raises(DataError, match="erases every style"):
        canvas_text.erased_factor(list(STYLES))


def test_erasing_a_style_forgets_its_images_and_keeps_the_rest_balanced(canvas):
    task = forget_canvas_concept(*canvas, "bold", seed=0)
    bold = STYLES.index("bold")
    prompts = task.prompts
    assert prompts.factor == "style" and prompts.concept_label == bold
    assert set(style_of(task.forget.labels).tolist()) == {bold}
    assert bold not in set(style_of(task.retain.labels).tolist())
    assert len(task.forget) + len(task.retain) == len(canvas[0])
    assert all("bold" in p.split() for p in prompts.forget) and len(prompts.forget) == 20
    assert all("heavy" in p.split() for p in prompts.paraphrases) and len(prompts.paraphrases) == 20
    assert prompts.anchor[0] == "a zero in outlined style"  # the next style, same wording
    assert all(text in prompts.forget for _, text in task.forget)  # trained on the exact prompts only
    # the retain conditions: the other four styles, each label cycling through the ten digits first
    assert sorted(set(prompts.retain_labels)) == [s for s in range(len(STYLES)) if s != bold]
    for label, digit, caption in zip(prompts.retain_labels, prompts.retain_cross_labels, prompts.retain):
        assert caption in CAPTIONS[combination(digit, label)]
    assert prompts.retain_cross_labels[:10] == list(range(10))
    assert prompts.neighbor_labels == [STYLES.index(n) for n in canvas_text.STYLE_NEIGHBOURS["bold"]]


def test_erasing_a_digit_is_the_mirror_image(canvas):
    task = forget_canvas_concept(*canvas, "3", seed=0)
    prompts = task.prompts
    assert prompts.factor == "digit" and prompts.concept_label == 3
    assert set(digit_of(task.forget.labels).tolist()) == {3}
    assert all("3" in p.split() for p in prompts.forget) and len(prompts.forget) == 2 * len(STYLES)
    assert all("three" in p.split() for p in prompts.paraphrases)
    assert prompts.anchor[0] == "a 4 in thin style"
    assert prompts.retain_cross_labels[: len(STYLES)] == list(range(len(STYLES)))
    assert prompts.neighbor_labels == [2, 4]


def test_two_styles_erased_together_are_scored_apart(canvas):
    task = forget_canvas_concept(*canvas, ["bold", "slanted"], seed=0)
    parts = task.prompts.split()
    assert [p.concept for p in parts] == ["bold", "slanted"]
    assert parts[0].anchor[0] == "a zero in outlined style" and parts[1].anchor[0] == "a zero in thin style"
    assert sorted(set(task.prompts.retain_labels)) == [
        STYLES.index(s) for s in ("thin", "outlined", "inverted")
    ]
    assert all(p.retain_cross_labels == task.prompts.retain_cross_labels for p in parts)


@pytest.mark.parametrize(
    "concept, error",
    [
        ("purple", "unknown canvas concept"),
        (["bold", "3"], "mixes styles and digits"),
        (list(STYLES), "every style"),
    ],
)
def test_a_recipe_refuses_what_the_world_cannot_erase(tmp_path, concept, error):
    from unlearn.recipe import from_dict

    raw = {
        "method": {"name": "uce"},
        "model": {"family": "diffusion", "checkpoint": "world:digits/canvas"},
        "data": {"dataset": "digits_canvas", "concept": concept},
    }
    with pytest.raises((ConfigError, DataError), match=error):
        from_dict(raw)


@pytest.fixture(scope="module")
def quick_judges(world_cache):
    """The world's judges trained for one epoch (the build trains 10): enough to tell digits and styles on
    real images, in seconds. They land in the session's world cache, where the harness finds them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits_canvas, "JUDGE_EPOCHS", 1)
        patch.setattr(digits_canvas, "MIN_JUDGE_ACCURACY", 80.0)
        for factor in digits_canvas.FACTORS:
            for second in (False, True):  # the second judges (MLPs, seconds) score the attacks
                digits_canvas.judge_path(factor, second, verbose=False)


class RealImages:
    """A stand-in generator that answers each prompt with a real held-out image of the asked digit and style
    (or, for the prompts of `swap`, of another style): what a perfect model, or a perfectly erased one, draws."""

    conditioning, device = "text", torch.device("cpu")

    def __init__(self, test, swap: dict[str, str] | None = None):
        self.test, self.swap = test, swap or {}
        self.unet = torch.nn.Linear(1, 1)  # what the harness keeps to write the edit file
        self.by_caption = {c: label for label, caps in CAPTIONS.items() for c in caps}

    def as_conditions(self, conditions):
        return list(conditions)

    def generate(self, prompts, seed=0, **kwargs):
        images = []
        for k, prompt in enumerate(prompts):
            for old, new in self.swap.items():
                prompt = prompt.replace(f" {old} ", f" {new} ")
            pool = (self.test.labels == self.by_caption[prompt]).nonzero().flatten()
            images.append(self.test.images[pool[(seed + k) % len(pool)]])
        return torch.stack(images)


def _harness(concept):
    from unlearn.harness.diffusion import DiffusionHarness
    from unlearn.recipe import from_dict

    recipe = from_dict(
        {
            "method": {"name": "uce"},
            "model": {"family": "diffusion", "checkpoint": "world:digits/canvas"},
            "data": {"dataset": "digits_canvas", "concept": concept},
            "eval": {"samples": 20},  # the default metrics: both factors' accuracies and FIDs
        }
    )
    return DiffusionHarness(recipe, torch.device("cpu"), log=lambda message: None)


@pytest.mark.parametrize("concept", ["bold", "three"])
def test_the_harness_scores_in_domain_and_cross_domain_retainability(canvas, quick_judges, concept):
    """A generator that draws what is asked scores 100 % erasure (the concept is all there) and full retainability;
    one that draws the erased style's prompts in another style scores 0 % erasure and the same retainability.
    Judges trained for one epoch: the rates are bounded, not exact."""
    harness = _harness(concept)
    task = harness.task(RealImages(canvas[1]))
    harness.names = list(harness.recipe.eval.metrics)
    harness.before(RealImages(canvas[1]), task, None)
    assert harness.cross_judge is not None
    faithful = harness.score(RealImages(canvas[1]), task).metrics
    assert faithful["erasure_rate"] >= 85 and faithful["erasure_rate_paraphrase"] >= 85, faithful
    assert faithful["retain_accuracy"] >= 85 and faithful["cross_domain_accuracy"] >= 85, faithful
    assert faithful["fid"] >= 0 and faithful["fid_cross"] >= 0
    swap = {"bold": "thin", "heavy": "fine"} if concept == "bold" else {"three": "eight", "3": "8"}
    erased = harness.score(RealImages(canvas[1], swap), task).metrics
    assert erased["erasure_rate"] <= 15 and erased["erasure_rate_paraphrase"] <= 15, erased
    assert erased["retain_accuracy"] == faithful["retain_accuracy"]
    assert erased["cross_domain_accuracy"] == faithful["cross_domain_accuracy"]


def test_a_tiny_canvas_model_erases_two_styles_end_to_end(tmp_path, quick_judges, tiny_canvas):
    """`unlearn erase` on a tiny (untrained) model of the world's shape: every metric of the two factors is
    written, and the edit file is there."""
    from unlearn.pipeline import run
    from unlearn.recipe import from_dict

    recipe = from_dict(
        {
            "method": {"name": "uce"},
            "model": {"family": "diffusion", "checkpoint": str(tiny_canvas)},
            "data": {"dataset": "digits_canvas", "concept": ["bold", "slanted"]},
            "eval": {"samples": 4, "steps": 2},
        },
    )
    metrics = run(recipe, tmp_path / "run", log=lambda message: None)
    for key in (
        "erasure_rate",
        "erasure_rate:bold",
        "erasure_rate:slanted",
        "retain_accuracy",
        "cross_domain_accuracy",
        "fid",
        "fid_cross",
        "original_cross_domain_accuracy",
    ):
        assert key in metrics, key
    assert (tmp_path / "run" / "edit.safetensors").is_file()


@pytest.fixture(scope="module")
def tiny_canvas(tmp_path_factory):
    """A tiny untrained model of the world's shape (16x16 pixels, the world's tokenizer)."""
    from unlearn.worlds.digits_diffusion import build_t2i

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("unlearn.worlds.digits_diffusion.TEXT_ENCODER_CONFIG", TINY_TEXT)
        model = build_t2i(0, {**TINY_T2I, "sample_size": 16}, canvas_text.load_canvas_tokenizer())
    model.text_encoder.requires_grad_(False)
    folder = tmp_path_factory.mktemp("canvas") / "tiny_canvas"
    model.save(folder)
    return folder


@pytest.mark.parametrize("attack", ["concept_inversion", "token_search"])
def test_the_attacks_run_on_a_style(canvas, quick_judges, tiny_canvas, attack):
    """A style is where adversarial prompts and concept inversion matter most: both run on the world's shape,
    judged by the style judge and scored by the style's second judge."""
    from unlearn.attacks import ATTACKS
    from unlearn.attacks.base import Target
    from unlearn.models.diffusion import load_diffusion

    harness = _harness("bold")
    model = load_diffusion(tiny_canvas)
    task = harness.task(model)
    harness.before(model, task, None)
    settings = {
        "concept_inversion": {
            "steps": 2,
            "images": 4,
            "batch_size": 2,
            "samples": 4,
            "curve_points": 2,
            "curve_samples": 2,
        },
        "token_search": {"targets": 1, "max_tokens": 4, "batch": 4},
    }[attack]
    probe = ATTACKS[attack](**settings).run(model, Target(harness, task, model, log=lambda m: None), seed=0)
    assert 0 <= probe.success <= 100 and probe.generations > 0


def test_prepare_builds_only_the_models_asked_for(digits_world, capsys):
    """`unlearn prepare digits --families classifier` builds (here: finds) the classifier and nothing else; an
    unknown model name is refused in one sentence with exit status 2."""
    from unlearn.cli import main

    assert main(["prepare", "digits", "--families", "classifier"]) == 0
    out = capsys.readouterr().out
    assert "classifier:" in out and "canvas:" not in out
    assert main(["prepare", "digits", "--families", "canvs"]) == 2
    assert "has no 'canvs' model" in capsys.readouterr().err


@pytest.mark.slow
def test_the_world_builds_and_keeps_its_promises(world_cache):
    """The real build (about 38 min on 2 busy cores): judges and model trained, every (digit, style) pair
    recognized on both factors at the promised rates, the figures written beside the model."""
    import json

    from unlearn.worlds import prepare

    folder = prepare("digits", verbose=False, families=["canvas"])["canvas"]
    info = json.loads((folder / "world.json").read_text())
    assert info["recognized_both"] >= digits_canvas.MIN_OVERALL_RATE
    assert info["recognized_worst_pair"] >= digits_canvas.MIN_PAIR_RATE
    assert info["torch_threads"] == digits_canvas.THREADS
