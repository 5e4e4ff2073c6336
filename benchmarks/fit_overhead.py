"""How much does `unlearn.train.fit` cost over a bare PyTorch loop doing the same steps?

Both loops train the same model from the same initial weights with the same optimizer (SGD, momentum 0.9,
weight decay 5e-4) on the same batches (a fixed random dataset read in order), with the same loss function.
The loss function stamps the time at each call, so the interval between two calls is one whole step (data,
forward, backward, optimizer step and whatever the loop does around them). Runs alternate A/B/A/B to spread
machine noise over both; the first `--warmup` steps of every run are dropped.

Reported per loop: the median step interval over all runs (robust to noise; meaningful on CPU, where every
operation is synchronous) and the mean step time of each run (wall time between two synchronised stamps, the
meaningful number on CUDA, where kernels run asynchronously). `ratio` is fit/bare of the median step on CPU and
of the median run mean on CUDA; the target is below 1.05.

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

    accelerator = Accelerator(cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model.to(accelerator.device)
    fit(model, [Phase(loader, loss_fn)], make_optimizer(model), accelerator, epochs=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    accelerator.free_memory()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs (default 2: fit, bare, fit, bare)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="resnet18_cifar", help="resnet18_cifar (default) or digits_cnn")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
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
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False, pin_memory=device.type == "cuda")
    initial = build_model(args.model, channels, args.image_size)

    loops = {"fit": fit_loop, "bare": bare_loop}
    results = {name: {"intervals": [], "run_means": []} for name in loops}
    for repeat in range(args.repeats):
        for name, loop in loops.items():
            loss_fn = StampedLoss(device, args.warmup, args.steps)
            started = time.perf_counter()
            loop(copy.deepcopy(initial), loader, device, loss_fn)
            assert len(loss_fn.stamps) == args.steps, f"{name} made {len(loss_fn.stamps)} steps"
            results[name]["intervals"] += loss_fn.intervals()
            results[name]["run_means"].append(loss_fn.mean_step())
            print(
                f"[{repeat + 1}/{args.repeats}] {name:4s}  median step {statistics.median(loss_fn.intervals()) * 1e3:9.2f} ms"
                f"  mean step {loss_fn.mean_step() * 1e3:9.2f} ms  (run {time.perf_counter() - started:.1f} s)",
                flush=True,
            )

    summary = {}
    for name, values in results.items():
        summary[name] = {
            "median_step_s": statistics.median(values["intervals"]),
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
        "ratio_median_step": ratio_median,
        "ratio_mean_step": ratio_mean,
        "ratio": ratio,
        "overhead_percent": 100.0 * (ratio - 1.0),
        "target_met": ratio < 1.05,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(
        f"fit  {summary['fit']['median_step_s'] * 1e3:.2f} ms/step   bare {summary['bare']['median_step_s'] * 1e3:.2f} ms/step"
        f"   ratio fit/bare {ratio:.4f} ({record['overhead_percent']:+.2f} %)"
        f"   [median-step ratio {ratio_median:.4f}, run-mean ratio {ratio_mean:.4f}]"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
