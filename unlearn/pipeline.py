"""The erase pipeline: recipe in, run folder out. Used by `unlearn erase`, `unlearn eval` and `unlearn bench`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoints import write_json, write_text
from .errors import CheckpointNotFoundError, ConfigError
from .harness import HARNESSES
from .recipe import Recipe, load_recipe
from .runfolder import RunFolder, reference_folder
from .train import end_trackers, reset_accelerate_state

if TYPE_CHECKING:
    from .data import UnlearnData


def default_output(recipe: Recipe) -> Path:
    data = recipe.data
    if data.concept is not None:
        what = "-".join(data.concept) if isinstance(data.concept, list) else str(data.concept)
    elif data.forget_class:
        what = f"class{'-'.join(map(str, data.forget_class))}"
    elif isinstance(data.forget_fraction, dict):  # per-class shares
        what = "random-" + "-".join(f"{c}x{round(100 * v)}" for c, v in sorted(data.forget_fraction.items()))
    else:
        what = f"random{round(100 * data.forget_fraction)}"
    return Path("runs") / f"{recipe.data.dataset}-{what}-{recipe.method}-seed{recipe.seed}"


def make_accelerator(recipe: Recipe, output: Path, log=None):
    """The run's `Accelerator`. It carries the recipe's `train` section (`accelerator.train_spec`: the loops'
    checkpoint intervals) and `log` (`accelerator.log_message`: where the loops' messages, such as "resuming
    stage ... after step N", go); with `train.log_with` its tracker logs to `output/logs/<method>` (call
    `unlearn.train.end_trackers(accelerator)` when the run ends)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    cpu = use_cpu(recipe)
    reset_accelerate_state(recipe.train.mixed_precision, cpu)
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        log_with=recipe.train.log_with,
        # split_batches: a recipe's batch_size is the global batch, split across processes, so a multi-process
        # run makes the same optimizer steps at the same batch size and schedule as a single-process one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True),
    )
    accelerator.train_spec = recipe.train
    accelerator.log_message = log
    if recipe.train.log_with:
        from .train import flat_config

        accelerator.init_trackers(recipe.method, config=flat_config(recipe.to_dict()))
    return accelerator


def use_cpu(recipe: Recipe) -> bool:
    """`train.cpu`, or a multi-process launch (`accelerate launch --multi_gpu`, `torchrun`) on a machine without
    a GPU: accelerate builds its gloo process group only when told cpu=True; without it every launched process
    would run the whole job on its own and write the same run folder."""
    if recipe.train.cpu:
        return True
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return launched and not torch.accelerator.is_available()
    return launched and not torch.cuda.is_available()


def shutdown() -> None:
    """Destroy the process group of a multi-process launch, once the command's last run is done (not after
    each run: the Retrain reference and `unlearn bench` run several in one process)."""
    from accelerate import PartialState

    if PartialState._shared_state:
        PartialState().destroy_process_group()


def run(recipe: Recipe, output: str | Path | None = None, log=print) -> dict:
    """Erase as the recipe says and score the result; returns the metrics (also in `output/metrics.json`).

    The run folder holds its resolved recipe and input checkpoint fingerprint (`unlearn.runfolder`): a finished
    folder of the same recipe is reused, an interrupted one resumes from its last training checkpoint, and a
    folder of another recipe or checkpoint, or one another run is writing to, is refused.
    """
    from accelerate import PartialState

    output = Path(output or recipe.output or default_output(recipe))
    _refuse_overwriting_input(recipe, output)
    state = PartialState(cpu=use_cpu(recipe))
    main = state.is_main_process
    folder = RunFolder(output, recipe, main=main)
    with state.main_process_first():  # the main process checks and writes the folder first
        folder.open()
    try:
        if folder.complete:
            log(f"{output} is already complete; reusing its metrics.json")
            return folder.metrics()
        log = _file_logger(output, log, main)
        if folder.resuming:
            log(f"continuing the interrupted run in {output}")
        return _run(recipe, output, folder, log, main)
    finally:
        folder.close()


