"""The GAN family and Adapt-then-Unlearn: adapter, losses, checkpoints, the method's parts, the CLI.

Fast tests build tiny GANs from configs and judge them with a brightness "classifier" defined here (no
download, no trained world); building the digits GAN world and the acceptance check are `slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn.cli import main
from unlearn.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from unlearn.methods.adapt_then_unlearn import (
    AdaptThenUnlearn,
    collect,
    ewc_penalty,
    fisher_information,
    load_adapted,
    parameter_distance,
    repulsion,
)
from unlearn.models.gan import GAN, build_gan, load_gan

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def toy_judge():
    """A 10-class "classifier" for 8×8 images: a fixed random projection of the centred, normalised pixels.
    Importable as `test_gan:toy_judge`, it judges untrained tiny GANs deterministically (about 5 % of
    `tiny()`'s samples fall in class 3)."""
    weight = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))

    def judge(images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(1)
        x = x - x.mean(1, keepdim=True)
        x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
        return 5 * x @ weight.T.to(x.device)

    return judge


def tiny(seed: int = 0, width: int = 8) -> GAN:
    torch.manual_seed(seed)
    return build_gan("dcgan_digits", latent_dim=8, width=width)


class LinearD(nn.Module):
    def __init__(self, size: int = 64):
        super().__init__()
        self.lin = nn.Linear(size, 1)

    def forward(self, x):
        return self.lin(x.flatten(1))


class MLPG(nn.Module):
    def __init__(self, latent: int = 4):
        super().__init__()
        self.lin = nn.Linear(latent, 64)

    def forward(self, z):
        return torch.tanh(self.lin(z)).view(len(z), 1, 8, 8)


# -- the adapter --------------------------------------------------------------------------------------------


def test_sample_is_deterministic_per_seed_and_in_range():
    model = tiny()
    a, b, c = model.sample(20, seed=3), model.sample(20, seed=3), model.sample(20, seed=4)
    assert a.shape == (20, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # Image i depends only on (seed, i) (up to float rounding, which varies with the batch shape).
    assert torch.allclose(model.sample(5, seed=3), a[:5], atol=1e-6)
    assert torch.allclose(model.sample(20, seed=3, batch_size=7), a, atol=1e-6)


@pytest.mark.parametrize("size", [32, 64])
def test_configurable_dcgan_for_larger_images(size):
    torch.manual_seed(0)
    model = build_gan("dcgan", latent_dim=16, channels=3, width=8, image_size=size)
    images = model.sample(4)
    assert images.shape == (4, 3, size, size)
    assert model.discriminate(images).shape == (4,)
    with pytest.raises(ConfigError, match="power-of-two"):
        build_gan("dcgan", image_size=48)
    with pytest.raises(ConfigError, match="unknown GAN architecture"):
        build_gan("stylegan9")
    with pytest.raises(ConfigError, match="unknown key"):
        build_gan("dcgan", depth=3)


def test_losses_match_their_formulas():
    model = tiny()
    real, fake = torch.rand(6, 1, 8, 8), model.sample(6, seed=1)
    d_real, d_fake = model.discriminate(real), model.discriminate(fake)
    assert torch.allclose(model.generator_loss(fake), F.softplus(-d_fake).mean())
    expected = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
    assert torch.allclose(model.discriminator_loss(real, fake), expected)
    # R1 of a linear discriminator D(x) = w·x + b: the input gradient is w everywhere -> (γ/2)·‖w‖².
    gan = GAN(MLPG(), LinearD(), latent_dim=4)
    w = gan.discriminator.lin.weight
    assert torch.allclose(gan.r1_penalty(real, gamma=10.0), 5.0 * w.pow(2).sum())
    penalty = gan.r1_penalty(real, gamma=1.0)
    penalty.backward()  # differentiable w.r.t. the discriminator (create_graph)
    assert torch.allclose(w.grad, w.detach())


def test_save_load_round_trip_builtin_and_custom(tmp_path):
    model = tiny()
    model.save(tmp_path / "gan")
    config = json.loads((tmp_path / "gan" / "gan_config.json").read_text())
    assert config["arch"] == "dcgan_digits" and config["family"] == "gan" and config["width"] == 8
    assert not list((tmp_path / "gan").glob("*.pt")) and not list((tmp_path / "gan").glob("*.pkl"))
    again = load_gan(tmp_path / "gan")
    assert torch.equal(again.sample(10, seed=2), model.sample(10, seed=2))
    real = torch.rand(4, 1, 8, 8)
    assert torch.equal(again.discriminate(real), model.discriminate(real))
    # Any modules through the Python API: the weights load into the caller's modules.
    custom = GAN(MLPG(), LinearD(), latent_dim=4)
    custom.save(tmp_path / "custom")
    with pytest.raises(CheckpointError, match="pass its generator and discriminator"):
        load_gan(tmp_path / "custom")
    loaded = load_gan(tmp_path / "custom", generator=MLPG(), discriminator=LinearD())
    assert torch.equal(loaded.sample(3, seed=1), custom.sample(3, seed=1))


def test_bad_checkpoints_raise_typed_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        load_gan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a GAN folder"):
        load_gan(tmp_path / "empty")
    tiny().save(tmp_path / "gan")
    config = tmp_path / "gan" / "gan_config.json"
    good = config.read_text()
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_gan(tmp_path / "gan")
    config.write_text(good.replace('"width": 8', '"width": 16'))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_gan(tmp_path / "gan")
    config.write_text(good)
    (tmp_path / "gan" / "generator.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_gan(tmp_path / "gan")


# -- the method's parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["inverse", "negative", "exponential"])
def test_repulsion_value_and_gradient_push_away_from_adapted(form):
    torch.manual_seed(0)
    theta = {"a": torch.randn(5, requires_grad=True), "b": torch.randn(2, 3, requires_grad=True)}
    adapted = [{n: (p.detach() + 0.1 * torch.randn_like(p)) for n, p in theta.items()}]
    d = parameter_distance(theta, adapted, "sum")
    expected_d = sum(((theta[n] - adapted[0][n]) ** 2).sum() for n in theta)
    assert torch.allclose(d, expected_d)
    value = repulsion(d, form, gamma=2.0, exp_scale=100.0)
    expected = {"inverse": 2.0 / d, "negative": -2.0 * d, "exponential": 100.0 * torch.exp(-2.0 * d)}[form]
    assert torch.allclose(value, expected)
    value.backward()
    # A gradient step (θ − lr·∇) moves θ away from θ_N: ∇·(θ − θ_N) < 0, and the distance grows.
    dot = sum((theta[n].grad * (theta[n] - adapted[0][n])).sum() for n in theta)
    assert dot < 0
    with torch.no_grad():
        stepped = {n: p - 1e-3 * p.grad / p.grad.norm() for n, p in theta.items()}
    assert parameter_distance(stepped, adapted, "sum") > d
    assert repulsion(d, "none", 2.0).item() == 0.0


def test_decoupled_repulsion_step_moves_along_the_adapted_direction():
    gan = GAN(MLPG(), LinearD(), latent_dim=4)
    start = {n: p.detach().clone() for n, p in gan.generator.named_parameters()}
    adapted = [{n: p - 0.1 * torch.randn_like(p) for n, p in start.items()}]
    # negative L2: θ ← θ − lr·∇(−γ‖θ − θ_N‖²) = θ + 2·lr·γ·(θ − θ_N)
    AdaptThenUnlearn(repulsion="negative", gamma=2.0, lr=0.01).repulsion_step(gan, adapted)
    for n, p in gan.generator.named_parameters():
        assert torch.allclose(p.detach() - start[n], 0.04 * (start[n] - adapted[0][n]), atol=1e-7)
    AdaptThenUnlearn(repulsion="none").repulsion_step(gan, adapted)  # the baseline: nothing moves
    moved = {n: p.detach().clone() for n, p in gan.generator.named_parameters()}
    AdaptThenUnlearn(repulsion="none").repulsion_step(gan, adapted)
    assert all(torch.equal(p, moved[n]) for n, p in gan.generator.named_parameters())


def test_parameter_distance_reference_normalization_multiplies_by_adapted_models():
    theta = {"a": torch.zeros(4), "b": torch.zeros(2)}
    one = {"a": torch.ones(4), "b": 2 * torch.ones(2)}
    two = {"a": 3 * torch.ones(4), "b": torch.zeros(2)}
    # "mean": ½ · mean over tensors of the per-tensor mean squared difference (the reference's `val`).
    assert parameter_distance(theta, [one], "mean").item() == pytest.approx(0.5 * (1 + 4) / 2)
    # K models: per tensor the MSEs add over the models, then /T, /2, *K (the reference's `value/2*len(ckpt_gens)`).
    both = parameter_distance(theta, [one, two], "mean").item()
    assert both == pytest.approx(((1 + 9) / 2 / 2 * 2) + ((4 + 0) / 2 / 2 * 2))
    assert parameter_distance(theta, [one], "sum").item() == pytest.approx(4 + 8)
    with pytest.raises(ConfigError):
        parameter_distance(theta, [one], "max")


def test_fisher_is_mean_squared_per_sample_gradient_of_the_discriminator_logit():
    gan = GAN(MLPG(), LinearD(), latent_dim=4)
    torch.manual_seed(5)
    fisher = fisher_information(gan, samples=6)
    torch.manual_seed(5)
    z = gan.random_latents(6)
    expected = {n: torch.zeros_like(p) for n, p in gan.generator.named_parameters()}
    for i in range(6):
        gan.generator.zero_grad()
        gan.discriminate(gan.generate(z[i : i + 1])).sum().backward()
        for n, p in gan.generator.named_parameters():
            expected[n] += p.grad**2 / 6
    for n in expected:
        assert torch.allclose(fisher[n], expected[n], atol=1e-7)
        assert (fisher[n] >= 0).all()
    anchor = {n: p.detach().clone() for n, p in gan.generator.named_parameters()}
    assert ewc_penalty(gan.generator, anchor, fisher, 10.0).item() == 0.0
    with torch.no_grad():
        gan.generator.lin.bias.add_(0.5)
    penalty = ewc_penalty(gan.generator, anchor, fisher, 10.0)
    manual = 5.0 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in gan.generator.named_parameters())
    assert torch.allclose(penalty, manual)
    gan.generator.zero_grad()
    penalty.backward()  # pulls back towards θ*: the gradient is λ F (θ − θ*)
    assert torch.allclose(gan.generator.lin.bias.grad, 10.0 * fisher["lin.bias"] * 0.5)


def test_fisher_works_on_the_batch_norm_dcgan_in_training_mode():
    """The configurable DCGAN (the GPU recipe's) has batch norm: one-sample gradients need eval statistics."""
    from unlearn.models.gan import build_gan

    torch.manual_seed(0)
    gan = build_gan("dcgan", image_size=16, width=4).train()
    fisher = fisher_information(gan, samples=2)
    assert gan.generator.training  # the mode is given back
    assert all(torch.isfinite(f).all() for f in fisher.values())
    assert sum(f.sum() for f in fisher.values()) > 0


def test_collect_keeps_flagged_or_unflagged_samples():
    model = tiny()
    judge = toy_judge()
    flag = lambda images: judge(images).argmax(1) == 3  # noqa: E731
    torch.manual_seed(0)
    negatives = collect(model, flag, want=True, count=30, max_draws=3000)
    positives = collect(model, flag, want=False, count=30, max_draws=3000)
    assert len(negatives) == 30 and flag(negatives).all()
    assert len(positives) <= 30 and not flag(positives).any()


def test_feedback_flags_argmax_threshold_and_borderline():
    from unlearn.methods.adapt_then_unlearn import _flags

    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 2.5, 0.0], [5.0, 0.0, 0.0]])
    images = torch.zeros(3, 1, 8, 8)
    judge = lambda x: logits  # noqa: E731
    assert _flags(judge, images, 1, None).tolist() == [1, 0, 0]  # argmax
    assert _flags(judge, images, 1, 2.0).tolist() == [1, 1, 0]  # logit above a threshold (attributes)
    assert _flags(judge, images, 1, None, 0.1).tolist() == [1, -1, 0]  # borderline: neither
    assert _flags(lambda x: torch.tensor([True, False, True]), images, 1, None).tolist() == [1, 0, 1]
    with pytest.raises(Exception, match="out of range"):
        _flags(judge, images, 7, None)


