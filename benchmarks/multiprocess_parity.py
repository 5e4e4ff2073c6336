"""Generative erasure on 1 and 2 processes, the same global batch: losses step by step, weights, metrics.

Runs digits-world recipes (the worlds are built on first use) through `unlearn erase`, once in one process and
once under `accelerate launch --multi_gpu --num_processes 2` (on a machine without a GPU: gloo on CPU), with a
training log line per step and a short training (the overrides below), and prints, per recipe, the largest
difference of a logged loss, of a UNet weight and of each metric; written to
benchmarks/results/multiprocess_parity.json. Wall times are printed too; on a 2-core machine they measure no
scaling (the two processes share the cores).

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
}
RUNNER = """
import functools, sys
import unlearn.methods.baselines, unlearn.methods.esd, unlearn.methods.salun
from unlearn.cli import main
from unlearn.train import train_diffusion, train_steps

for module in (unlearn.methods.baselines, unlearn.methods.esd, unlearn.methods.salun):  # a log line per step (they log every 50)
    module.train_steps = functools.partial(train_steps, log_every=1)
unlearn.methods.baselines.train_diffusion = functools.partial(train_diffusion, log_every=1)
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
    return [(r["step"], k, v) for r in records for k, v in r.items() if k not in NOT_LOSSES]


def compare(one: Path, two: Path) -> dict:
    from safetensors.torch import load_file

    a, b = losses(one), losses(two)
    assert [x[:2] for x in a] == [x[:2] for x in b], "the runs logged different steps"
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(str(one / unet)), load_file(str(two / unet))
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (one, two))
    numbers = {k: v for k, v in ma.items() if k not in NOT_COMPARED and isinstance(v, (int, float))}
    return {
        "logged_losses": len(a),
        "loss_max_abs_diff": max((abs(x[2] - y[2]) for x, y in zip(a, b)), default=None),
        "weight_max_abs_diff": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
        "weight_max_abs_diff_in": max(wa, key=lambda k: float((wa[k] - wb[k]).abs().max())),
        "metrics_equal": sorted(k for k in ma if k not in NOT_COMPARED and ma[k] == mb[k]),
        "metrics_rel_diff": {
            k: abs(v - mb[k]) / max(abs(v), 1e-12) for k, v in numbers.items() if v != mb[k]
        },
        "metrics_1_process": {k: v for k, v in ma.items() if k not in NOT_COMPARED},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        runner = Path(folder) / "runner.py"
        runner.write_text(RUNNER)
        for name in args.only:
            recipe, overrides = CASES[name]
            seconds = {
                n: erase(runner, recipe, FAST + overrides, Path(folder) / f"{name}-{n}", n) for n in (1, 2)
            }
            row = {"recipe": recipe, "overrides": FAST + overrides, "wall_s": seconds, "n_seeds": 1}
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