def _run(recipe: Recipe, output: Path, folder: RunFolder, log, main: bool) -> dict:
    from accelerate.utils import set_seed

    if recipe.eval.attacks and not recipe.eval.reference and recipe.method != "retrain":
        raise ConfigError(
            "eval.attacks need the Retrain reference as their control: set eval.reference to a Retrain recipe "
            "or run folder"
        )
    reference, reference_dir = _reference(recipe, output, log) if recipe.eval.reference else (None, None)
    accelerator = make_accelerator(recipe, output, log)
    set_seed(recipe.seed)
    method = recipe.build_method()
    harness = HARNESSES[recipe.model.family](recipe, accelerator.device, log)
    if accelerator.num_processes > 1 and not harness.multi_process:
        raise ConfigError(
            f"{recipe.model.family} runs take a single process for now; launch them without --multi_gpu"
        )
    batch_size = getattr(method, "batch_size", None)
    if isinstance(batch_size, int) and batch_size % accelerator.num_processes:
        raise ConfigError(
            f"method.batch_size {batch_size} must be a multiple of the {accelerator.num_processes} processes: "
            "the recipe's batch is the global batch, split evenly across processes"
        )
    with accelerator.main_process_first():  # a world checkpoint is built and cached once
        model, data = harness.setup()
    log(f"{recipe.method} on {recipe.model.checkpoint}: {data.describe()}")

    metrics: dict = {}
    if recipe.model.prune is not None:
        metrics["pruned_sparsity"] = _prune_first(model, recipe, data, accelerator, output, log)
    original = None
    if main:
        harness.before(model, data, reference_dir)
        if recipe.eval.original:
            original = harness.score(model, data, original=True)
            metrics.update({f"original_{k}": v for k, v in original.metrics.items()})

    earlier = folder.begin_segment()
    model, seconds = _timed_unlearn(method, model, data, accelerator, recipe.seed)
    model = accelerator.unwrap_model(model)

    if main:
        scores = harness.score(model, data)
        metrics = {**scores.metrics, "RTE_s": earlier + seconds, **metrics}
        metrics.update(harness.compare(metrics, reference))
        metrics["device"] = str(accelerator.device)
        metrics["num_processes"] = accelerator.num_processes
        harness.save_model(model, output)
        artifacts = harness.save_artifacts(output, scores, original)
        write_json(metrics, output / "metrics.json")
        write_text(harness.report(data, metrics, artifacts), output / "report.md")
        if recipe.eval.attacks:  # on the saved model, as `unlearn attack` would
            from .attacks.run import attack_run, record_attacks

            metrics = record_attacks(output, *attack_run(output, log=log))
        shutil.rmtree(output / "checkpoints", ignore_errors=True)  # resume state is not needed once finished
        folder.finish(seconds)
        log(harness.headline(metrics))
        log(f"wrote {output}")
    end_trackers(accelerator)
    accelerator.wait_for_everyone()
    return metrics


def evaluate_run(target: str | Path, log=print) -> dict:
    """`unlearn eval`: score a finished run folder's model, or the model a recipe names (before unlearning).

    A run folder is scored as its run scored it (the same task, seeds and references: the original model and
    the Retrain reference it names), so the result equals the run's own `metrics.json` on the keys it scores.
    """
    from accelerate.utils import set_seed

    path = Path(target)
    if not path.exists():
        raise CheckpointNotFoundError(f"{str(path)!r} does not exist")
    recipe_path = path / "recipe.yaml" if path.is_dir() else path
    if path.is_dir() and not (path / "model").exists():
        raise CheckpointNotFoundError(f"{str(path)!r} is not a finished run folder (no model/ in it)")
    recipe = load_recipe(recipe_path)
    cuda = torch.cuda.is_available() and not recipe.train.cpu
    harness = HARNESSES[recipe.model.family](recipe, "cuda" if cuda else "cpu", log)
    set_seed(recipe.seed)
    original, data = harness.setup()
    if not path.is_dir():
        harness.before(original, data, None)
        return harness.score(original, data, original=True).metrics
    if (path / "pruned").exists():  # the run unlearned (and scored as original) the pruned model
        original = harness.load_output(path / "pruned", data)
    reference_dir, reference = reference_folder(recipe, path)
    harness.before(original, data, reference_dir)
    metrics: dict = {}
    if recipe.eval.original:
        metrics = {
            f"original_{k}": v for k, v in harness.score(original, data, original=True).metrics.items()
        }
    scores = harness.score(harness.load_output(path / "model", data), data)
    recorded = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
    metrics = {**scores.metrics, **({"RTE_s": recorded["RTE_s"]} if "RTE_s" in recorded else {}), **metrics}
    metrics.update(harness.compare(metrics, reference))
    if recipe.eval.attacks:
        from .attacks.run import attack_run

        metrics.update(attack_run(path, log=log)[0])
    return metrics


