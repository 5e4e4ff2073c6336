"""ANT and RealEra on two CPU processes (gloo) give the one-process run: the same losses step by step, the same
weights, the same saliency mask and LoRAs, and the same metrics, for the same global batch.

As tests/test_multiprocess_generative.py: each run goes through the whole pipeline (`unlearn erase`) in a script
that logs every training step, the two-process run under `accelerate launch --multi_gpu --num_processes 2` with no
GPU visible (the pipeline switches to gloo itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from launching import NOT_COMPARED, NOT_LOSSES, launch
from tiny_diffusion import ddpm_and_t2i_pipelines, tiny_sd_pipeline

# `unlearn erase RECIPE -o OUT` with a log line per training step, the batch size of every UNet pass that trains
# (train mode, with gradient) in this process written to OUT/trained_batches_rank<R>.json, and the loss of every
# backward pass (this process's share, unrounded: train.jsonl rounds to 6 decimals) to OUT/losses_rank<R>.json.
ERASE_SCRIPT = """
import functools, json, os, sys
import torch
import unlearn.methods.ant, unlearn.methods.realera
from unlearn.cli import main
from unlearn.models.diffusion import Diffusion
from unlearn.train import Trainer, train_steps

for module in (unlearn.methods.ant, unlearn.methods.realera):
    module.train_steps = functools.partial(train_steps, log_every=1)
sizes, forward = [], Diffusion.forward

def recording(self, x_t, t, cond):
    if self.training and torch.is_grad_enabled():
        sizes.append(len(x_t))
    return forward(self, x_t, t, cond)

Diffusion.forward = recording
losses, step = [], Trainer.step

def recording_step(self, loss, optimizer=None, name="loss"):
    if self._accumulating:  # (step opens the accumulation itself, then calls itself once more)
        losses.append([self.stage, name, float(loss.detach())])
    return step(self, loss, optimizer, name)

Trainer.step = recording_step
status = main(["erase", sys.argv[1], "-o", sys.argv[2]])
rank = os.environ.get("RANK", "0")
for name, values in (("trained_batches", sizes), ("losses", losses)):
    with open(os.path.join(sys.argv[2], f"{name}_rank{rank}.json"), "w") as handle:
        json.dump(values, handle)
