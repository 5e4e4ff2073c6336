"""Generation throughput of the evaluation: images per second by batch size, precision and processes, side by side.

    python benchmarks/generation_throughput.py [--model world:digits/t2i] [--images 128]
        [--batch-sizes 1 16 128] [--precisions fp32 bf16] [--processes 1 2] [--out FILE]

Draws `--images` images the way the diffusion harness scores a model (`Diffusion.generate`, DDIM with
classifier-free guidance, `eval.steps` 25, guidance 3, prompts cycling over the ten digit captions), once per
batch size and precision (fp32, or the text encoder, UNet and VAE under bf16 autocast: what `eval.precision: auto`
picks on a GPU with bf16), in this process, after an untimed warm-up; then, for each `--processes` N > 1, the
same under `accelerate launch --num_processes N` (`--multi_gpu`; gloo on a machine without a GPU) with the batches
spread over the processes (`unlearn.spread`), timed between two barriers. It prints images/s and the ratio to
batch size 1 / fp32 / one process, and for bf16 the largest pixel difference from fp32 (same seeds) and the share
of images the digits judge labels alike. Writes `benchmarks/results/generation_throughput.json` (n=1; the thread
count and device recorded). On a 2-core machine, processes share the cores: N processes measure the overhead of
spreading, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "generation_throughput.json"
STEPS, GUIDANCE = 25, 3.0  # the harness's defaults (eval.steps, eval.guidance)


def conditions(model, images: int) -> list:
    """The ten digit captions (text models) or classes, cycled."""
    if model.conditioning == "text":
        from unlearn.worlds.digits_text import NUMBER_WORDS

        return [f"a handwritten digit {NUMBER_WORDS[i % 10]}" for i in range(images)]
    return [i % 10 for i in range(images)] if model.conditioning == "class" else None


def timed(model, prompts: list, images: int, batch_size: int, dtype) -> tuple[float, object]:
    started = time.perf_counter()
    out = model.generate(
        prompts, n=images, steps=STEPS, guidance=GUIDANCE, seed=0, batch_size=batch_size, dtype=dtype
    )
    return time.perf_counter() - started, out


def worker(args) -> None:
    """One process of a launch: the spread generation, timed between barriers; the main process prints JSON."""
    import torch
    from accelerate import PartialState

    from unlearn.models import load_model
    from unlearn.spread import spread_over

    torch.set_num_threads(args.threads)
    state = PartialState(cpu=not torch.cuda.is_available())
    model = load_model(args.model, family="diffusion").to(state.device)
    prompts = conditions(model, args.images)
    rows = []
    timed(model, prompts[:2], 2, 2, None)  # warm-up: kernels, the scheduler
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        for batch_size in args.batch_sizes:
            state.wait_for_everyone()
            with spread_over(state):
                seconds, _ = timed(model, prompts, args.images, batch_size, dtype)
            state.wait_for_everyone()
            rows.append({"precision": precision, "batch_size": batch_size, "seconds": seconds})
    if state.is_main_process:
        print("ROWS " + json.dumps(rows), flush=True)
    state.destroy_process_group()


def launched(args, processes: int) -> list[dict]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29591",
        __file__, "--worker", "--model", args.model, "--images", str(args.images), "--threads", str(args.threads),
        "--batch-sizes", *map(str, args.batch_sizes), "--precisions", *args.precisions,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("ROWS "))[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="world:digits/t2i")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: a busy 2-core machine)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from unlearn.checkpoints import write_json
    from unlearn.metrics.generation import judge_labels
    from unlearn.models import load_model
    from unlearn.worlds import prepare
    from unlearn.worlds.digits import load_digits_classifier

    torch.set_num_threads(args.threads)
    if args.model.startswith("world:digits/"):  # built once in the real cache
        prepare("digits", verbose=False, families=(args.model.removeprefix("world:digits/"),))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, family="diffusion").to(device)
    prompts = conditions(model, args.images)
    judge = load_digits_classifier().to(device)
    rows, images = [], {}
    timed(model, prompts[:2], 2, 2, None)  # warm-up: kernels, the scheduler
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        for batch_size in args.batch_sizes:
            seconds, out = timed(model, prompts, args.images, batch_size, dtype)
            images[precision, batch_size] = out
            rows.append(
                {"processes": 1, "precision": precision, "batch_size": batch_size, "seconds": seconds}
            )
            print(
                f"1 process, {precision}, batch {batch_size}: {args.images / seconds:.1f} images/s",
                flush=True,
            )
    for processes in [n for n in args.processes if n > 1]:
        for row in launched(args, processes):
            rows.append({"processes": processes, **row})
            print(f"{processes} processes, {row['precision']}, batch {row['batch_size']}: "
                  f"{args.images / row['seconds']:.1f} images/s", flush=True)  # fmt: skip
    # speed-ups of a row against the same row with one setting changed: the smallest batch and fp32 (one process),
    # one process (N processes)
    one = {(r["precision"], r["batch_size"]): r["seconds"] for r in rows if r["processes"] == 1}
    smallest = min(args.batch_sizes)
    for row in rows:
        precision, batch_size, seconds = row["precision"], row["batch_size"], row["seconds"]
        row["images_per_s"] = round(args.images / seconds, 2)
        if row["processes"] == 1:
            row[f"x_vs_batch_{smallest}"] = round(one[precision, smallest] / seconds, 2)
            if ("fp32", batch_size) in one:
                row["x_vs_fp32"] = round(one["fp32", batch_size] / seconds, 2)
        else:
            row["x_vs_1_process"] = round(one[precision, batch_size] / seconds, 2)
        row["seconds"] = round(seconds, 3)
    agreement = {}
    for batch_size in args.batch_sizes:
        if ("bf16", batch_size) in images and ("fp32", batch_size) in images:
            full, half = images["fp32", batch_size], images["bf16", batch_size]
            same = (judge_labels(judge, full) == judge_labels(judge, half)).float().mean().item()
            agreement[batch_size] = {
                "max_pixel_difference": round((full - half).abs().max().item(), 4),
                "judged_alike_percent": round(100 * same, 1),
            }
    result = {
        "model": args.model,
        "images": args.images,
        "steps": STEPS,
        "guidance": GUIDANCE,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads_per_process": args.threads,
        "torch": torch.__version__,
        "n": 1,
        "rows": rows,
        "bf16_vs_fp32": agreement,
    }
    print(json.dumps({"rows": rows, "bf16_vs_fp32": agreement}, indent=1))
    write_json(result, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
