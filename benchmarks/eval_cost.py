"""What the evaluation costs in an `unlearn erase` run, with a cold and a warm cache, side by side in one process.

    python benchmarks/eval_cost.py [--recipe recipes/diffusion/digits_t2i/uce.yaml] [--samples 100] [--out FILE]

Runs the same small diffusion erasure twice (default: UCE erasing "three" from the digits world's text-to-image
model, with the recipe's 100 samples per set: 1,100 generations per scored model) into fresh run folders, after
an untimed warm-up run (imports, judge, world) that neither pays:

- cold: the toolkit cache holds the world's models but no original scores and no FID statistics of the real
  images: the run generates and judges the original model's samples and computes the real statistics (what
  every run and every bench row did before `unlearn.evalcache`), and stores both;
- warm: the same recipe with another run folder (as the next method of a bench): the original's scores and the
  real statistics are read from the cache.

For each it prints the run's wall time, the time spent in the evaluation (scoring the original and the
unlearned model, timed around `Harness.score_original` and `Harness.score`), the evaluation's share of the run,
the images generated (counted in `Diffusion.generate`) and the images the metrics stand on per second of
evaluation (the original's and the unlearned model's: in a warm run the original's come from the cache), and
the cold / warm ratio of the evaluation time: the ratio of the medians over `--repeats` cold/warm pairs, each pair
with a fresh cache, in wall time and in this process's CPU time (a shared machine's load inflates wall time, not
CPU time much; images generated per second, equal in both runs of a steady machine, shows the load). Writes `benchmarks/results/eval_cost.json` (n = the pairs, one seed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval_cost.json"


class Meter:
    """Seconds spent scoring, images generated, and images the metrics stand on."""

    eval_s: float = 0.0
    eval_cpu_s: float = 0.0  # CPU seconds of this process: what a busy machine's other load does not inflate
    generated: int = 0
    scored: int = 0


def one_run(recipe_path: Path, overrides: list[str], output: Path) -> dict:
    """One `unlearn erase` run with the harness's scoring timed and the model's generations counted."""
    from unlearn.harness import DiffusionHarness
    from unlearn.models.diffusion import Diffusion
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    lines: list[str] = []
    meter = Meter()
    saved = score, score_original, generate = (
        DiffusionHarness.score,
        DiffusionHarness.score_original,
        Diffusion.generate,
    )

    def timed_score(harness, model, data, original=False):
        if original:  # inside `score_original`, timed there
            return score(harness, model, data, original=True)
        started, cpu = time.perf_counter(), time.process_time()
        scores = score(harness, model, data)
        meter.eval_s += time.perf_counter() - started
        meter.eval_cpu_s += time.process_time() - cpu
        meter.scored += sum(len(images) for images in scores.images.values())
        return scores

    def timed_original(harness, model, data):  # scored, or read from the cache: the evaluation's time alike
        started, cpu = time.perf_counter(), time.process_time()
        scores = score_original(harness, model, data)
        meter.eval_s += time.perf_counter() - started
        meter.eval_cpu_s += time.process_time() - cpu
        meter.scored += original_images(harness, data)
        return scores

    def counted(model, *args, **kwargs):
        images = generate(model, *args, **kwargs)
        meter.generated += len(images)
        return images

    DiffusionHarness.score, DiffusionHarness.score_original, Diffusion.generate = (
        timed_score,
        timed_original,
        counted,
    )
    try:
        started = time.perf_counter()
        metrics = run(load_recipe(recipe_path, overrides), output, log=lines.append)
        wall = time.perf_counter() - started
    finally:
        DiffusionHarness.score, DiffusionHarness.score_original, Diffusion.generate = saved
    said = [line for line in lines if line.startswith("original scores:")]
    return {
        "run_s": round(wall, 2),
        "unlearn_s": round(metrics["RTE_s"], 3),
        "eval_s": round(meter.eval_s, 2),
        "eval_cpu_s": round(meter.eval_cpu_s, 2),
        "eval_share": round(meter.eval_s / wall, 4),
        "images_generated": meter.generated,
        "images_scored": meter.scored,
        "scored_images_per_s": round(meter.scored / meter.eval_s, 2),
        "original_scores": said[0] if said else None,
        "original_metrics": {k: v for k, v in metrics.items() if k.startswith("original_")},
    }


def original_images(harness, data) -> int:
    """Images a scoring of the original generates: `eval.samples` per forget and paraphrase set (per concept)
    and per retained label (what `DiffusionHarness.score` draws)."""
    from unlearn.harness.diffusion import _per_label

    prompts = data.prompts
    samples = harness.recipe.eval.samples
    parts = prompts.split()
    count = sum(samples for p in parts if p.forget) + sum(samples for p in parts if p.paraphrases)
    return count + len(_per_label(prompts.retain, prompts.retain_labels, samples)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "diffusion" / "digits_t2i" / "uce.yaml"))
    parser.add_argument("--samples", type=int, default=100, help="eval.samples (the shipped recipes' 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a busy 2-core machine)")
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm pairs, each with a fresh cache")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    import torch

    from unlearn.checkpoints import write_json
    from unlearn.worlds import cache_dir, prepare

    torch.set_num_threads(args.threads)
    prepare("digits", verbose=False, families=("t2i",))  # the world, built once in the real cache
    world = cache_dir() / "digits"
    overrides = ["eval.reference=null", f"eval.samples={args.samples}"]
    pairs = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)

        def fresh_cache(name: str) -> None:  # the world's models, but no scores and no FID statistics
            cache = scratch / name
            cache.mkdir()
            (cache / "digits").symlink_to(world.resolve())
            os.environ["UNLEARN_CACHE"] = str(cache)

        # untimed: imports, the judge and the world load once in this process, so that no timed run pays them
        fresh_cache("warm-up-cache")
        one_run(Path(args.recipe), ["eval.reference=null", "eval.samples=1"], scratch / "warm-up")
        for repeat in range(args.repeats):
            fresh_cache(f"cache{repeat}")
            pair = {}
            for name in ("cold", "warm"):
                pair[name] = one_run(Path(args.recipe), overrides, scratch / f"{name}{repeat}")
                print(f"{name} {repeat}: {pair[name]['original_scores']}", flush=True)
            assert pair["warm"]["original_metrics"] == pair["cold"]["original_metrics"], (
                "cached scores differ"
            )
            pair["eval_time_ratio"] = round(pair["cold"]["eval_s"] / pair["warm"]["eval_s"], 2)
            pair["eval_cpu_ratio"] = round(pair["cold"]["eval_cpu_s"] / pair["warm"]["eval_cpu_s"], 2)
            pairs.append(pair)
    print()
    print(
        "| cache | run (s) | unlearning (s) | evaluation (s) | evaluation CPU (s) | evaluation share | "
        "images generated | generated / s | images scored / s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        for name in ("cold", "warm"):
            row = pair[name]
            row["generated_images_per_s"] = round(row["images_generated"] / row["eval_s"], 2)
            print(
                f"| {name} | {row['run_s']:.1f} | {row['unlearn_s']:.2f} | {row['eval_s']:.1f} | "
                f"{row['eval_cpu_s']:.1f} | "
                f"{100 * row['eval_share']:.0f} % | {row['images_generated']} | "
                f"{row['generated_images_per_s']:.1f} | {row['scored_images_per_s']:.1f} |"
            )
    median = {name: statistics.median(p[name]["eval_s"] for p in pairs) for name in ("cold", "warm")}
    cpu = {name: statistics.median(p[name]["eval_cpu_s"] for p in pairs) for name in ("cold", "warm")}
    ratio, cpu_ratio = median["cold"] / median["warm"], cpu["cold"] / cpu["warm"]
    print(
        f"\nevaluation time cold / warm: {ratio:.2f}x (medians over {len(pairs)} pair(s): "
        f"{median['cold']:.1f} s / {median['warm']:.1f} s; per pair {[p['eval_time_ratio'] for p in pairs]}; "
        f"one seed, {args.threads} torch thread(s))"
    )
    print(
        f"evaluation CPU time cold / warm: {cpu_ratio:.2f}x ({cpu['cold']:.1f} s / {cpu['warm']:.1f} s, medians)"
    )
    result = {
        "recipe": str(Path(args.recipe).relative_to(ROOT))
        if Path(args.recipe).is_relative_to(ROOT)
        else args.recipe,
        "eval_samples": args.samples,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "n": len(pairs),
        "pairs": [
            {
                **{
                    name: {k: v for k, v in p[name].items() if k != "original_metrics"}
                    for name in ("cold", "warm")
                },
                "eval_time_ratio": p["eval_time_ratio"],
                "eval_cpu_ratio": p["eval_cpu_ratio"],
            }
            for p in pairs
        ],
        "median_eval_s": {name: round(value, 2) for name, value in median.items()},
        "eval_time_ratio_cold_over_warm": round(ratio, 2),
        "median_eval_cpu_s": {name: round(value, 2) for name, value in cpu.items()},
        "eval_cpu_ratio_cold_over_warm": round(cpu_ratio, 2),
    }
    write_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