sys.exit(status)
"""


PORT = 29581  # the main process's port of this file's launches (files may run at once)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return ddpm_and_t2i_pipelines(tmp_path_factory.mktemp("pipelines"))


THREE = {"dataset": "digits", "concept": "three"}  # the digits captions; judged by the digits classifier
# ANT's single-concept mode: one gradient map per forget condition and seed (t2i: 5 prompts x 3 seeds = 15 maps, 8
# and 7 on two processes), then Adam inside their intersection; global batch 4, trajectories of 4 DDIM steps
ANT = {
    "name": "ant",
    "mode": "saliency",
    "steps": 3,
    "batch_size": 4,
    "split_step": 2,
    "ddim_steps": 4,
    "lr": 1e-3,
    "mask_seeds": [0, 1, 2],
    "mask_iterations": 2,
}
REALERA = {
    "name": "realera",
    "num_neighbors": 2,
    "num_beyond": 2,
    "lora_steps": 3,
    "lora_rank": 2,
    "lora_lr": 1e-2,
    "lora_batch_size": 4,
}
CASES = {
    "ant_t2i": ("t2i", ANT, THREE, {}),
    # class-conditional: the forget class's id as the condition (saliency mode only)
    "ant_ddpm": ("ddpm", ANT, {"forget_class": [3]}, {}),
    # several concepts: one LoRA per concept trained under DDP, the fusion solved alike and broadcast
    "ant_lora_t2i": (
        "t2i",
        {
            "name": "ant",
            "mode": "lora",
            "steps": 2,
            "batch_size": 4,
            "split_step": 2,
            "ddim_steps": 4,
            "lr": 1e-2,
            "lora_rank": 2,
            "lora_alpha": 2.0,
        },
        {"dataset": "digits", "concept": ["three", "seven"]},
        {},
    ),
    # closed form (mined from the same generator, solved alike, broadcast), then the LoRA stage under DDP
    "realera_t2i": ("t2i", REALERA, THREE, {}),
    # gradient accumulation: every micro-batch a fresh global batch of 4, two per optimizer step
    "ant_t2i_accumulate": ("t2i", {**ANT, "steps": 2}, THREE, {"gradient_accumulation_steps": 2}),
    "realera_t2i_accumulate": (
        "t2i",
        {**REALERA, "lora_steps": 2},
        THREE,
        {"gradient_accumulation_steps": 2},
    ),
}
# The losses, unrounded, agree backward pass by backward pass to 5e-5 relative: they are small residuals (RealEra's
# about 2e-4, the MSE of differences of about 1e-2 between predictions of order 1), in which the float round-off of
# a UNet run on half the batch shows at about 1e-6..1e-5 (measured at most: RealEra 7.3e-6, ANT's LoRAs 1.4e-6,
# ANT on the DDPM 2.2e-7). A share drawn otherwise, or a gradient not averaged, moves them by tens of percent.
LOSS_REL = 5e-5
# Weights agree to float round-off (1e-6) except where Adam amplifies it. At the same weights the sharded gradient
# is the one-process gradient to 2e-6 of each tensor's largest entry (measured in one process, the two shares'
# gradients averaged as DDP does); Adam's step lr·m/(√v + 1e-8) turns the round-off of entries whose gradient is
# near 1e-8 into weight differences that grow with lr. Measured after 2-3 steps: ANT on the DDPM 4.1e-5 at lr 1e-3,
# all on its self-attention key biases, whose gradient is 0 up to round-off (softmax ignores a shift common to all
# keys; 1.7e-6 on every other tensor), as Retrain's in tests/test_multiprocess_generative.py; ANT's LoRAs at lr
# 1e-2: 7.3e-6 on their factors, 2.3e-6 on the fused weights; RealEra's LoRA at lr 1e-2: 1.4e-5 on the merged
# weights. The tolerances are about 3x those, and at least 100x below lr: an error beyond round-off moves Adam's
# steps by about lr.
WEIGHT_ATOL = {
    "ant_ddpm": 1e-4,
    "ant_lora_t2i": 3e-5,
    "realera_t2i": 5e-5,
    "realera_t2i_accumulate": 5e-5,
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, pipelines, digits_world, tmp_path):
    checkpoint, method, data, train = CASES[case]
    recipe = {
        "method": method,
        "model": {"family": "diffusion", "checkpoint": str(pipelines[checkpoint])},
        "data": data,
        "train": train,
        "eval": {"samples": 4, "steps": 2},
    }
    one, two = (_erase(recipe, processes, tmp_path / f"p{processes}") for processes in (1, 2))
    original = _original(pipelines[checkpoint])
    pairs = list(zip(one["losses"], two["losses"]))
    trained = _trained_batches(tmp_path / "p1")
    metrics = {k: v for k, v in one["metrics"].items() if k not in NOT_COMPARED}
    weight_differences = _differences(one["unet"], two["unet"])
    exact = _whole_batch_losses(two)
    print(  # the measured differences, before any assertion
        json.dumps(
            {
                "case": case,
                "trained_batches_one_process": trained,
                "loss_max_abs_diff": max((abs(a[3] - b[3]) for a, b in pairs), default=None),
                "unrounded_loss_max_rel_diff": max(
                    (abs(a[2] - b) / abs(a[2]) for a, b in zip(one["exact"][0], exact)), default=None
                ),
                "weights_max_abs_diff": dict(weight_differences[:3]),
                "extras_max_abs_diff": {
                    f: _differences(t, two["extras"].get(f, {}))[:2] for f, t in one["extras"].items()
                },
                "weight_max_change": _differences(original, one["unet"])[0],
                "metrics_not_exactly_equal": {
                    k: (v, two["metrics"].get(k)) for k, v in metrics.items() if two["metrics"].get(k) != v
                },
            }
        )
    )
    assert two["metrics"]["num_processes"] == 2 and one["metrics"]["num_processes"] == 1
    # each process trains on its half of every global batch (the sizes of the trained UNet calls: ANT passes
    # x_early and x_late under c and "" in one call, RealEra a forget, a beyond-concept and a retain pass per step)
    assert trained and all(size % 2 == 0 for size in trained)
    half = [size // 2 for size in trained]
    assert _trained_batches(tmp_path / "p2", 0) == _trained_batches(tmp_path / "p2", 1) == half
    steps = method.get("steps", method.get("lora_steps"))
    for stage in {stage for stage, *_ in one["losses"]}:
        logged = sorted({s for name, s, *_ in one["losses"] if name == stage})
        assert logged == list(range(1, steps + 1)), f"a log per step of {stage}"
    assert [s[:3] for s in two["losses"]] == [s[:3] for s in one["losses"]]
    for (stage, step, name, a), (*_, b) in pairs:
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (
            f"{stage} step {step} {name}: one process {a}, two {b}"
        )
    # unrounded, backward pass by backward pass: the mean of the processes' losses (each the mean over its equal
    # share) is the loss of the whole batch
    assert (
        [a[:2] for a in two["exact"][0]]
        == [a[:2] for a in two["exact"][1]]
        == [a[:2] for a in one["exact"][0]]
    )
    assert len(exact) == len(one["exact"][0]) > 0
    for index, ((stage, name, a), b) in enumerate(zip(one["exact"][0], exact)):
        assert b == pytest.approx(a, rel=LOSS_REL), (
            f"{stage} {name} backward pass {index}: one process {a}, two {b}"
        )
    atol = WEIGHT_ATOL.get(case, 1e-6)
    # what the run folder holds besides the model: ANT's saliency mask, equal bit for bit (the processes' partial
    # intersections intersect to that of all maps), or its LoRAs (trained weights, as the UNet's)
    assert one["extras"].keys() == two["extras"].keys()
    for file, tensors in one["extras"].items():
        for name, tensor in tensors.items():
            if file == "saliency_mask.safetensors":
                assert torch.equal(two["extras"][file][name], tensor), f"{file} {name}"
            else:
                torch.testing.assert_close(two["extras"][file][name], tensor, rtol=1e-4, atol=atol)
    assert any(not torch.equal(w, original[n]) for n, w in one["unet"].items()), "the UNet must be edited"
    for name, weight in one["unet"].items():
        torch.testing.assert_close(
            two["unet"][name], weight, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )
    # The same metrics: counts and rates exactly, scores computed from generated images (FID) to float round-off.
    assert {k: v for k, v in two["metrics"].items() if k not in NOT_COMPARED}.keys() == metrics.keys()
    for key, value in metrics.items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("method", [ANT, REALERA], ids=["ant", "realera"])
def test_bf16_on_two_processes_differs_from_one_only_by_bf16_round_off(
    method, pipelines, digits_world, tmp_path
):
    """Under bf16 autocast (on the CPU) two processes run the UNet on half batches, whose bf16 matmuls round
    otherwise, so the runs agree to bf16's round-off, not fp32's. The bound is measured in the same test, as
    tests/test_multiprocess_generative.py does for Retrain: one process in bf16 against one in fp32 (how far bf16
    moves a run); two processes in bf16 must stay within twice that of one process in bf16."""
    recipe = {
        "method": method,
        "model": {"family": "diffusion", "checkpoint": str(pipelines["t2i"])},
        "data": THREE,
        "eval": {"samples": 4, "steps": 2},
    }
    fp32 = _erase(recipe, 1, tmp_path / "fp32")
    recipe["train"] = {"mixed_precision": "bf16"}
    one, two = _erase(recipe, 1, tmp_path / "p1"), _erase(recipe, 2, tmp_path / "p2")
    assert [s[:3] for s in two["losses"]] == [s[:3] for s in one["losses"]] == [s[:3] for s in fp32["losses"]]
    # the unrounded loss of every backward pass (two processes: the mean of their shares' losses)
    fp32_loss, one_loss, two_loss = (_whole_batch_losses(run) for run in (fp32, one, two))
    assert len(fp32_loss) == len(one_loss) == len(two_loss) > 0
    loss_bf16_moves = max(abs(a - b) for a, b in zip(fp32_loss, one_loss))
    loss_processes_move = max(abs(a - b) for a, b in zip(one_loss, two_loss))
    weights_bf16_move = _differences(fp32["unet"], one["unet"])[0][1]
    weights_processes_move = _differences(one["unet"], two["unet"])[0][1]
    print(
        json.dumps(
            {
                "method": method["name"],
                "bf16_vs_fp32_loss": loss_bf16_moves,
                "two_vs_one_process_bf16_loss": loss_processes_move,
                "bf16_vs_fp32_weights": weights_bf16_move,
                "two_vs_one_process_bf16_weights": weights_processes_move,
                "weight_max_change": _differences(_original(pipelines["t2i"]), one["unet"])[0][1],
            }
        )
    )
    assert 0 < loss_bf16_moves, "bf16 autocast must change the losses (it ran in fp32)"
    assert loss_processes_move <= 2 * loss_bf16_moves
    assert weights_processes_move <= 2 * weights_bf16_move
    half = [size // 2 for size in _trained_batches(tmp_path / "p1")]
    assert _trained_batches(tmp_path / "p2", 0) == _trained_batches(tmp_path / "p2", 1) == half


def _erase(recipe: dict, processes: int, out: Path) -> dict:
    """`unlearn erase` of `recipe` into `out` on `processes` processes, a log line per step: the losses logged
    (stage, step, name, value), the metrics, the UNet's weights and the run folder's other safetensors files."""
    from safetensors.torch import load_file

    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(recipe))
    script = out.parent / "erase.py"
    script.write_text(ERASE_SCRIPT)
    launch(script, [str(out.parent / f"{out.name}.yaml"), str(out)], processes, out.parent, PORT)
    lines = (out / "train.jsonl").read_text().splitlines()
    return {
        "losses": [
            (r["stage"], r["step"], k, v)
            for r in map(json.loads, lines)
            for k, v in r.items()
            if k not in NOT_LOSSES
        ],
        "metrics": json.loads((out / "metrics.json").read_text()),
        "unet": load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")),
        "extras": {p.name: load_file(str(p)) for p in sorted(out.glob("*.safetensors"))},
        # per process, the unrounded loss of every backward pass: [stage, name, value]
        "exact": [json.loads(path.read_text()) for path in sorted(out.glob("losses_rank*.json"))],
    }


def _whole_batch_losses(run: dict) -> list[float]:
    """The loss of every backward pass on the whole global batch: the mean of the processes' losses."""
    return [sum(values) / len(values) for values in zip(*[[v for *_, v in rank] for rank in run["exact"]])]


