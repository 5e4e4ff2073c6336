"""GAN erasure on two CPU processes (gloo) gives the one-process run: the same losses step by step, the same
generator and discriminator weights and the same metrics, for the same global batch.

The digits GAN recipes (recipes/gan/digits/) run through the whole pipeline (`unlearn erase`), shrunk to a few
steps, on a small GAN trained here for a few hundred steps (the digits GAN world takes minutes to build), in a
script that logs every training step; the two-process run is launched as tests/test_multiprocess_generative.py
launches its own: `accelerate launch --multi_gpu --num_processes 2` with no GPU visible (the pipeline switches to
gloo itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from launching import NOT_COMPARED, NOT_LOSSES, launch

from unlearn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# `unlearn erase RECIPE -o OUT` with a log line per training step (both loops log every 50 or 1,000 by default),
# and the batch size of every generator pass that trains (train mode, with gradient) in this process written to
# OUT/trained_batches_rank<R>.json.
ERASE_SCRIPT = """
import functools, json, os, sys
import torch
import unlearn.methods.adapt_then_unlearn as atu
import unlearn.worlds.digits_gan as digits_gan
from unlearn.cli import main
from unlearn.models.gan import DigitsGenerator

atu.Trainer = functools.partial(atu.Trainer, log_every=1)
digits_gan.train_gan = functools.partial(digits_gan.train_gan, log_every=1)
sizes, forward = [], DigitsGenerator.forward

def recording(self, z):
    if self.training and torch.is_grad_enabled():
        sizes.append(len(z))
    return forward(self, z)

