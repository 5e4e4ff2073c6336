"""The method × family matrix, generated from the registry (`unlearn.methods.METHODS`).

Every registered method runs, on each family it claims, about two optimizer steps on that family's tiny model
(a fresh `digits_cnn` on a few digits; the tiny Stable-Diffusion pipeline, and the tiny class-conditional DDPM
where the method supports one; a tiny built-in GAN) and keeps the promises every method makes:

- weights moved: the trainable part differs from the start (a method made a no-op fails here);
- pinned weights bit for bit: the parts the family never trains (the text encoder and VAE of a diffusion
  model), the parts a method promises to keep (LAF's classification head; the UNet weights outside a method's
  `params`; UCE's / RealEra's edits stay inside cross-attention), the weights outside a saliency mask (any
  method with a `mask_path` field writes `saliency_mask.safetensors` to the run folder), and, on a pruned
  classifier (`model.pruning_mask`, as `unlearn.prune.omp` sets it), the pruned weights stay exactly +0.0;
  the diffusion and GAN families refuse `model.prune` instead;
- save -> load: `model.save(dir)` and the family's loader give back the same tensors;
- eval: the family's harness (`unlearn.harness.HARNESSES`), built from a recipe, scores the reloaded model;
- the families a method does not claim are refused in one sentence (`get_method(name, family)`).

A newly registered method shows up here by itself and fails until `TINY` gives it tiny settings.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from tiny_diffusion import cpu_accelerator, tiny_ddpm_pipeline, tiny_sd_pipeline

from unlearn.errors import ConfigError
from unlearn.methods import METHODS, get_method

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("classifier", "diffusion", "gan")
JUDGE = "test_method_matrix:toy_judge"

# (method, family) -> the fields that make the method run about two optimizer steps on the tiny model.
# Classifier methods train in epochs: on the tiny task (8 forget, 16 retain examples) at batch 8 one epoch is
# 1 forget step and/or 2 retain steps.
TINY: dict[tuple[str, str], dict] = {
    ("retrain", "classifier"): dict(epochs=1, lr=0.05, batch_size=8),
    ("finetune", "classifier"): dict(epochs=1, batch_size=8),
    ("grad_ascent", "classifier"): dict(epochs=1, lr=1e-2, batch_size=4),
    ("random_label", "classifier"): dict(epochs=1, batch_size=8),
    ("salun", "classifier"): dict(epochs=1, batch_size=8),
    ("l1_sparse", "classifier"): dict(epochs=1, batch_size=8, l1_weight=5e-3),
    ("laf", "classifier"): dict(epochs=1, batch_size=4, vae_epochs=1, vae_batch_size=32),
    ("retrain", "diffusion"): dict(steps=2, batch_size=2, warmup_steps=1),
    ("grad_ascent", "diffusion"): dict(steps=2, lr=1e-2, batch_size=2, params="noxattn"),
    ("salun", "diffusion"): dict(steps=2, lr=1e-2, batch_size=2, retain_weight=0.1),
    ("esd", "diffusion"): dict(steps=2, lr=1e-2, ddim_steps=4, params="xattn"),
    ("doco", "diffusion"): dict(
        steps=3,
        warm_up=1,
        lr=1e-2,
        disc_lr=1e-2,
        batch_size=2,
        num_anchor_images=2,
        anchor_steps=2,
        anchor_guidance=2.0,
        log_every=1,
    ),
    ("ant", "diffusion"): dict(
        steps=2, lr=1e-2, split_step=2, ddim_steps=4, mask_seeds=[0], mask_iterations=1
    ),
    ("uce", "diffusion"): dict(),  # closed form: no steps
    ("realera", "diffusion"): dict(
        num_neighbors=2, num_beyond=2, lora_steps=2, lora_batch_size=2, lora_rank=2, lora_lr=1e-2
    ),
    ("retrain", "gan"): dict(steps=2, batch_size=8),
    ("adapt_then_unlearn", "gan"): dict(
        feedback=JUDGE,
        negatives=4,
        positives=16,
        max_draws=4000,
        adapt_steps=2,
        steps=2,
        batch_size=8,
        fisher_samples=2,
    ),
}

# Diffusion methods that also erase a class from a class-conditional DDPM, with what changes there. Every other
# diffusion method must refuse a DDPM with a ConfigError.
DDPM: dict[str, dict] = {
    "retrain": {},
    "grad_ascent": {"params": "full"},
    "salun": {},
    "esd": {"params": "full", "batch_size": 2},
    "doco": {"params": "full"},
    "ant": {},
}

# Edits a method promises to keep inside (a regex on UNet parameter names), besides its `params` field.
EDITS_INSIDE: dict[tuple[str, str], str] = {
    ("uce", "diffusion"): r"\.attn2\.to_[kv]\.weight$",
    ("realera", "diffusion"): r"\.attn2\.",
}


def toy_judge():
    """A 10-class "classifier" of images of any size: a fixed random projection of the centred, normalised
    8×8 grey thumbnail (deterministic, no training; importable as `test_method_matrix:toy_judge`)."""
    weight = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))

    def judge(images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 8).flatten(1)
        x = x - x.mean(1, keepdim=True)
        x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
        return 5 * x @ weight.T.to(x.device)

    return judge


def _cells() -> list:
    cells = []
    for name, classes in METHODS.items():
        for family in dict.fromkeys(f for cls in classes for f in cls.families):
            if family == "diffusion":
                cells.append(pytest.param(name, family, "sd", id=f"{name}-diffusion-sd"))
                cells.append(pytest.param(name, family, "ddpm", id=f"{name}-diffusion-ddpm"))
            else:
                cells.append(pytest.param(name, family, family, id=f"{name}-{family}"))
    return cells


def _refusals() -> list:
    claimed = {n: {f for cls in classes for f in cls.families} for n, classes in METHODS.items()}
    return [
        pytest.param(name, family, id=f"{name}-{family}")
        for name in METHODS
        for family in FAMILIES
        if family not in claimed[name]
    ]


def _tiny(name: str, family: str) -> dict:
    if (name, family) not in TINY:
        pytest.fail(
            f"method {name!r} is registered for the {family} family but has no tiny settings: add "
            f"TINY[({name!r}, {family!r})] = {{field: value}} in tests/test_method_matrix.py (the fields that "
            "make it run about two optimizer steps on the family's tiny model)"
        )
    return dict(TINY[(name, family)])


def _clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (a -0.0 for a +0.0 or another NaN payload would not do)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _assert_identical(before: dict, after: dict, what: str, only=None) -> None:
    assert set(before) == set(after), f"{what}: tensors renamed"
    for name in before if only is None else only:
        assert _same(before[name].cpu(), after[name].detach().cpu()), f"{what}: {name} changed"


# -- the families' tiny worlds ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix-pipelines")
    return {"sd": tiny_sd_pipeline(root / "sd"), "ddpm": tiny_ddpm_pipeline(root / "ddpm", num_classes=10)}


def _recipe(name: str, family: str, settings: dict, model: dict, data: dict, ev: dict):
    from unlearn.recipe import from_dict

    return from_dict(
        {"method": {"name": name, **settings}, "model": {"family": family, **model}, "data": data, "eval": ev}
    )


def _small(data, forget: int, retain: int, test: int):
    """The same task on a seeded handful of examples of each set (a few steps per epoch)."""

    def few(ds, n):
        if len(ds) <= n:
            return ds
        return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n])

    return dataclasses.replace(
        data,
        forget=few(data.forget, forget),
        retain=few(data.retain, retain),
        test=few(data.test, test),
        test_forget=few(data.test_forget, test),
    )


def _classifier_world(name, settings):
    from unlearn.harness.classifier import classifier_task
    from unlearn.models import build_classifier, load_model
    from unlearn.prune import omp

    recipe = _recipe(
        name,
        "classifier",
        settings,
        {"arch": "digits_cnn", "checkpoint": None},
        {"dataset": "digits", "forget_class": [3]},
        {"metrics": ["UA", "RA", "TA", "MIA"]},
    )
    data = _small(classifier_task(recipe), 8, 16, 40)
    torch.manual_seed(0)
    model = build_classifier("digits_cnn", 10)
    model.pruning_mask = omp(model, 0.5)  # prune first, then unlearn: the pruned weights must stay 0.0
    return recipe, model, data, lambda path: load_model(str(path), None, 10)


def _diffusion_world(name, settings, pipelines, kind):
    from unlearn.models.diffusion import load_diffusion

    folder = pipelines[kind]
    if kind == "sd":
        data = {
            "dataset": "generated",
            "concept": "cat",
            "forget_prompts": ["a photo of the cat", "the cat"],
            "paraphrases": ["a painting of a cat"],
            "retain_prompts": ["a photo of the dog"],
            "anchor": "a dog",
            "num_images": 4,
        }
        ev = {"concept_label": 3}
    else:
        data, ev = {"dataset": "digits", "forget_class": [3]}, {}
    recipe = _recipe(
        name,
        "diffusion",
        settings,
        {"checkpoint": str(folder)},
        data,
        {
            "judge": JUDGE,
            "samples": 2,
            "steps": 2,
            "metrics": ["erasure_rate", "erasure_rate_paraphrase", "retain_accuracy"],
            **ev,
        },
    )
    model = load_diffusion(folder)
    from unlearn.harness import HARNESSES

    task = HARNESSES["diffusion"](recipe, device="cpu", log=lambda m: None).task(model)
    return recipe, model, _small(task, 4, 8, 8), load_diffusion


def _gan_world(name, settings):
    from unlearn.harness import HARNESSES
    from unlearn.models.gan import build_gan, load_gan

    recipe = _recipe(
        name,
        "gan",
        settings,
        {"arch": "dcgan_digits", "checkpoint": None},
        # Retrain trains on the real retained images: the digits dataset; the others use none
        {"dataset": "digits" if name == "retrain" else "generated", "forget_class": [3]},
        {"judge": JUDGE, "samples": 32, "metrics": ["erasure_rate", "class_histogram", "confident"]},
    )
    torch.manual_seed(0)
    model = build_gan("dcgan_digits", latent_dim=8, width=8)
    data = HARNESSES["gan"](recipe, device="cpu", log=lambda m: None).task()
    return recipe, model, data, load_gan


def _world(name, family, kind, settings, pipelines):
    """The recipe (validating the tiny settings), the model before unlearning, the task, the family's loader."""
    if family == "classifier":
        return _classifier_world(name, settings)
    if family == "diffusion":
        return _diffusion_world(name, settings, pipelines, kind)
    return _gan_world(name, settings)