def test_method_validates_its_fields():
    with pytest.raises(ConfigError, match="unknown repulsion"):
        AdaptThenUnlearn(repulsion="cosine")
    with pytest.raises(ConfigError, match="unknown distance"):
        AdaptThenUnlearn(distance="max")
    with pytest.raises(ConfigError, match="negatives"):
        AdaptThenUnlearn(negatives=0)


# -- the CLI ------------------------------------------------------------------------------------------------


def _erase(tmp_path, checkpoint, *extra, label=3):
    return main(
        [
            "erase",
            str(ROOT / "recipes/gan/digits/adapt_then_unlearn.yaml"),
            "--forget-class",
            str(label),
            "--checkpoint",
            str(checkpoint),
            "method.feedback=test_gan:toy_judge",
            "eval.judge=test_gan:toy_judge",
            "method.negatives=20",
            "method.positives=300",
            "method.adapt_steps=3",
            "method.steps=3",
            "method.batch_size=16",
            "method.fisher_samples=4",
            "eval.samples=200",
            *extra,
            "-o",
            str(tmp_path / "run"),
        ]
    )


def test_cli_erase_writes_a_generator_that_reloads_and_samples(tmp_path, world_cache, capsys):
    tiny().save(tmp_path / "gan")
    assert _erase(tmp_path, tmp_path / "gan") == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("erasure_rate", "original_erasure_rate", "fid", "fid_original", "confident", "RTE_s"):
        assert key in metrics
    assert sum(metrics[f"class_share_{c}"] for c in range(10)) == pytest.approx(100.0)
    assert (run / "adapted_generator_0.safetensors").exists()
    assert (run / "samples.png").exists() and (run / "samples_original.png").exists()
    report = (run / "report.md").read_text()
    assert "samples_original.png" in report and "| class | 0 | 1 | 2 | 3* | 4 |" in report
    stages = {json.loads(line)["stage"] for line in (run / "train.jsonl").read_text().splitlines()}
    assert stages == {"adapt0", "unlearn"}
    again = load_gan(run / "model")
    assert again.sample(4, seed=0).shape == (4, 1, 8, 8)
    assert not torch.equal(again.sample(4), load_gan(tmp_path / "gan").sample(4))  # it changed
    # The adapted weights are reusable: stage 1 is skipped when adapted_path names them.
    adapted = load_adapted(run, again)
    assert len(adapted) == 1 and set(adapted[0]) == {n for n, _ in again.generator.named_parameters()}
    # `unlearn eval` scores the run folder again: the run's own numbers, exactly
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"erasure_rate", "fid", "fid_original", "original_erasure_rate", "erasure_reduction"} <= set(
        scores
    )
    assert scores == {k: metrics[k] for k in scores}


