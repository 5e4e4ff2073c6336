"""The erase pipeline: recipe in, run folder out. Used by `unlearn erase`, `unlearn eval` and `unlearn bench`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .checkpoints import write_json, write_text
from .data import (
    UnlearnData,
    forget_classes,
    forget_digits_concept,
    forget_fraction,
    forget_generated_concept,
)
from .datasets import load_dataset
from .errors import CheckpointNotFoundError, ConfigError
from .evaluate import evaluate
from .metrics import gap
from .models import load_model
from .models.classifier import load_classifier
from .recipe import Recipe, load_recipe
from .report import write_report


def build_data(recipe: Recipe) -> UnlearnData:
    spec = recipe.data
    train = load_dataset(spec.dataset, "train", spec.root, spec.download, spec.image_size)
    test = load_dataset(spec.dataset, "test", spec.root, spec.download, spec.image_size)
    if spec.forget_class is not None:
        return forget_classes(train, test, spec.forget_class)
    return forget_fraction(train, test, spec.forget_fraction, seed=recipe.seed)


def recipe_model(recipe: Recipe, num_classes: int):
    """The model a recipe names (a `world:` checkpoint is built and cached on first use)."""
    return load_model(recipe.model.checkpoint, recipe.model.arch, num_classes, recipe.model.family)


def default_output(recipe: Recipe) -> Path:
    what = (
        f"class{'-'.join(map(str, recipe.data.forget_class))}"
        if recipe.data.forget_class
        else (f"random{round(100 * recipe.data.forget_fraction)}")
    )
    return Path("runs") / f"{recipe.data.dataset}-{what}-{recipe.method}-seed{recipe.seed}"


def make_accelerator(recipe: Recipe, output: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cpu = use_cpu(recipe)
    _reset_accelerate_state_if_changed(recipe.train.mixed_precision, cpu)
    return Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        cpu=cpu,
        project_dir=str(output),
        # split_batches: a recipe's batch_size is the global batch, split across processes, so a multi-process
        # run makes the same optimizer steps at the same batch size and schedule as a single-process one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True),
    )


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


def _reset_accelerate_state_if_changed(mixed_precision: str, cpu: bool) -> None:
    """accelerate keeps one process-wide state and refuses (ValueError) an Accelerator whose mixed precision or
    cpu flag differs from the first one's. A process that runs several recipes (`unlearn bench`, a test session)
    drops that state when the next run asks for other settings. Under a multi-process launch only the
    AcceleratorState is dropped; the PartialState (process group, device) stays."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    state = AcceleratorState._shared_state
    if not state or "_mixed_precision" not in state:
        return
    if state["_mixed_precision"] == mixed_precision and (not cpu or state["device"].type == "cpu"):
        return
    single = PartialState._shared_state.get("num_processes", 1) == 1
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()