def _original(pipeline: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors"))


def _differences(a: dict, b: dict) -> list[tuple[str, float]]:
    """(name, largest absolute difference) of the tensors both hold, largest first."""
    found = [(n, float((b[n].float() - t.float()).abs().max())) for n, t in a.items() if n in b]
    return sorted(found, key=lambda item: -item[1])


def _trained_batches(out: Path, rank: int = 0) -> list[int]:
    return json.loads((out / f"trained_batches_rank{rank}.json").read_text())


# -- the default suite ----------------------------------------------------------------------------------------


def test_ant_and_realera_say_they_run_on_several_processes():
    from unlearn.methods import get_method
    from unlearn.pipeline import check_processes

    for name in ("ant", "realera"):
        method = get_method(name, family="diffusion")
        assert method.multi_process
        check_processes(method(), "diffusion", 2)


def test_a_batch_that_cannot_be_split_is_refused_before_any_work(tmp_path, one_thread):
    """On N processes each step's global batch is cut into N equal shares: ANT's batch_size and RealEra's
    lora_batch_size must be multiples of N, refused in one sentence before the saliency maps or the closed form."""
    from types import SimpleNamespace

    from tiny_diffusion import cat_task, load_pipeline

    from unlearn.errors import ConfigError
    from unlearn.methods.ant import ANT
    from unlearn.methods.realera import RealEra

    model = load_pipeline(tiny_sd_pipeline(tmp_path / "t2i", vae=False))
    task = cat_task(model, num_images=2)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    two = SimpleNamespace(num_processes=2, process_index=0)
    refusals = [
        (ANT(mode="saliency", batch_size=3, split_step=2, ddim_steps=4), "ant batch_size 3"),
        (RealEra(lora_steps=1, lora_batch_size=1), "realera lora_batch_size 1"),
    ]
    for method, said in refusals:
        with pytest.raises(ConfigError, match=f"{said} cannot be split evenly across 2 processes") as refused:
            method.unlearn(model, task, two)
        assert "\n" not in str(refused.value)
    assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters()), "nothing ran"
