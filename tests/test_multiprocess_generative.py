"""Diffusion erasure on two CPU processes (gloo) gives the one-process run: the same losses step by step, the same
weights and the same metrics, for the same global batch.

Each run goes through the whole pipeline (`unlearn erase`) in a script that logs every training step (the
methods log every 50 by default); the two-process run is launched as tests/test_multiprocess.py launches its own:
`accelerate launch --multi_gpu --num_processes 2` with no GPU visible, the pipeline switches to gloo itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from launching import NOT_COMPARED, NOT_LOSSES, launch
from tiny_diffusion import ddpm_and_t2i_pipelines

from unlearn.errors import ConfigError

# `unlearn erase RECIPE -o OUT` with a log line per training step, and the batch size of every UNet pass that
# trains (train mode, with gradient) in this process written to OUT/trained_batches_rank<R>.json.
ERASE_SCRIPT = """
import functools, json, os, sys
import torch
import unlearn.methods.baselines, unlearn.methods.esd, unlearn.methods.salun
from unlearn.cli import main
from unlearn.models.diffusion import Diffusion
from unlearn.train import train_diffusion, train_steps

for module in (unlearn.methods.baselines, unlearn.methods.esd, unlearn.methods.salun):
    module.train_steps = functools.partial(train_steps, log_every=1)
unlearn.methods.baselines.train_diffusion = functools.partial(train_diffusion, log_every=1)
sizes, forward = [], Diffusion.forward

def recording(self, x_t, t, cond):
    if self.training and torch.is_grad_enabled():
        sizes.append(len(x_t))
    return forward(self, x_t, t, cond)