def run(recipe: Recipe, output: str | Path | None = None, log=print) -> dict:
    """Erase as the recipe says and score the result; returns the metrics (also in `output/metrics.json`).

    A finished run folder is not run again; an interrupted one resumes from its last training checkpoint.
    """
    from accelerate.utils import set_seed

    output = Path(output or recipe.output or default_output(recipe))
    metrics_path = output / "metrics.json"
    if metrics_path.exists():
        log(f"{output} is already complete; reusing its metrics.json")
        return json.loads(metrics_path.read_text())
    _refuse_overwriting_input(recipe, output)
    log = _file_logger(output, log, use_cpu(recipe))
    reference, reference_dir = _reference(recipe, output, log) if recipe.eval.reference else (None, None)
    accelerator = make_accelerator(recipe, output)
    main = accelerator.is_main_process
    set_seed(recipe.seed)
    method = recipe.build_method()
    batch_size = getattr(method, "batch_size", None)
    if isinstance(batch_size, int) and batch_size % accelerator.num_processes:
        raise ConfigError(
            f"method.batch_size {batch_size} must be a multiple of the {accelerator.num_processes} processes: "
            "the recipe's batch is the global batch, split evenly across processes"
        )
    if recipe.model.family == "diffusion":
        return _run_diffusion(recipe, method, accelerator, output, reference, log)
    if recipe.model.family == "gan":
        return _run_gan(recipe, method, accelerator, output, log)
    data = build_data(recipe)
    with accelerator.main_process_first():
        model = recipe_model(recipe, data.num_classes)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        write_text(recipe.to_yaml(), output / "recipe.yaml")
        log(f"{recipe.method} on {recipe.data.dataset}: {data.describe()}")

    metrics: dict = {}
    model.to(accelerator.device)
    if recipe.model.prune is not None:
        metrics["pruned_sparsity"] = _prune_first(model, recipe, data, accelerator, output, log)
    representation = "representation" in recipe.eval.metrics and main
    original_model = model.frozen_copy() if representation else None  # the teacher for CKA to the original
    if recipe.eval.original and main:
        original = evaluate(model.to(accelerator.device), data, recipe.eval.metrics, recipe.eval.batch_size)
        metrics.update({f"original_{k}": v for k, v in original.items()})

    model.to(accelerator.device)
    model, seconds = _timed_unlearn(method, model, data, accelerator, recipe.seed)
    model = accelerator.unwrap_model(model)

    if main:
        results = evaluate(model, data, recipe.eval.metrics, recipe.eval.batch_size)
        results["RTE_s"] = seconds
        if representation:
            from .metrics.representation import representation_metrics

            references = {"original": original_model}
            if reference_dir is not None and (reference_dir / "model").exists():
                retrained = load_classifier(reference_dir / "model", recipe.model.arch, data.num_classes)
                references["retrain"] = retrained.to(accelerator.device)
            results.update(representation_metrics(model, data, references, recipe.eval.batch_size))
        metrics = {**results, **metrics}
        if reference is not None:
            metrics.update(gap(results, reference))
            metrics.update({f"retrain_{k}": reference[k] for k in ("UA", "RA", "TA", "MIA", "RTE_s")})
        metrics["device"] = str(accelerator.device)
        metrics["num_processes"] = accelerator.num_processes
        model.save(output / "model")
        write_json(metrics, metrics_path)
        write_report(output, recipe, data, metrics)
        shutil.rmtree(output / "checkpoints", ignore_errors=True)  # resume state is not needed once finished
        log(
            f"UA {metrics['UA']:.2f}  RA {metrics['RA']:.2f}  TA {metrics['TA']:.2f}  MIA {metrics.get('MIA', float('nan')):.2f}"
            f"  RTE {seconds:.1f}s" + (f"  avg_gap {metrics['avg_gap']:.2f}" if "avg_gap" in metrics else "")
        )
        log(f"wrote {output}")
    accelerator.wait_for_everyone()
    return metrics


def build_concept_data(recipe: Recipe, model) -> UnlearnData:
    """The erasure task of a diffusion recipe: a digits class or concept, or a concept with generated data."""
    spec = recipe.data
    if spec.dataset == "digits":
        train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
        return forget_digits_concept(
            train, test, model.conditioning, spec.concept, spec.forget_class, spec.anchor, seed=recipe.seed
        )
    if model.conditioning != "text":
        raise ConfigError(
            "dataset: generated erases a concept from a text-to-image model; this one takes no text"
        )
    return forget_generated_concept(
        model,
        spec.concept,
        spec.forget_prompts,
        spec.paraphrases,
        spec.retain_prompts,
        spec.anchor,
        spec.num_images,
        concept_label=recipe.eval.concept_label,
        guidance=recipe.eval.guidance,
        steps=recipe.eval.steps,
        seed=recipe.seed,
    )


JUDGED = ("erasure_rate", "erasure_rate_paraphrase", "retain_accuracy")