def _reference(recipe: Recipe, output: Path, log) -> tuple[dict, Path]:
    """The Retrain reference's metrics and run folder: a finished run folder, or a recipe run once into
    `output/reference`."""
    ref = Path(recipe.eval.reference)
    if not ref.is_absolute() and recipe.source and not ref.exists():
        ref = Path(recipe.source).parent / ref
    if ref.is_dir():
        if not (ref / "metrics.json").exists():
            raise CheckpointNotFoundError(f"reference run {str(ref)!r} has no metrics.json")
        return json.loads((ref / "metrics.json").read_text()), ref
    if not ref.exists():
        raise CheckpointNotFoundError(
            f"reference {recipe.eval.reference!r} is neither a run folder nor a recipe"
        )
    reference = load_recipe(ref)
    if reference.eval.reference:
        raise ConfigError(f"reference recipe {str(ref)!r} must not itself name a reference")
    # Same task, same seed, same precision as the run it judges.
    reference.data, reference.seed, reference.train = recipe.data, recipe.seed, recipe.train
    reference.model = dataclasses.replace(recipe.model, prune=None)  # Retrain is the dense gold standard
    reference.eval.original = False
    log(f"reference: {reference.method} ({ref})")
    return run(reference, output / "reference", log=log), output / "reference"


def _prune_first(model, recipe: Recipe, data: UnlearnData, accelerator, output: Path, log) -> float:
    """Prune first, then unlearn: make the loaded model sparse (retraining, if any, on forget + retain, the
    original training set); the method then starts from it, and `original_*` metrics score it. Writes the mask
    and the pruned model (`pruned/`, reusable with `model.prune={method: zeros}`); returns the share of zeros."""
    from .prune import prune_model, sparsity

    spec = recipe.model.prune_spec()
    train_set = torch.utils.data.ConcatDataset([data.forget, data.retain])
    mask = prune_model(model, spec, train_set, accelerator)
    share = sparsity(model.trainable, mask)
    if accelerator.is_main_process:
        mask.save(output / "pruning_mask.safetensors")
        model.save(output / "pruned")
        log(f"pruned ({spec.method}, scope {spec.scope}): {100 * share:.1f} % of the weights are zero")
    return share


def _refuse_overwriting_input(recipe: Recipe, output: Path) -> None:
    checkpoint = recipe.model.checkpoint
    if checkpoint and not checkpoint.startswith("world:"):
        source, target = Path(checkpoint).resolve(), output.resolve()
        if source == target or target in source.parents:
            raise ConfigError(
                f"the output folder {str(output)!r} holds the input checkpoint; choose another -o"
            )


def _file_logger(output: Path, log, main: bool):
    """`log` that also appends to `output/run.log` (main process only)."""
    if not main:
        return lambda message: None
    output.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        log(message)
        with open(output / "run.log", "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return say


def _timed_unlearn(method, model, data: UnlearnData, accelerator, seed: int):
    """Run the method from a seeded state; return the model and its run time (RTE), device work included."""
    from accelerate.utils import set_seed

    set_seed(seed)
    _sync(accelerator.device)
    started = time.perf_counter()
    model = method.unlearn(model, data, accelerator)
    _sync(accelerator.device)
    return model, time.perf_counter() - started


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