DigitsGenerator.forward = recording
status = main(["erase", sys.argv[1], "-o", sys.argv[2]])
with open(os.path.join(sys.argv[2], f"trained_batches_rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump(sizes, handle)
sys.exit(status)
"""


PORT = 29571  # the main process's port of this file's launches (files may run at once)


@pytest.fixture(scope="module")
def small_gan(tmp_path_factory):
    """A dcgan_digits GAN of width 16 trained 200 steps by the world's loop: about 9 % of its samples are 8s
    (the negatives), most of the rest 1s (the positives)."""
    from unlearn.datasets import load_dataset
    from unlearn.models.gan import build_gan
    from unlearn.worlds.digits_gan import train_gan

    torch.manual_seed(0)
    model = build_gan("dcgan_digits", latent_dim=16, width=16)
    train_gan(model, load_dataset("digits", "train").images, steps=200, log=None)
    folder = tmp_path_factory.mktemp("gan") / "gan"
    model.save(folder)
    return folder


# Both stages of Adapt-then-Unlearn: 4 adaptation steps on 16 negatives, 4 unlearning steps (lazy R1 on steps 0
# and 4 of each stage: r1_every 4), global batch 8; positives: every unflagged sample (the small GAN makes no
# sample whose probability of 8 is below the recipes' 0.0001).
ATU = {
    "negatives": 16,
    "positives": 200,
    "positive_max_prob": None,
    "adapt_steps": 4,
    "steps": 4,
    "batch_size": 8,
    "fisher_samples": 4,
}
CASES = {
    # NL2, the repulsion as its own step after each Adam step (the digits recipe)
    "adapt_then_unlearn": ("adapt_then_unlearn.yaml", ATU, {}),
    # EL2 inside the loss Adam minimizes (the reference's coupling): the repulsion's gradient joins the DDP one
    "exponential_coupled": ("adapt_then_unlearn_exponential.yaml", {**ATU, "decoupled": False}, {}),
    # mixed precision: both networks under bf16 autocast on the CPU
    "adapt_then_unlearn_bf16": ("adapt_then_unlearn.yaml", ATU, {"mixed_precision": "bf16"}),
    # Retrain: fresh weights trained by the world's loop on the retained digits, global batch 8
    "retrain": ("retrain.yaml", {"steps": 5, "batch_size": 8}, {}),
}
# Tolerances. fp32: the losses as train.jsonl rounds them (6 decimals) agree exactly, the weights to 2e-9-7e-9,
# the FIDs to 2e-7 relative (measured, all three fp32 cases): float round-off of a generator run on 4 latents
# instead of 8 and of the discriminator's gradient coming back through the gathered images. Under bf16 autocast
# that round-off is bf16's (8 bits of mantissa: a convolution on 4 images instead of 8 rounds differently), and
# Adam's normalized step g/(|g| + eps) turns a rounding difference of a small gradient entry into a step
# difference of up to lr (2e-4). Measured: losses within 1.5e-3 (on losses of about 1.4), generator weights
# within 1.6e-5 and the discriminator's within 1.8e-6 after 8 steps, FIDs within 7e-6 relative, shares equal.
LOSS_REL = {"adapt_then_unlearn_bf16": 5e-3}
WEIGHT_ATOL = {"adapt_then_unlearn_bf16": 1e-4}
METRIC_REL = {"adapt_then_unlearn_bf16": 1e-4}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, small_gan, digits_world, tmp_path):
    from safetensors.torch import load_file

    file, method, train = CASES[case]
    recipe = yaml.safe_load((ROOT / "recipes" / "gan" / "digits" / file).read_text())
    recipe["method"].update(method)
    recipe["model"] = {"family": "gan", "checkpoint": str(small_gan)}
    recipe["eval"] = {"samples": 64}
    if train:
        recipe["train"] = train
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    script = tmp_path / "erase.py"
    script.write_text(ERASE_SCRIPT)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        launch(script, [str(tmp_path / "recipe.yaml"), str(out)], processes, tmp_path, PORT)
        lines = (out / "train.jsonl").read_text().splitlines()
        runs[processes] = {
            "losses": [
                (r["stage"], r["step"], k, v)
                for r in map(json.loads, lines)
                for k, v in r.items()
                if k not in NOT_LOSSES
            ],
            "metrics": json.loads((out / "metrics.json").read_text()),
            "weights": {
                part: load_file(str(out / "model" / f"{part}.safetensors"))
                for part in ("generator", "discriminator")
            },
        }
    one, two = runs[1], runs[2]
    assert two["metrics"]["num_processes"] == 2 and one["metrics"]["num_processes"] == 1
    # each process runs the generator's trained pass on its half of the global batch
    batch = method["batch_size"]
    trained = {p: _trained_batches(tmp_path / f"p{p}", 0) for p in (1, 2)}
    assert trained[2] == _trained_batches(tmp_path / "p2", 1)
    if recipe["method"]["name"] == "retrain":  # the discriminator's fakes: the whole batch in every process
        assert trained[1] == [batch, batch] * method["steps"]
        assert trained[2] == [batch, batch // 2] * method["steps"]
    else:
        steps = method["adapt_steps"] + method["steps"]
        assert trained[1] == [batch] * steps and trained[2] == [batch // 2] * steps
    # a log line per step of every stage, the same lines in both runs
    stages = {"retrain": {"train_gan"}}.get(recipe["method"]["name"], {"adapt0", "unlearn"})
    assert {s for s, *_ in one["losses"]} == stages
    assert [x[:3] for x in two["losses"]] == [x[:3] for x in one["losses"]]
    for (stage, step, name, a), (*_, b) in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=LOSS_REL.get(case, 1e-4), abs=1e-6), (
            f"{stage} step {step} {name}: one process {a}, two {b}"
        )
    original = {
        part: load_file(str(small_gan / f"{part}.safetensors")) for part in ("generator", "discriminator")
    }
    differences = {}
    for part, weights in one["weights"].items():
        assert any(not torch.equal(w, original[part][n]) for n, w in weights.items()), f"the {part} trains"
        differences[part] = max((two["weights"][part][n] - w).abs().max().item() for n, w in weights.items())
        for name, weight in weights.items():
            torch.testing.assert_close(
                two["weights"][part][name],
                weight,
                rtol=1e-4,
                atol=WEIGHT_ATOL.get(case, 1e-6),
                msg=lambda m, name=name, part=part: f"{part} {name}: {m}",
            )
    # The same metrics: shares exactly where the samples are judged alike, FID to float round-off.
    metrics = {k: v for k, v in one["metrics"].items() if k not in NOT_COMPARED}
    assert {k: v for k, v in two["metrics"].items() if k not in NOT_COMPARED}.keys() == metrics.keys()
    for key, value in metrics.items():
        assert two["metrics"][key] == pytest.approx(value, rel=METRIC_REL.get(case, 1e-6), abs=1e-9), key
    print(
        json.dumps(
            {
                "case": case,
                "loss_max_abs_diff": max(abs(a[3] - b[3]) for a, b in zip(one["losses"], two["losses"])),
                "weight_max_abs_diff": differences,
                "metrics_equal_exactly": sorted(k for k, v in metrics.items() if two["metrics"][k] == v),
                "metrics_differing": {
                    k: [v, two["metrics"][k]] for k, v in metrics.items() if two["metrics"][k] != v
                },
            }
        )
    )


# Adapt-then-Unlearn called directly on a `dcgan` GAN, whose generator has BatchNorm: its trained pass runs on the
# whole global batch in every process (a share's batch statistics would differ). The feedback "classifier" is a
# fixed random projection of the 16x16 pixels (`judge` below, imported by the method as BN_SCRIPT's module).
BN_SCRIPT = """
import functools, json, os, sys
from types import SimpleNamespace
import torch


def judge():
    weight = torch.randn(10, 256, generator=torch.Generator().manual_seed(0))
    return lambda images: 5 * (images.flatten(1) - images.flatten(1).mean(1, keepdim=True)) @ weight.T


if __name__ == "__main__":
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    import unlearn.methods.adapt_then_unlearn as atu
    from unlearn.models.gan import build_gan
    from unlearn.train import has_batch_statistics

    atu.Trainer = functools.partial(atu.Trainer, log_every=1)
    torch.manual_seed(0)
    model = build_gan("dcgan", latent_dim=16, channels=1, width=8, image_size=16)
    assert has_batch_statistics(model.generator)
    accelerator = Accelerator(cpu=True, project_dir=sys.argv[1])
    method = atu.AdaptThenUnlearn(
        feedback="bn_case:judge", negatives=16, positives=200, adapt_steps=4, steps=4, batch_size=8,
        fisher_samples=4, repulsion="negative", gamma=5.0,
    )
    set_seed(0)
    data = SimpleNamespace(prompts=None, forget_classes=(3,))
    model = method.unlearn(model, data, accelerator)
    if accelerator.is_main_process:
        with open(os.path.join(sys.argv[1], "processes.json"), "w") as handle:
            json.dump(accelerator.num_processes, handle)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(sys.argv[1], "gan.safetensors"))
"""


@pytest.mark.slow
def test_a_generator_with_batch_norm_trains_whole_and_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "bn_case.py"
    script.write_text(BN_SCRIPT)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        launch(script, [str(out)], processes, tmp_path, PORT)
        lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
        losses = [(r["stage"], r["step"], k, v) for r in lines for k, v in r.items() if k not in NOT_LOSSES]
        runs[processes] = losses, load_file(str(out / "gan.safetensors"))
        assert json.loads((out / "processes.json").read_text()) == processes
    (one, weights), (two, weights_two) = runs[1], runs[2]
    assert len(one) == 2 * 8 and [x[:3] for x in two] == [x[:3] for x in one]
    assert [x[3] for x in two] == pytest.approx([x[3] for x in one], rel=1e-4, abs=1e-6)
    assert any("running_mean" in name for name in weights)  # BatchNorm's statistics: saved and compared
    for name, weight in weights.items():
        torch.testing.assert_close(weights_two[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    print(
        json.dumps(
            {
                "case": "batch_norm",
                "weight_max_abs_diff": max(
                    (weights_two[n] - w).abs().max().item()
                    for n, w in weights.items()
                    if w.is_floating_point()
                ),
            }
        )
    )


def _trained_batches(out: Path, rank: int = 0) -> list[int]:
    return json.loads((out / f"trained_batches_rank{rank}.json").read_text())


# -- the default suite ----------------------------------------------------------------------------------------


def test_the_gan_methods_run_on_several_processes_and_refuse_accumulation():
    from unlearn.methods import get_method
    from unlearn.pipeline import check_processes
    from unlearn.recipe import load_recipe

    for name in ("adapt_then_unlearn", "retrain"):
        method = get_method(name, family="gan")
        assert method.multi_process and not method.accumulates
        check_processes(method(), "gan", 2)
    recipe = load_recipe(ROOT / "recipes" / "gan" / "digits" / "retrain.yaml")
    recipe.train.gradient_accumulation_steps = 2
    with pytest.raises(ConfigError, match="gradient_accumulation_steps to 1") as refused:
        recipe.build_method().check_recipe(recipe, None)
    assert "\n" not in str(refused.value)


def test_retrain_gan_logs_checkpoints_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Given a run's accelerator, the world's loop (RetrainGAN's) writes train.jsonl and checkpoints, and a run
    interrupted after a checkpoint ends with the weights of an uninterrupted one, bit for bit."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    import unlearn.worlds.digits_gan as digits_gan
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset
    from unlearn.methods.baselines import RetrainGAN
    from unlearn.models.gan import build_gan

    task = forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [8])
    train_gan = digits_gan.train_gan

    def run(folder: Path, stop_at: int | None = None) -> dict:
        def callback(step, ema):
            if step == stop_at:
                raise KeyboardInterrupt

        logged = dict(log_every=1, callback=callback)  # (the callback is called at log points)
        monkeypatch.setattr(digits_gan, "train_gan", lambda *a, **k: train_gan(*a, **k, **logged))
        accelerator = Accelerator(cpu=True, project_dir=str(folder))
        accelerator.train_spec = SimpleNamespace(checkpoint_every_steps=3)
        torch.manual_seed(0)
        model = build_gan("dcgan_digits", latent_dim=8, width=8)
        torch.manual_seed(5)
        return RetrainGAN(steps=6, batch_size=8).unlearn(model, task, accelerator).state_dict()

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", stop_at=5)  # after the checkpoint of step 3
    assert (tmp_path / "resumed" / "checkpoints" / "train_gan" / "state.pt").exists()
    resumed = run(tmp_path / "resumed")
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "train.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # steps 1-4, then from the checkpoint of step 3 on (not from 0)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "train.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [("train_gan", step) for step in range(1, 7)]
    assert all({"discriminator", "generator"} <= set(r) for r in lines)
