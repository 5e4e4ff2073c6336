"""Does `method.lr: auto` give a user's own model a sensible erasure, where the hand-tuned recipe does not?

Two cases, each erasing digit 3 with random labelling (`recipes/classifier/digits/random_label.yaml`):

(a) a small 1-channel ViT (transformers `ViTForImageClassification`, built from a config and trained here on the
    digits for a minute of CPU, saved as a transformers folder with its image processor): the recipe as it is
    (tuned for the digits CNN), the recipe with `method.lr=auto`, and Retrain (the recipe's reference, run once
    on the ViT and shared by both);
(b) the digits CNN of the digits world: the hand-tuned recipe against `method.lr: auto`.

Targets: on the ViT, `auto` keeps test accuracy (TA) within a few points of Retrain's while UA reaches
Retrain's, and the plain recipe ends with the utility warning; on the CNN, `auto` is not worse than the
hand-tuned recipe (Avg. Gap to Retrain). One seed (n=1) unless `--seeds` says more.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/tune.py [--work runs/bench_tune] [--seeds 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classifier" / "digits" / "random_label.yaml"
RETRAIN = ROOT / "recipes" / "classifier" / "digits" / "retrain.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tune.json"
KEYS = ("UA", "RA", "TA", "MIA", "avg_gap", "RTE_s")


def build_vit(folder: Path, seed: int = 0, epochs: int = 60) -> dict:
    """Train a small 1-channel ViT on the digits' training split and save it (with its image processor) as a
    transformers folder; returns its test accuracy and training time. Reused when the folder exists."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from unlearn.datasets import load_dataset

    done = folder / "trained.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")

    def normalised(
        images: torch.Tensor,
    ) -> torch.Tensor:  # as the image processor below says: (x - 0.5) / 0.5
        return (images - 0.5) / 0.5

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * -(-len(train) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), 64):
            index = order[start : start + 64]
            logits = model(pixel_values=normalised(train.images[index])).logits
            loss = torch.nn.functional.cross_entropy(logits, train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(pixel_values=normalised(test.images)).logits.argmax(1)
    info = {
        "test_accuracy": round(100.0 * float((predicted == test.labels).float().mean()), 2),
        "train_seconds": round(time.perf_counter() - started, 1),
        "epochs": epochs,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor = ViTImageProcessor(
        do_resize=False, size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5], do_rescale=False
    )
    processor.save_pretrained(folder)
    done.write_text(json.dumps(info, indent=2))
    return info


def erase(recipe: Path, overrides: list[str], output: Path) -> dict:
    """One `unlearn erase` run (reused when its folder is complete); its metrics."""
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    return run(load_recipe(recipe, overrides), output, log=lambda message: print(f"  {message}", flush=True))


def row(name: str, metrics: dict) -> dict:
    out = {"setting": name, **{k: metrics.get(k) for k in KEYS}}
    out["lr"] = metrics.get("tuned_lr")
    out["utility_warning"] = bool(metrics.get("utility_warning"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_tune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()

    vit = args.work / "vit_digits"
    print(f"training the ViT into {vit} ...", flush=True)
    vit_info = build_vit(vit)
    print(f"  ViT: {vit_info}", flush=True)

    results: dict = {"vit": {}, "cnn": {}}
    for seed in args.seeds:
        model = [f"model.checkpoint={vit}", "model.arch=null", f"seed={seed}"]
        retrain_dir = args.work / f"vit_retrain_seed{seed}"
        print(f"(a) ViT, seed {seed}: Retrain", flush=True)
        retrain = erase(RETRAIN, model, retrain_dir)
        shared = [*model, f"eval.reference={retrain_dir}"]
        cases = {
            "Retrain": retrain,
            "recipe (lr 0.02)": None,
            "lr: auto": None,
        }
        print("(a) ViT: the recipe as it is", flush=True)
        cases["recipe (lr 0.02)"] = erase(RECIPE, shared, args.work / f"vit_plain_seed{seed}")
        print("(a) ViT: method.lr=auto", flush=True)
        cases["lr: auto"] = erase(RECIPE, [*shared, "method.lr=auto"], args.work / f"vit_auto_seed{seed}")
        results["vit"][seed] = {name: row(name, m) for name, m in cases.items()}

        cnn_retrain = args.work / f"cnn_retrain_seed{seed}"
        print(f"(b) CNN, seed {seed}: Retrain", flush=True)
        cnn_ref = erase(RETRAIN, [f"seed={seed}"], cnn_retrain)
        cnn = [f"seed={seed}", f"eval.reference={cnn_retrain}"]
        print("(b) CNN: the hand-tuned recipe", flush=True)
        plain = erase(RECIPE, cnn, args.work / f"cnn_plain_seed{seed}")
        print("(b) CNN: method.lr=auto", flush=True)
        auto = erase(RECIPE, [*cnn, "method.lr=auto"], args.work / f"cnn_auto_seed{seed}")
        results["cnn"][seed] = {
            name: row(name, m)
            for name, m in {"Retrain": cnn_ref, "recipe (lr 0.02)": plain, "lr: auto": auto}.items()
        }

    n = len(args.seeds)
    summary = {
        model: {
            name: {key: _mean([results[model][s][name][key] for s in args.seeds]) for key in (*KEYS, "lr")}
            | {"utility_warning": [results[model][s][name]["utility_warning"] for s in args.seeds]}
            for name in next(iter(results[model].values()))
        }
        for model in results
    }
    lines = [f"n={n} seed(s): {args.seeds}; mean over seeds", ""]
    header = f"{'model':5s} {'setting':18s} {'lr':>8s} " + " ".join(f"{k:>8s}" for k in KEYS) + "  warning"
    lines += [header, "-" * len(header)]
    for model, settings in summary.items():
        for name, values in settings.items():
            lr = "–" if values["lr"] is None else f"{values['lr']:g}"
            cells = " ".join("       –" if values[k] is None else f"{values[k]:8.2f}" for k in KEYS)
            lines.append(f"{model:5s} {name:18s} {lr:>8s} {cells}  {values['utility_warning']}")
    table = "\n".join(lines)
    print(table)
    record = {
        "what": "random_label on digit 3: the recipe as it is vs method.lr=auto, with Retrain (benchmarks/tune.py)",
        "n_seeds": n,
        "seeds": args.seeds,
        "vit": vit_info,
        "per_seed": results,
        "mean": summary,
        "table": table,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, 1 thread",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from unlearn.checkpoints import write_json

    write_json(record, args.out)
    print(f"wrote {args.out}")
    return 0


def _mean(values: list):
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(f"{statistics.mean(numbers):.4g}") if numbers else None


if __name__ == "__main__":
    sys.exit(main())
