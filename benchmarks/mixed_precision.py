"""fit() under no / fp16 / bf16 mixed precision: step time and peak GPU memory, side by side in one run.

    python benchmarks/mixed_precision.py [--device cuda] [--steps 60] [--batch-size 256] [--out FILE]

Trains the CIFAR ResNet-18 (`resnet18_cifar`) on random 32x32 images with SGD, as the CIFAR recipes do,
interleaving the precisions (A/B/C, A/B/C, ...) so machine noise hits each alike. Prints a table and writes
the numbers to `benchmarks/results/mixed_precision.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from unlearn.models import build_classifier
from unlearn.train import Phase, fit, make_optimizer

PRECISIONS = ("no", "fp16", "bf16")


def one_run(precision: str, device: str, steps: int, batch_size: int) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    torch.manual_seed(0)
    images = torch.rand(steps * batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (steps * batch_size,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)
    model = build_classifier("resnet18_cifar", 10)
    optimizer = make_optimizer(model.parameters(), "sgd", 0.01, 0.9, 5e-4)

    def loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    # one warm-up epoch of 3 steps (cuDNN autotuning, allocator), then the timed epoch
    warm = DataLoader(
        TensorDataset(images[: 3 * batch_size], labels[: 3 * batch_size]), batch_size=batch_size
    )
    fit(model, [Phase(warm, loss)], optimizer, accelerator, 1, log_every=10**9)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    fit(model, [Phase(loader, loss)], optimizer, accelerator, 1, log_every=10**9)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return {"precision": precision, "step_ms": 1000 * seconds / steps, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/mixed_precision.json")
    args = parser.parse_args()
    precisions = PRECISIONS if args.device == "cuda" else ("no", "bf16")
    runs = {p: [] for p in precisions}
    for _ in range(args.repeats):
        for precision in precisions:
            runs[precision].append(one_run(precision, args.device, args.steps, args.batch_size))
    rows = []
    base = statistics.median(r["step_ms"] for r in runs["no"])
    for precision, results in runs.items():
        step = statistics.median(r["step_ms"] for r in results)
        rows.append(
            {
                "precision": precision,
                "median_step_ms": step,
                "speedup_vs_fp32": base / step,
                "peak_mib": max(r["peak_mib"] for r in results),
            }
        )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"resnet18_cifar, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats on {device_name}"
    )
    print(f"{'precision':10s} {'step ms':>9s} {'speedup':>8s} {'peak MiB':>9s}")
    for row in rows:
        print(
            f"{row['precision']:10s} {row['median_step_ms']:9.2f} {row['speedup_vs_fp32']:7.2f}x {row['peak_mib']:9.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device_name,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "repeats": args.repeats,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
