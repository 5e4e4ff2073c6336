"""Generative erasure on 1 and 2 processes, the same global batch: losses step by step, weights, metrics.

Runs digits-world recipes (the worlds are built on first use) through `unlearn erase`, once in one process and
once under `accelerate launch --multi_gpu --num_processes 2` (on a machine without a GPU: gloo on CPU), with a
training log line per step and a short training (the overrides below), and prints, per recipe, the largest
difference of a logged loss (in train.jsonl: rounded to 6 decimals), of a saved weight (every .safetensors
file under the run's model/: a diffusion pipeline's UNet, a GAN's generator and discriminator) and of each
metric; written to benchmarks/results/multiprocess_parity.json. Wall times are printed too; on a 2-core
machine they measure no scaling (the two processes share the cores).

    python benchmarks/multiprocess_parity.py [--only salun_ddpm esd_t2i ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "multiprocess_parity.json"
FAST = ["eval.reference=null", "eval.samples=20"]
CASES = {
    "salun_ddpm": ("recipes/diffusion/digits_ddpm/salun.yaml", ["method.steps=10"]),
    "salun_t2i": ("recipes/diffusion/digits_t2i/salun.yaml", ["method.steps=10"]),
    "esd_t2i": ("recipes/diffusion/digits_t2i/esd.yaml", ["method.steps=10"]),
    "uce_t2i": ("recipes/diffusion/digits_t2i/uce.yaml", []),
    "grad_ascent_ddpm": ("recipes/diffusion/digits_ddpm/grad_ascent.yaml", ["method.steps=10"]),
    "retrain_ddpm": (
        "recipes/diffusion/digits_ddpm/retrain.yaml",
        ["method.steps=10", "method.warmup_steps=2"],
    ),
    "doco_t2i": (
        "recipes/diffusion/digits_t2i/doco.yaml",
        ["method.steps=20", "method.warm_up=10", "method.num_anchor_images=64", "method.log_every=1"],
    ),
    # saliency mode: 1 seed x 1 iteration per gradient map (5 maps), then 4 Adam steps on global batches of
    # 16. The mask agrees bit for bit; 5 of the UNet's 1,000,097 entries differ by more than 1e-6, the most
    # 1.3e-5 (lr 1e-3): Adam's step lr·m/(√v + eps) amplifies the gradient's round-off where it is small.
    "ant_t2i": (
        "recipes/diffusion/digits_t2i/ant.yaml",
        ["method.steps=4", "method.mask_seeds=[24]", "method.mask_iterations=1"],
    ),
    # the closed form as the recipe says, then 5 LoRA steps (global batch 32)
    "realera_t2i": ("recipes/diffusion/digits_t2i/realera.yaml", ["method.lora_steps=5"]),
    # 5 adaptation steps on 32 negatives, 5 unlearning steps on 500 positives, global batch 64; FID on 64
    # samples
    "adapt_then_unlearn_gan": (
        "recipes/gan/digits/adapt_then_unlearn.yaml",
        [
            "eval.samples=64",
            "method.negatives=32",
            "method.positives=500",
            "method.fisher_samples=16",
            "method.adapt_steps=5",
            "method.steps=5",
        ],
    ),
    # the world's loop from fresh weights, 20 steps of global batch 64 (every sample is then judged an 8: no
    # kept sample, no FID to compare; still so after 200 steps). Adversarial training amplifies round-off:
    # with 200 steps the logged losses first differ at step 33 (by 1e-6) and by 1e-2 at most, the weights by
    # 2.1e-3 (discriminator) and 3.6e-5 (generator); one process on 2 threads instead of 1 differs from it as
    # much (also from step 33; 2.8e-3, 1.5e-3, 1.5e-5): float round-off growing, not a different batch.
    "retrain_gan": ("recipes/gan/digits/retrain.yaml", ["eval.samples=64", "method.steps=20"]),
}
RUNNER = """
import functools, sys
import unlearn.methods.adapt_then_unlearn as atu
import unlearn.methods.ant, unlearn.methods.baselines, unlearn.methods.esd, unlearn.methods.realera
import unlearn.methods.salun
import unlearn.worlds.digits_gan as digits_gan
from unlearn.cli import main
from unlearn.train import train_diffusion, train_steps

# a log line per step (the loops log every 50 steps, the GAN world's every 1,000)
methods = unlearn.methods
for module in (methods.ant, methods.baselines, methods.esd, methods.realera, methods.salun):
    module.train_steps = functools.partial(train_steps, log_every=1)