def _run_diffusion(recipe: Recipe, method, accelerator, output: Path, reference: dict | None, log) -> dict:
    """Erase a class or concept from a diffusion model, judge generations before and after, write the run."""

    from .evaluate import evaluate_generation
    from .metrics.generation import save_grid
    from .report import write_generation_report

    if accelerator.num_processes > 1:
        raise ConfigError("diffusion erasure runs in a single process for now; launch it without --multi_gpu")
    model = recipe_model(recipe, 0)
    model.to(accelerator.device)
    if recipe.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if recipe.train.mixed_precision != "no":  # trainable UNet weights stay fp32; frozen parts run in half
        model.cast_frozen(torch.bfloat16 if recipe.train.mixed_precision == "bf16" else torch.float16)
    data = build_concept_data(recipe, model)
    output.mkdir(parents=True, exist_ok=True)
    write_text(recipe.to_yaml(), output / "recipe.yaml")
    log(f"{recipe.method} on {recipe.model.checkpoint}: {data.describe()}")

    ev = recipe.eval
    judge = _judge(recipe, accelerator.device)
    names = list(ev.metrics)
    if judge is None and set(JUDGED) & set(names):
        names = [n for n in names if n not in JUDGED]
        log("no judge (eval.judge): erasure rates and retained accuracy are not computed")
    if judge is None and ev.fid_features == "judge" and "fid" in names:
        names.remove("fid")
        log("no judge to take FID features from: FID needs eval.judge or eval.fid_features: inception")
    if data.prompts.concept_label is None and ev.concept_label is not None:
        data.prompts.concept_label = ev.concept_label
    fid_cache = None
    if recipe.data.dataset == "digits" and ev.fid_features == "judge":
        from .worlds import cache_dir

        fid_cache = (
            cache_dir() / "fid" / f"digits-retain-{data.prompts.concept}-{model.conditioning}-judge.npz"
        )

    def score(current) -> tuple[dict, dict]:
        return evaluate_generation(
            current,
            data,
            names,
            judge,
            ev.samples,
            ev.steps,
            ev.guidance,
            recipe.seed,
            ev.batch_size,
            ev.fid_features,
            fid_cache,
            ev.clip_model,
        )

    metrics: dict = {}
    before = {name: tensor.detach().cpu().clone() for name, tensor in model.unet.state_dict().items()}
    original_images: dict = {}
    if ev.original:
        original, original_images = score(model)
        metrics.update({f"original_{k}": v for k, v in original.items()})

    model, seconds = _timed_unlearn(method, model, data, accelerator, recipe.seed)

    results, images = score(model)
    metrics = {**results, "RTE_s": seconds, **metrics}
    if reference is not None:
        metrics.update({f"retrain_{k}": reference[k] for k in (*results, "RTE_s") if k in reference})
    metrics["device"] = str(accelerator.device)
    metrics["num_processes"] = accelerator.num_processes
    model.save(output / "model")
    _save_edit(model, before, output / "edit.safetensors")
    grids = {}
    for name, after in images.items():
        count = min(len(after), 40)
        grids[name] = {"unlearned": save_grid(after[:count], output / f"samples_{name}.png", nrow=10).name}
        if name in original_images:
            path = save_grid(original_images[name][:count], output / f"samples_{name}_original.png", nrow=10)
            grids[name]["original"] = path.name
    write_json(metrics, output / "metrics.json")
    write_generation_report(output, recipe, data, metrics, grids)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    shown = "  ".join(
        f"{k} {metrics[k]:.2f}"
        for k in ("erasure_rate", "erasure_rate_paraphrase", "retain_accuracy", "neighbor_accuracy", "fid")
        if k in metrics
    )
    log(f"{shown}  RTE {seconds:.1f}s")
    log(f"wrote {output}")
    return metrics


def build_gan_data(recipe: Recipe) -> UnlearnData:
    """The erasure task of a GAN recipe: one class of the feedback classifier. The dataset gives the real
    images of the retained classes for FID (none for `dataset: generated`); the method never sees them."""
    from .data import ConceptPrompts
    from .datasets import ImageTensorDataset

    spec = recipe.data
    label = int(spec.forget_class[0])
    if spec.dataset == "generated":
        empty = ImageTensorDataset(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long), 0, "generated")
        data = UnlearnData(empty, empty, empty, empty, num_classes=0, forget_classes=(label,))
        kept: list[int] = []
    else:
        data = build_data(recipe)
        kept = [c for c in range(data.num_classes) if c != label]
    data.prompts = ConceptPrompts(
        concept=str(label),
        forget=[label],
        anchor=[label],
        retain=kept,
        retain_labels=kept,
        concept_label=label,
    )
    return data