Diffusion.forward = recording
status = main(["erase", sys.argv[1], "-o", sys.argv[2]])
with open(os.path.join(sys.argv[2], f"trained_batches_rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump(sizes, handle)
sys.exit(status)
"""


PORT = 29541  # the main process's port of this file's launches (files may run at once)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return ddpm_and_t2i_pipelines(tmp_path_factory.mktemp("pipelines"))


THREE = {"dataset": "digits", "concept": "three"}  # the digits captions; judged by the digits classifier
CASES = {
    # SalUn on a class-conditional DDPM erasing digit 3 (judged by the digits world's classifier): global batch 8
    "salun_ddpm": ("ddpm", {"name": "salun", "steps": 4, "batch_size": 8}, {"forget_class": [3]}),
    # ESD-x on a text-to-image model: prompts, k, t and the trajectories' noise of a global batch of 4
    "esd_t2i": ("t2i", {"name": "esd", "steps": 4, "batch_size": 4, "ddim_steps": 4, "lr": 1e-3}, THREE),
    "uce_t2i": (
        "t2i",
        {"name": "uce"},
        THREE,
    ),  # closed form: solved alike, the main process's weights broadcast
    # Retrain from scratch on the retain set (the Retrain reference of every diffusion recipe)
    "retrain_ddpm": (
        "ddpm",
        {"name": "retrain", "steps": 3, "batch_size": 8, "warmup_steps": 1},
        {"forget_class": [3]},
    ),
    "grad_ascent_ddpm": (
        "ddpm",
        {"name": "grad_ascent", "steps": 3, "batch_size": 8, "retain_weight": 0.5, "lr": 1e-4},
        {"forget_class": [3]},
    ),
    "salun_t2i": ("t2i", {"name": "salun", "steps": 3, "batch_size": 8}, THREE),
    # gradient ascent on a text-to-image model: under FSDP every process computes the whole batch (equal gradients)
    "grad_ascent_t2i": (
        "t2i",
        {"name": "grad_ascent", "steps": 3, "batch_size": 8, "retain_weight": 0.5, "lr": 1e-4},
        THREE,
    ),
    # DoCo: its anchor images, flips, noise and timesteps drawn for the global batch, the UNet's gradients
    # averaged before the CPG, the discriminator on the gathered batch (one warm-up step, then both train)
    "doco_t2i": (
        "t2i",
        {
            "name": "doco",
            "steps": 4,
            "warm_up": 1,
            "lr": 1e-3,
            "disc_lr": 1e-2,
            "batch_size": 4,
            "num_anchor_images": 8,
            "anchor_steps": 2,
            "hflip": True,
            "log_every": 1,
        },  # fmt: skip
        THREE,
    ),
}
# The run's accumulation (train section) where a case sets it: Retrain accumulating 2 batches of 8 per step.
TRAIN = {"retrain_ddpm_accumulate": {"gradient_accumulation_steps": 2}}
CASES["retrain_ddpm_accumulate"] = CASES["retrain_ddpm"]
# Weights agree to float round-off (1e-6), DoCo's to 1e-4: its adversarial gradient passes x̂0 = (x_t - √(1-ᾱ)ε)/√ᾱ
# (x 1/√ᾱ, up to 15 near t = T) and the discriminator's BatchNorm over 4 images, which amplify the round-off of
# a UNet run on 2 images instead of 4 (measured: up to 5e-5 of a gradient's largest entry, 2e-5 on the weights
# after 3 model steps at lr 1e-3; an unaveraged or locally normalized gradient moves them by about lr).
# Retrain's to 5e-5: its self-attention key biases have a gradient of 0 up to round-off (softmax ignores a shift
# common to all keys), which Adam's normalized step g/(|g| + 1e-8) turns into steps of up to 1e-5 at lr 2e-3.
WEIGHT_ATOL = {"doco_t2i": 1e-4, "retrain_ddpm": 5e-5, "retrain_ddpm_accumulate": 5e-5}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, pipelines, digits_world, tmp_path):
    checkpoint, method, _ = CASES[case]
    recipe = _recipe(case, pipelines)
    runs = {processes: _erase(recipe, processes, tmp_path / f"p{processes}") for processes in (1, 2)}
    one, two = runs[1], runs[2]
    assert two["metrics"]["num_processes"] == 2 and one["metrics"]["num_processes"] == 1
    if method["name"] != "uce":
        # each process trains on its half of the global batch (SalUn: a forget and a retain pass per step)
        half = [method["batch_size"] // 2] * len(_trained_batches(tmp_path / "p1"))
        assert _trained_batches(tmp_path / "p1") == [2 * n for n in half] and half
        assert _trained_batches(tmp_path / "p2", 0) == _trained_batches(tmp_path / "p2", 1) == half
        assert sorted({s for s, *_ in one["losses"]}) == list(range(1, method["steps"] + 1)), "a log per step"
        assert [s[:2] for s in two["losses"]] == [s[:2] for s in one["losses"]]
        for (step, name, a), (*_, b) in zip(one["losses"], two["losses"]):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), f"step {step} {name}: one process {a}, two {b}"
    else:
        assert not one["losses"] and not two["losses"]
    from safetensors.torch import load_file

    original = load_file(str(pipelines[checkpoint] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(w, original[n]) for n, w in one["unet"].items()), "the UNet must be edited"
    for name, weight in one["unet"].items():
        torch.testing.assert_close(
            two["unet"][name],
            weight,
            rtol=1e-4,
            atol=WEIGHT_ATOL.get(case, 1e-6),
            msg=lambda m, name=name: f"{name}: {m}",
        )
    # The same metrics: counts and rates exactly, scores computed from generated images (FID) to float round-off.
    metrics = {k: v for k, v in one["metrics"].items() if k not in NOT_COMPARED}
    assert {k: v for k, v in two["metrics"].items() if k not in NOT_COMPARED}.keys() == metrics.keys()
    for key, value in metrics.items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6), key
    differences = [abs(a[2] - b[2]) for a, b in zip(one["losses"], two["losses"])]
    print(
        json.dumps(
            {
                "case": case,
                "loss_max_abs_diff": max(differences, default=None),
                "metrics_equal_exactly": [k for k, v in metrics.items() if two["metrics"][k] == v],
                "metrics_equal_to_1e-6": [k for k, v in metrics.items() if two["metrics"][k] != v],
            }
        )
    )


@pytest.mark.slow
def test_bf16_on_two_processes_differs_from_one_only_by_bf16_round_off(pipelines, digits_world, tmp_path):
    """Retrain on the DDPM under bf16 autocast: two processes run the UNet on batches of 4 instead of 8, whose bf16
    matmuls round otherwise, so the runs agree to bf16's round-off, not fp32's. The bound is measured in the same
    test: one process in bf16 against one in fp32 (how far bf16 moves a run); two processes in bf16 must stay
    within twice that of one process in bf16 (a wrong share of the batch moves the loss by tens of percent)."""
    recipe = {
        "method": {"name": "retrain", "steps": 3, "batch_size": 8, "warmup_steps": 1},
        "model": {"family": "diffusion", "checkpoint": str(pipelines["ddpm"])},
        "data": {"forget_class": [3]},
        "eval": {"samples": 4, "steps": 2},
    }
    fp32 = _erase(recipe, 1, tmp_path / "fp32")
    recipe["train"] = {"mixed_precision": "bf16"}
    one, two = _erase(recipe, 1, tmp_path / "p1"), _erase(recipe, 2, tmp_path / "p2")
    assert [s[:2] for s in two["losses"]] == [s[:2] for s in one["losses"]] == [s[:2] for s in fp32["losses"]]
    bf16_moves = max(abs(a[2] - b[2]) for a, b in zip(fp32["losses"], one["losses"]))
    processes_move = max(abs(a[2] - b[2]) for a, b in zip(one["losses"], two["losses"]))
    print(json.dumps({"bf16_vs_fp32_loss": bf16_moves, "two_vs_one_process_bf16_loss": processes_move}))
    assert 0 < bf16_moves, "bf16 autocast must change the losses (it ran in fp32)"
    assert processes_move <= 2 * bf16_moves
    assert _trained_batches(tmp_path / "p2", 0) == _trained_batches(tmp_path / "p2", 1) == [4, 4, 4]


# ERASE_SCRIPT with accelerate's state set to FSDP when the launch asks for it: accelerate turns FSDP on for GPU
# devices only and runs plain DDP under gloo, while torch's FSDP2 itself runs on gloo (as benchmarks/scaling.py).
FSDP_ON_CPU = """
import os
import unlearn.pipeline
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

make_accelerator = unlearn.pipeline.make_accelerator

def sharding(*args, **kwargs):
    accelerator = make_accelerator(*args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator

unlearn.pipeline.make_accelerator = sharding
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["esd_t2i", "salun_t2i", "grad_ascent_t2i"])
def test_fsdp_on_two_processes_matches_one(case, pipelines, digits_world, tmp_path):
    """ESD, SalUn and gradient ascent under `recipes/accelerate/fsdp_sd.yml` (FSDP2: the UNet's transformer and ResNet blocks
    sharded in place, every pass through it gathering them) on two gloo processes give the one-process run."""
    recipe = _recipe(case, pipelines)
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp_sd.yml"
    one = _erase(recipe, 1, tmp_path / "p1")
    two = _erase(recipe, 2, tmp_path / "p2", config=config, preamble=FSDP_ON_CPU)
    assert two["metrics"]["num_processes"] == 2
    assert [s[:2] for s in two["losses"]] == [s[:2] for s in one["losses"]] and one["losses"]
    for (step, name, a), (*_, b) in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), f"step {step} {name}: one process {a}, two {b}"
    for name, weight in one["unet"].items():
        torch.testing.assert_close(
            two["unet"][name], weight, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert _trained_batches(tmp_path / "p2", 0) == _trained_batches(tmp_path / "p2", 1)
    for key, value in one["metrics"].items():
        if key not in NOT_COMPARED:
            assert two["metrics"][key] == pytest.approx(value, rel=1e-6), key


def _recipe(case: str, pipelines: dict) -> dict:
    """The recipe of a case: its method and data on its tiny pipeline, a short evaluation, its train section."""
    checkpoint, method, data = CASES[case]
    return {
        "method": method,
        "model": {"family": "diffusion", "checkpoint": str(pipelines[checkpoint])},
        "data": data,
        "eval": {"samples": 4, "steps": 2},
        "train": TRAIN.get(case, {}),
    }


def _erase(recipe: dict, processes: int, out: Path, config: Path | None = None, preamble: str = "") -> dict:
    """`unlearn erase` of `recipe` into `out` on `processes` processes, a log line per step; the losses logged,
    the metrics and the UNet's weights."""
    from safetensors.torch import load_file

    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(recipe))
    script = out.parent / f"erase_{out.name}.py"
    script.write_text(preamble + ERASE_SCRIPT)
    launch(script, [str(out.parent / f"{out.name}.yaml"), str(out)], processes, out.parent, PORT, config)
    lines = (out / "train.jsonl").read_text().splitlines() if (out / "train.jsonl").exists() else []
    return {
        "losses": [
            (r["step"], k, v) for r in map(json.loads, lines) for k, v in r.items() if k not in NOT_LOSSES
        ],
        "metrics": json.loads((out / "metrics.json").read_text()),
        "unet": load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")),
    }


def _trained_batches(out: Path, rank: int = 0) -> list[int]:
    return json.loads((out / f"trained_batches_rank{rank}.json").read_text())


# -- a pass's short last batch (default suite) ----------------------------------------------------------------


@pytest.mark.parametrize("processes", [2, 4])
def test_an_uneven_short_batch_gives_the_gradient_of_the_whole_batch(pipelines, processes):
    """The last batch of a pass (`train.endless`) may not split evenly: 3 retain images on 2 processes (shares of
    2 and 1) or on 4 (one process with a stand-in image at weight 0). Each process's SalUn retain loss, drawn from
    the same seed and scaled by `share_weight`, averaged over the processes as DDP averages gradients, gives the
    one-process loss and gradient of the whole batch (to float round-off)."""
    from types import SimpleNamespace

    from tiny_diffusion import load_pipeline

    from unlearn.methods.salun import SalUnDiffusion
    from unlearn.train import shard

    model = load_pipeline(pipelines["ddpm"])
    params = [p for p in model.unet.parameters() if p.requires_grad]
    batch = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 4, 7]))
    salun = SalUnDiffusion(condition_dropout=0.5)  # its dropped conditions are drawn for the whole batch too

    def loss_and_gradient(accelerator):
        torch.manual_seed(3)  # every process draws the global batch's noise, timesteps and dropout alike
        loss = salun.retain_loss(model, batch, accelerator=accelerator)
        return loss.detach(), torch.autograd.grad(loss, params)

    whole_loss, whole_gradient = loss_and_gradient(None)
    shares = [
        loss_and_gradient(SimpleNamespace(num_processes=processes, process_index=i)) for i in range(processes)
    ]
    assert sum(loss for loss, _ in shares) / processes == pytest.approx(whole_loss.item(), rel=1e-5)
    # round-off: up to 3e-6 of the largest gradient entry (measured); key biases' gradients are 0 up to round-off
    scale = max(whole.abs().max().item() for whole in whole_gradient)
    for k, whole in enumerate(whole_gradient):
        averaged = sum(g[k] for _, g in shares) / processes
        torch.testing.assert_close(averaged, whole, rtol=1e-4, atol=1e-5 * scale)
    parts = [
        shard(SimpleNamespace(num_processes=processes, process_index=i), batch[1], uneven=True)
        for i in range(processes)
    ]
    assert [p.tolist() for p in parts] == ([[1, 4], [7]] if processes == 2 else [[1], [4], [7], [1]])
    with pytest.raises(ConfigError, match="a batch of 3 cannot be split evenly across 2 processes"):
        shard(SimpleNamespace(num_processes=2, process_index=0), batch[1])  # equal shares unless told so


