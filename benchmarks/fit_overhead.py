"""How much does `unlearn.train.fit` cost over a bare PyTorch loop doing the same steps?

Both loops train the same model from the same initial weights with the same optimizer (SGD, momentum 0.9,
weight decay 5e-4) on the same batches (a fixed random dataset read in order from an unpinned in-memory
DataLoader, as `unlearn.train.make_loader` builds them), with the same loss function. fit() runs on an
Accelerator configured as `unlearn.pipeline.make_accelerator` configures it (seedable sampler).
The loss function stamps the time at each call, so the interval between two calls is one whole step (data,
forward, backward, optimizer step and whatever the loop does around them). After one short untimed run of
each loop, runs alternate in A B / B A pairs (fit, bare, bare, fit, ...) to spread machine noise and drift over
both; the first `--warmup` steps of every run are dropped.

`ratio` (target: below 1.05) is, on CPU, fit/bare of the median step interval pooled over all runs (robust to
noise; every operation is synchronous there) and, on CUDA, where kernels run asynchronously, fit/bare of the
median over runs of the mean step time between two synchronised stamps. Each pair's own ratio is reported
too: their spread shows how noisy the machine was.

Usage:
    python benchmarks/fit_overhead.py [--steps N] [--out FILE] [--device cpu|cuda] [--model resnet18_cifar]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fit_overhead.json"


class StampedLoss:
    """Cross-entropy that records `perf_counter()` at each call (synchronising CUDA at the run's two ends)."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.stamps: list[float] = []
        self.edges: list[float] = []

    def __call__(self, model, batch):
        call = len(self.stamps)
        if call in (self.warmup, self.steps - 1) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.stamps.append(now)
        if call in (self.warmup, self.steps - 1):
            self.edges.append(now)
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def intervals(self) -> list[float]:
        kept = self.stamps[self.warmup :]
        return [b - a for a, b in zip(kept, kept[1:])]

    def mean_step(self) -> float:
        return (self.edges[1] - self.edges[0]) / (self.steps - 1 - self.warmup)


def build_model(name: str, channels: int, image_size: int) -> torch.nn.Module:
    from unlearn.models.zoo import DigitsCNN, ResNet18Cifar

    if name == "resnet18_cifar":
        return ResNet18Cifar(10, channels)
    if name == "digits_cnn":
        return DigitsCNN(10, channels, image_size=image_size)
    raise SystemExit(f"unknown --model {name!r}; known: resnet18_cifar, digits_cnn")


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def bare_loop(model, loader, device, loss_fn) -> None:
    """The plain PyTorch loop fit() is compared with."""
    model.to(device)
    optimizer = make_optimizer(model)
    model.train()
    for images, labels in loader:
        # Like fit(): a copy that does not wait for the GPU (safe from pageable memory).
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = loss_fn(model, (images, labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_loop(model, loader, device, loss_fn) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from unlearn.train import Phase, fit

    accelerator = Accelerator(
        cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    model.to(accelerator.device)
    fit(model, [Phase(loader, loss_fn)], make_optimizer(model), accelerator, epochs=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    accelerator.free_memory()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="A/B pairs (default 3: fit, bare, fit, ...)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="resnet18_cifar", help="resnet18_cifar (default) or digits_cnn")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 3")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    channels = 3
    data = TensorDataset(
        torch.rand(args.steps * args.batch_size, channels, args.image_size, args.image_size),
        torch.randint(0, 10, (args.steps * args.batch_size,)),
    )
    # Unpinned, as make_loader builds it (with num_workers=0, pinning each batch in the main process cost more
    # than it saved on an H100 machine).
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    initial = build_model(args.model, channels, args.image_size)

    loops = {"fit": fit_loop, "bare": bare_loop}
    # One short untimed run of each first: one-time costs (allocator growth, kernel caches, imports).
    warm_loader = DataLoader(
        torch.utils.data.Subset(data, range((args.warmup + 3) * args.batch_size)), args.batch_size
    )
    for loop in loops.values():
        loop(copy.deepcopy(initial), warm_loader, device, StampedLoss(device, 0, args.warmup + 3))

    def step_time(loss_fn: StampedLoss) -> float:
        # CPU: the median step interval; CUDA: wall time between two synchronised stamps per step.
        return loss_fn.mean_step() if device.type == "cuda" else statistics.median(loss_fn.intervals())

    results = {name: {"intervals": [], "run_means": [], "run_step": []} for name in loops}
    pair_ratios = []
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(loops)[::-1]  # A B, B A, A B, ...: cancels drift
        for name in order:
            loss_fn = StampedLoss(device, args.warmup, args.steps)
            started = time.perf_counter()
            loops[name](copy.deepcopy(initial), loader, device, loss_fn)
            assert len(loss_fn.stamps) == args.steps, f"{name} made {len(loss_fn.stamps)} steps"
            results[name]["intervals"] += loss_fn.intervals()
            results[name]["run_means"].append(loss_fn.mean_step())
            results[name]["run_step"].append(step_time(loss_fn))
            print(
                f"[{repeat + 1}/{args.repeats}] {name:4s}  median step {statistics.median(loss_fn.intervals()) * 1e3:9.2f} ms"
                f"  mean step {loss_fn.mean_step() * 1e3:9.2f} ms  (run {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        pair_ratios.append(results["fit"]["run_step"][-1] / results["bare"]["run_step"][-1])

    summary = {}
    for name, values in results.items():
        summary[name] = {
            "median_step_s": statistics.median(values["intervals"]),
            "run_step_s": values["run_step"],
            "run_mean_step_s": values["run_means"],
            "median_run_mean_step_s": statistics.median(values["run_means"]),
        }
    ratio_median = summary["fit"]["median_step_s"] / summary["bare"]["median_step_s"]
    ratio_mean = summary["fit"]["median_run_mean_step_s"] / summary["bare"]["median_run_mean_step_s"]
    ratio = ratio_mean if device.type == "cuda" else ratio_median
    import accelerate

    record = {
        "benchmark": "fit_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "fit": summary["fit"],
        "bare": summary["bare"],
        "pair_ratios": pair_ratios,
        "ratio": ratio,
        "ratio_pooled_median_step": ratio_median,
        "ratio_median_run_mean": ratio_mean,
        "overhead_percent": 100.0 * (ratio - 1.0),
        "target_met": ratio < 1.05,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(
        f"fit  {summary['fit']['median_step_s'] * 1e3:.2f} ms/step   bare {summary['bare']['median_step_s'] * 1e3:.2f} ms/step"
        f"   ratio fit/bare {ratio:.4f} ({record['overhead_percent']:+.2f} %)"
        f"   [pooled median-step ratio {ratio_median:.4f}, run-mean ratio {ratio_mean:.4f};"
        f" pairs {' '.join(f'{r:.3f}' for r in pair_ratios)}]"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