def _run_gan(recipe: Recipe, method, accelerator, output: Path, log) -> dict:
    """Erase a class from an unconditional GAN, judge its samples before and after, write the run folder."""

    from .evaluate import evaluate_gan
    from .metrics.generation import judge_labels, save_grid
    from .report import write_gan_report

    if accelerator.num_processes > 1:
        raise ConfigError("GAN unlearning runs in a single process; launch it without --multi_gpu")
    data = build_gan_data(recipe)
    model = recipe_model(recipe, 0).to(accelerator.device)
    output.mkdir(parents=True, exist_ok=True)
    write_text(recipe.to_yaml(), output / "recipe.yaml")
    label = data.prompts.concept_label
    log(f"{recipe.method} on {recipe.model.checkpoint}: erase class {label}")

    ev = recipe.eval
    judge = _judge(recipe, accelerator.device)
    names = list(ev.metrics)
    if judge is None:
        raise ConfigError(
            "scoring a GAN needs a judge: set eval.judge (a classifier folder or module:function)"
        )
    real = None
    fid_cache = None
    if len(data.retain):
        real = torch.stack([data.retain[i][0] for i in range(len(data.retain))])
        if recipe.data.dataset == "digits":
            from .worlds import cache_dir

            fid_cache = cache_dir() / "fid" / f"digits-retain-{label}-gan-judge.npz"
    # The original generator's retained-class samples, from other latents than the scored ones: the
    # reference of `fid_original` (its value for the original model is the sampling noise floor).
    reference_draw = model.sample(ev.samples, seed=recipe.seed + 1)
    original_retained = reference_draw[judge_labels(judge, reference_draw) != label]

    def score(current):
        return evaluate_gan(
            current,
            label,
            names,
            judge,
            ev.samples,
            recipe.seed,
            real,
            original_retained,
            fid_cache,
            ev.batch_size,
        )

    metrics: dict = {}
    original_images = None
    if ev.original:
        original, original_images = score(model)
        original["erasure_reduction"] = 0.0
        metrics.update({f"original_{k}": v for k, v in original.items()})

    model, seconds = _timed_unlearn(method, model, data, accelerator, recipe.seed)

    results, images = score(model)
    if "erasure_rate" in results and metrics.get("original_erasure_rate"):
        results["erasure_reduction"] = 100.0 * (
            1.0 - results["erasure_rate"] / metrics["original_erasure_rate"]
        )
    metrics = {**results, "RTE_s": seconds, **metrics}
    metrics["device"] = str(accelerator.device)
    metrics["num_processes"] = accelerator.num_processes
    model.save(output / "model")
    count = min(len(images), 100)
    grids = {"unlearned": save_grid(images[:count], output / "samples.png", nrow=10).name}
    if original_images is not None:
        grids["original"] = save_grid(original_images[:count], output / "samples_original.png", nrow=10).name
    write_json(metrics, output / "metrics.json")
    write_gan_report(output, recipe, data, metrics, grids)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    shown = "  ".join(
        f"{k} {metrics[k]:.2f}"
        for k in (
            "erasure_rate",
            "original_erasure_rate",
            "erasure_reduction",
            "fid",
            "original_fid",
            "fid_original",
        )
        if k in metrics
    )
    log(f"{shown}  RTE {seconds:.1f}s")
    log(f"wrote {output}")
    return metrics


def _judge(recipe: Recipe, device):
    """The classifier that tells which concept a generation shows: eval.judge, else the digits world's."""
    from .metrics.generation import load_judge

    if recipe.eval.judge:
        judge = load_judge(recipe.eval.judge)
    elif recipe.data.dataset == "digits":
        from .worlds.digits import load_digits_classifier

        judge = load_digits_classifier()
    else:
        return None
    return judge.to(device) if isinstance(judge, torch.nn.Module) else judge


def _save_edit(model, before: dict, path: Path) -> None:
    """The edit alone: the UNet tensors the method changed, under their diffusers names (load them over the
    original UNet with `load_state_dict(..., strict=False)`)."""
    from .checkpoints import save_state_dict

    after = model.unet.state_dict()
    changed = {n: t.detach().cpu() for n, t in after.items() if not torch.equal(t.detach().cpu(), before[n])}
    save_state_dict(changed, path)


def evaluate_run(path: str | Path, log=print) -> dict:
    """`unlearn eval`: re-score a finished run folder (its model and resolved recipe)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{str(path)!r} does not exist")
    if path.is_dir():
        recipe = load_recipe(path / "recipe.yaml")
        data = build_data(recipe)
        model = load_classifier(path / "model", recipe.model.arch, data.num_classes)
    else:  # a recipe: score the model it names, before any unlearning
        recipe = load_recipe(path)
        data = build_data(recipe)
        model = recipe_model(recipe, data.num_classes)
    return evaluate(model, data, recipe.eval.metrics, recipe.eval.batch_size)


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


def _file_logger(output: Path, log, cpu: bool):
    """`log` that also appends to `output/run.log` (main process only)."""
    from accelerate import PartialState

    if not PartialState(cpu=cpu).is_main_process:
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