# -- the refusal (default suite) ------------------------------------------------------------------------------


def test_a_method_not_made_multi_process_is_refused_in_one_sentence():
    """Every built-in method runs on several processes; a method of one's own that does not say `multi_process`
    (its loop knows nothing of sharding) is refused on several, in one sentence naming the family's methods that
    run there."""
    from dataclasses import dataclass

    from unlearn.methods import METHODS, get_method
    from unlearn.methods.base import Method
    from unlearn.pipeline import check_processes

    for variants in METHODS.values():
        for variant in variants:
            for family in variant.families:
                check_processes(variant(), family, 4)  # no built-in method is refused

    @dataclass
    class OwnLoop(Method):
        families = ("diffusion", "gan")

        def unlearn(self, model, data, accelerator):
            return model

    for family in ("diffusion", "gan"):
        with pytest.raises(ConfigError) as refused:
            check_processes(OwnLoop(), family, 2)
        said = str(refused.value)
        able = sorted(n for n, vs in METHODS.items() if any(family in v.families for v in vs))
        assert f"'OwnLoop' on {family} models runs in a single process" in said and "\n" not in said
        assert ", ".join(able) in said, said
        check_processes(OwnLoop(), family, 1)  # one process: anything runs
    check_processes(get_method("random_label", family="classifier")(), "classifier", 4)  # fit() shards them