unlearn.methods.baselines.train_diffusion = functools.partial(train_diffusion, log_every=1)
atu.Trainer = functools.partial(atu.Trainer, log_every=1)  # Adapt-then-Unlearn's two stages
digits_gan.train_gan = functools.partial(digits_gan.train_gan, log_every=1)  # RetrainGAN imports it late
sys.exit(main(["erase", *sys.argv[1:]]))
"""
NOT_COMPARED = {"RTE_s", "device", "num_processes"}
NOT_LOSSES = {"stage", "epoch", "step", "phase", "lr", "elapsed_s"}


def erase(runner: Path, recipe: str, overrides: list[str], out: Path, processes: int) -> float:
    command = [sys.executable, str(runner), str(ROOT / recipe), *overrides, "-o", str(out)]
    if processes > 1:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "29561", *command[1:],
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def losses(out: Path) -> list[tuple]:
    path = out / "train.jsonl"
    records = map(json.loads, path.read_text().splitlines()) if path.exists() else []
    return [(r.get("stage"), r["step"], k, v) for r in records for k, v in r.items() if k not in NOT_LOSSES]


def weights(folder: Path, pattern: str = "**/*.safetensors") -> dict:
    """Every tensor of the .safetensors files under `folder` matching `pattern`, named `file:tensor` (file
    relative to `folder`). Under a run's model/: a diffusion pipeline's
    unet/diffusion_pytorch_model.safetensors (and any other component it saved), a GAN's generator.safetensors
    and discriminator.safetensors."""
    from safetensors.torch import load_file

    found = {}
    for file in sorted(folder.glob(pattern)):
        where = file.relative_to(folder).as_posix()
        found.update({f"{where}:{name}": tensor.double() for name, tensor in load_file(str(file)).items()})
    return found


def differences(a: dict, b: dict) -> dict:
    """name: the largest absolute difference of the tensors of `a` and `b` (the same names in both)."""
    assert a.keys() == b.keys(), "the runs saved different tensors"
    return {k: float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a}


def per_file(diffs: dict) -> dict:
    return {
        file: max(d for k, d in diffs.items() if k.split(":")[0] == file)
        for file in sorted({k.split(":")[0] for k in diffs})
    }


def compare(one: Path, two: Path) -> dict:
    a, b = losses(one), losses(two)
    assert [x[:-1] for x in a] == [x[:-1] for x in b], "the runs logged different steps"
    diffs = differences(weights(one / "model"), weights(two / "model"))
    if not diffs:
        raise SystemExit(f"{one / 'model'} holds no .safetensors file")
    # what the run folder holds beside the model (ANT's saliency_mask.safetensors)
    extras = differences(weights(one, "*.safetensors"), weights(two, "*.safetensors"))
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (one, two))
    numbers = {k: v for k, v in ma.items() if k not in NOT_COMPARED and isinstance(v, (int, float))}
    return {
        "logged_losses": len(a),
        "loss_max_abs_diff": max((abs(x[-1] - y[-1]) for x, y in zip(a, b)), default=None),
        "weights_compared": len(diffs),
        "weight_max_abs_diff": max(diffs.values()),
        "weight_max_abs_diff_in": max(diffs, key=diffs.get),
        "weight_max_abs_diff_per_file": per_file(diffs),
        "weights_differing_over_1e-6": sorted(k for k, d in diffs.items() if d > 1e-6),
        "extras_max_abs_diff_per_file": per_file(extras),
        "metrics_equal": sorted(k for k in ma if k not in NOT_COMPARED and ma[k] == mb[k]),
        "metrics_rel_diff": {
            k: abs(v - mb[k]) / max(abs(v), 1e-12) for k, v in numbers.items() if v != mb[k]
        },
        "metrics_1_process": {k: v for k, v in ma.items() if k not in NOT_COMPARED},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--keep", type=Path, help="write the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or temporary
        Path(folder).mkdir(parents=True, exist_ok=True)
        runner = Path(folder) / "runner.py"
        runner.write_text(RUNNER)
        for name in args.only:
            recipe, overrides = CASES[name]
            keys = {o.split("=")[0] for o in overrides}  # a case's own eval.samples replaces FAST's
            overrides = [o for o in FAST if o.split("=")[0] not in keys] + overrides
            seconds = {n: erase(runner, recipe, overrides, Path(folder) / f"{name}-{n}", n) for n in (1, 2)}
            row = {"recipe": recipe, "overrides": overrides, "wall_s": seconds, "n_seeds": 1}
            row.update(compare(Path(folder) / f"{name}-1", Path(folder) / f"{name}-2"))
            results[name] = row
            shown = {
                k: row[k] for k in ("loss_max_abs_diff", "weight_max_abs_diff", "metrics_rel_diff", "wall_s")
            }
            print(name, json.dumps(shown), flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    from unlearn.checkpoints import write_json

    old = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    write_json({**old, **results}, RESULT)
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