def test_baseline_without_repulsion_skips_stage_one(tmp_path, world_cache):
    tiny().save(tmp_path / "gan")
    assert _erase(tmp_path, tmp_path / "gan", "method.repulsion=none") == 0
    assert not (tmp_path / "run" / "adapted_generator_0.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--forget-class", "12"], "out of range"),
        (["--forget-class", "8", "model.family=classifier"], "does not support the classifier family"),
        (["--forget-class", "8", "method.name=salun"], "does not support the gan family"),
        (["data.forget_class=[3, 8]"], "one class at a time"),
        (["--forget-class", "8", "method.repulsion=cosine"], "unknown repulsion"),
        (["--forget-class", "8", "model.checkpoint=/nonexistent/gan"], "does not exist"),
    ],
)
def test_erase_refuses_bad_gan_input_in_one_line(tmp_path, capsys, extra, message):
    recipe = str(ROOT / "recipes/gan/digits/adapt_then_unlearn.yaml")
    assert main(["erase", recipe, *extra, "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_gan_recipes_and_suite_validate():
    from unlearn.bench import check_suite, load_suite
    from unlearn.recipe import load_recipe

    recipes = sorted((ROOT / "recipes" / "gan").rglob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.model.family == "gan" and recipe.method in ("adapt_then_unlearn", "retrain")
    check_suite(load_suite(ROOT / "evals" / "digits_gan_class.yaml"))
    check_suite(load_suite(ROOT / "evals" / "digits_gan_robust.yaml"))


def test_gan_bench_table_has_the_gan_columns():
    from unlearn.bench import results_table

    stats = {"mean": 1.0, "std": 0.0}
    row = {
        k: stats for k in ("erasure_rate", "erasure_reduction", "fid", "fid_original", "confident", "RTE_s")
    }
    table = results_table(
        {
            "suite": "s",
            "family": "gan",
            "seeds": [0],
            "reference": "no_repulsion",
            "summary": {"original": row, "no_repulsion": row},
        }
    )
    assert "FID vs original (retained)" in table and "reduction (%)" in table


# -- the digits GAN world (slow) ----------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_gan_world_keeps_its_promises(world_cache):
    from unlearn.worlds import prepare

    paths = prepare("digits", verbose=True, families=("gan",))
    info = json.loads((paths["gan"] / "world.json").read_text())
    assert min(info["class_shares"]) >= 3.0 and info["confident"] >= 70.0
    model = load_gan(paths["gan"])
    assert model.sample(4).shape == (4, 1, 8, 8)


@pytest.mark.slow
def test_digits_gan_erase_8_meets_the_acceptance_check(tmp_path, world_cache):
    code = main(
        ["erase", str(ROOT / "recipes/gan/digits/adapt_then_unlearn.yaml"), "--forget-class", "8",
         "-o", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["erasure_reduction"] >= 90.0
    assert metrics["fid"] <= 1.25 * metrics["original_fid"]