def _assert_refuses_class_models(name, settings, tmp_path, pipelines):
    """A diffusion method not listed in DDPM must refuse a class-conditional model in one sentence."""
    _, model, data, _ = _world(name, "diffusion", "ddpm", settings, pipelines)
    try:
        get_method(name, "diffusion")(**settings).unlearn(model, data, cpu_accelerator(tmp_path))
    except ConfigError as refused:
        assert "\n" not in str(refused), str(refused)
        return
    pytest.fail(
        f"{name} ran on a class-conditional DDPM instead of refusing it: add DDPM[{name!r}] = {{field: value}} "
        "in tests/test_method_matrix.py so that the matrix checks its promises there"
    )


def _pinned_parts(family: str, model) -> dict[str, torch.nn.Module]:
    """Parts the family never trains: their every tensor must come back bit for bit."""
    if family == "diffusion":
        return {n: getattr(model, n) for n in ("text_encoder", "vae") if getattr(model, n) is not None}
    return {}


# -- the matrix -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, family, kind", _cells())
def test_method_keeps_its_promises_on_the_family(name, family, kind, tmp_path, request):
    from accelerate.utils import set_seed

    from unlearn.harness import HARNESSES
    from unlearn.params import ParamMask

    settings = _tiny(name, family)
    pipelines = request.getfixturevalue("pipelines") if family == "diffusion" else None
    if kind == "ddpm" and name not in DDPM:
        _assert_refuses_class_models(name, settings, tmp_path, pipelines)
        return
    settings.update(DDPM.get(name, {}) if kind == "ddpm" else {})
    recipe, model, data, load = _world(name, family, kind, settings, pipelines)
    method = get_method(name, family)(**recipe.method_args)
    if family != "classifier":  # prune first, then unlearn: refused for the generative families
        with pytest.raises(ConfigError, match="model.prune"):
            _recipe(name, family, settings, {"prune": {"sparsity": 0.5}}, {}, {})

    pinned = {part: _clone(module) for part, module in _pinned_parts(family, model).items()}
    start = _clone(model.trainable)
    pruning = getattr(model, "pruning_mask", None)
    harness = HARNESSES[family](recipe, device="cpu", log=lambda message: None)
    harness.before(model, data, None)

    set_seed(0)
    run = tmp_path / "run"
    result = method.unlearn(model, data, cpu_accelerator(run))
    after = {n: t.detach() for n, t in result.trainable.state_dict().items()}

    # Weights moved.
    moved = [n for n in start if not _same(start[n], after[n].cpu())]
    assert moved, f"{name} on {family}/{kind}: no weight of the trainable part changed (a no-op?)"

    # Parts the family never trains.
    for part, before in pinned.items():
        _assert_identical(before, getattr(result, part).state_dict(), f"{name}: the frozen {part}")

    # Parts the method promises to keep.
    params = dict(result.trainable.named_parameters())
    if name == "laf" and not method.repair_epochs:  # label-free LAF never trains the head
        head = {id(p) for p in result.head.parameters()}
        kept = [n for n, p in params.items() if id(p) in head]
        assert kept
        _assert_identical(start, after, "laf: the classification head", kept)
    if family == "diffusion" and hasattr(method, "params"):
        chosen = set(result.parameters_named(method.params))
        outside = [n for n in params if n not in chosen]
        _assert_identical(start, after, f"{name}: weights outside params={method.params!r}", outside)
        assert any(n in chosen for n in moved)
    if (name, family) in EDITS_INSIDE:
        pattern = re.compile(EDITS_INSIDE[(name, family)])
        _assert_identical(
            start,
            after,
            f"{name}: weights outside {pattern.pattern}",
            [n for n in start if not pattern.search(n)],
        )

    # Weights outside a saliency mask.
    if "mask_path" in {f.name for f in dataclasses.fields(method)} and not getattr(method, "soft", False):
        file = run / "saliency_mask.safetensors"
        assert file.exists(), f"{name} takes a saliency mask but wrote none to the run folder"
        mask = ParamMask.load(file)
        assert 0.0 < mask.density() < 1.0
        for n, keep in mask.masks.items():
            assert _same(after[n].cpu()[~keep], start[n][~keep]), f"{name}: {n} moved outside the mask"

    # A pruned model's pruned weights stay exactly +0.0 (and some unpruned ones moved).
    if pruning is not None:
        for n, keep in pruning.masks.items():
            assert _same(after[n].cpu()[~keep], torch.zeros_like(start[n][~keep])), f"{name}: pruned {n}"
        assert any(not _same(after[n].cpu()[k], start[n][k]) for n, k in pruning.masks.items())

    # Save -> load gives back the same tensors.
    result.save(tmp_path / "model")
    loaded = load(tmp_path / "model")
    _assert_identical(_clone(result), loaded.state_dict(), f"{name}: save -> load")

    # The family's harness scores the reloaded model.
    scores = harness.score(loaded, data)
    expected = {
        "classifier": {"UA", "RA", "TA", "MIA"},
        "diffusion": {"erasure_rate", "erasure_rate_paraphrase"} if kind == "sd" else {"erasure_rate"},
        "gan": {"erasure_rate", "confident"},
    }[family]
    assert expected <= set(scores.metrics), scores.metrics
    for key in expected:
        assert isinstance(scores.metrics[key], float) and math.isfinite(scores.metrics[key]), key
        assert 0.0 <= scores.metrics[key] <= 100.0, key


@pytest.mark.parametrize("name, family", _refusals())
def test_method_refuses_the_families_it_does_not_claim(name, family):
    with pytest.raises(ConfigError) as refused:
        get_method(name, family)
    message = str(refused.value)
    assert "\n" not in message and name in message and family in message


def test_tiny_settings_name_only_registered_cells():
    registered = {(n, f) for n, classes in METHODS.items() for cls in classes for f in cls.families}
    stale = sorted(set(TINY) - registered)
    assert not stale, f"TINY holds settings of cells the registry does not have: {stale}"
    assert set(DDPM) <= {n for n, f in registered if f == "diffusion"}
