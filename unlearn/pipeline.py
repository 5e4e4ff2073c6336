"""The erase pipeline: recipe in, run folder out. Used by `unlearn erase`, `unlearn eval` and `unlearn bench`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoints import write_json, write_text
from .errors import CheckpointNotFoundError, ConfigError, DataError, OutputError, UnlearnError
from .harness import HARNESSES
from .paths import existing_path, make_folder, open_own_file, output_error, shown
from .recipe import Recipe, load_recipe, resolve_reference
from .runfolder import RunFolder, finished_run, read_metrics, reference_folder
from .spread import everywhere, spread_over
from .train import end_trackers, reset_accelerate_state
from .tune import auto_fields, tune_method

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
    return Path("runs") / _file_name(f"{recipe.data.dataset}-{what}-{recipe.method}-seed{recipe.seed}")


def _file_name(text: str, limit: int = 120) -> str:
    """`text` as one folder name: a path separator or a control character becomes `_` (a concept such as
    "../x" or "AC/DC" stays one folder under runs/), a leading dot is dropped, and a name over `limit` bytes
    is cut, with a hash of the whole that keeps it unique."""
    import hashlib
    import re

    name = re.sub(r"[\x00-\x1f\x7f/\\]", "_", text).lstrip(".") or "_"
    if len(name.encode("utf-8", "surrogatepass")) <= limit:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    head = name.encode("utf-8", "surrogatepass")[: limit - 13].decode("utf-8", "ignore")
    return f"{head}-{digest}"


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


def run(recipe: Recipe, output: str | Path | None = None, log=print, strict: bool = False) -> dict:
    """Erase as the recipe says and score the result; returns the metrics (also in `output/metrics.json`).
    With `strict`, an original model that scores near chance on the data as preprocessed is refused (a
    `DataError`) instead of warned about (the utility guard's own verdict is `metrics["utility_warning"]`).

    The run folder holds its resolved recipe and input checkpoint fingerprint (`unlearn.runfolder`): a finished
    folder of the same recipe is reused, an interrupted one resumes from its last training checkpoint, and a
    folder of another recipe or checkpoint, or one another run is writing to, is refused.
    """
    from accelerate import PartialState

    if recipe.output is not None and not isinstance(recipe.output, str):  # Path(123) would be a TypeError
        raise ConfigError(f"output must be a folder path, got {recipe.output!r}; write it as a string")
    output = Path(output or recipe.output or default_output(recipe))
    _refuse_unusable_spelling(recipe.model.checkpoint, "model.checkpoint", utf8=True)
    _refuse_unusable_spelling(str(output), "the output folder", utf8=False)
    _refuse_overwriting_input(recipe, output)
    state = PartialState(cpu=use_cpu(recipe))
    main = state.is_main_process
    folder = RunFolder(output, recipe, main=main)
    with state.main_process_first():  # the main process checks and writes the folder first
        folder.open()
    try:
        if folder.complete:
            log(f"{output} is already complete; reusing its metrics.json")
            reused = folder.metrics()
            if reused.get("utility_warning"):  # the guard's verdict stays the last line
                log(reused["utility_warning"])
            return reused
        log = _file_logger(output, log, main)
        if folder.resuming:
            log(f"continuing the interrupted run in {output}")
        return _run(recipe, output, folder, log, main, strict=strict)
    finally:
        folder.close()


def _run(recipe: Recipe, output: Path, folder: RunFolder, log, main: bool, strict: bool = False) -> dict:
    """The run itself. Its outputs are written in this order: the model, the artifacts, the model card
    (`model/README.md`, `unlearn.card`), report.md (with the attacks' section), metrics.json, and last run.json
    marked complete (`folder.finish`); the training checkpoints are removed only after that. A run killed
    anywhere before is resumed by a rerun, which writes every output again; a full disk or an unwritable folder raises `OutputError` with the checkpoints kept."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from .card import write_model_card

    if recipe.eval.attacks and not recipe.eval.reference and recipe.method != "retrain":
        raise ConfigError(
            "eval.attacks need the Retrain reference as their control: set eval.reference to a Retrain recipe "
            "or run folder"
        )
    # Checked in every process before anything runs (the Retrain reference included), so that each process of
    # a multi-process launch fails here alike and only the main one says it (`cli.main`).
    processes = PartialState().num_processes
    method = recipe.build_method()
    check_processes(method, recipe.model.family, processes)
    batch_size = getattr(method, "batch_size", None)
    if isinstance(batch_size, int) and processes > 1 and batch_size % processes:
        fit = batch_size - batch_size % processes or processes
        raise ConfigError(
            f"method.batch_size {batch_size} must be a multiple of the {processes} processes: the recipe's batch "
            f"is the global batch, split evenly across processes (use method.batch_size={fit}, or launch another "
            "number of processes)"
        )
    reference, reference_dir = (None, None)
    if recipe.eval.reference:
        reference, reference_dir = _reference(recipe, output, log, strict)
    accelerator = make_accelerator(recipe, output, log)
    check_sharding(method, accelerator)
    set_seed(recipe.seed)
    harness = HARNESSES[recipe.model.family](recipe, accelerator.device, log)
    with accelerator.main_process_first():  # a world checkpoint is built and cached once
        model, data = harness.setup()
    log(f"{recipe.method} on {recipe.model.checkpoint}: {data.describe()}")
    _check_original(harness, model, data, log if main else (lambda message: None), strict)

    metrics: dict = {}
    if recipe.model.prune is not None:
        metrics["pruned_sparsity"] = _prune_first(model, recipe, data, accelerator, output, log)
    original = None
    # every process generates, judges and measures its share of the batches (`unlearn.spread`)
    with spread_over(accelerator.state):
        harness.before(model, data, reference_dir)
        if recipe.eval.original:
            original = harness.score_original(model, data)  # from the cache when scored before
            metrics.update({f"original_{k}": v for k, v in original.metrics.items()})

    if auto_fields(recipe):  # `method.lr: auto`: a budgeted search on held-out training data (unlearn.tune)
        method, tuned = tune_method(recipe, model, data, accelerator, reference, output, log)
        metrics.update({f"tuned_{name}": value for name, value in tuned.items()})
    earlier = folder.begin_segment()
    model, seconds = _timed_unlearn(method, model, data, accelerator, recipe.seed)
    model = accelerator.unwrap_model(model)

    with spread_over(accelerator.state):
        scores = harness.score(model, data)
    failure = None
    if main:
        try:
            metrics = {**scores.metrics, "RTE_s": earlier + seconds, **metrics}
            metrics.update(harness.compare(metrics, reference))
            metrics.update(harness.utility_guard(metrics))  # utility_warning: RA / TA fell past the margin
            metrics["device"] = str(accelerator.device)
            metrics["num_processes"] = accelerator.num_processes
            folder.ensure_held()  # the folder was not deleted during training: its outputs go where they belong
            harness.save_model(model, output)
            artifacts = harness.save_artifacts(output, scores, original)
            report = harness.report(data, metrics, artifacts)
        except UnlearnError as err:  # a full disk, say: the other processes are told, then it is raised
            failure = err
    with spread_over(accelerator.state):
        # On the saved model, as `unlearn attack` would (as in `record_attacks`), by every process: each
        # generates and judges its share (`unlearn.spread`). They start once the main process saved the model.
        if recipe.eval.attacks and everywhere(failure is None):
            from .attacks.run import attack_run, attack_section

            try:
                found, shown_attacks = attack_run(output, log=log)
            except UnlearnError as err:
                if accelerator.num_processes > 1:
                    raise  # met by every process alike, or by the main one alone (its writes): the launch ends
                failure = err
            else:
                if main:
                    metrics = {**metrics, **found}
                    report = "\n".join([report.rstrip("\n"), *attack_section(metrics, shown_attacks)]) + "\n"
    if main and failure is None:
        try:
            write_model_card(output, metrics, recipe)  # model/README.md: what was erased, how, the numbers
            write_text(report, output / "report.md")
            write_json(metrics, output / "metrics.json")  # the last output, then run.json says complete
            folder.finish(seconds)
            # resume state is not needed once finished (a rerun of a complete folder removes what a kill left)
            shutil.rmtree(output / "checkpoints", ignore_errors=True)
            log(harness.headline(metrics))
            log(f"wrote {output}")
            if metrics.get("utility_warning"):  # the last line (`unlearn erase --strict`: exit status 1)
                log(metrics["utility_warning"])
        except UnlearnError as err:  # a full disk, say: the other processes are told, then it is raised
            failure = err
    end_trackers(accelerator)
    _share_failure(accelerator, failure)
    accelerator.wait_for_everyone()
    return metrics


def check_processes(method, family: str, processes: int) -> None:
    """Refuse, in one sentence, a launch on several processes of a method that runs in one only: every method of
    a family whose harness says `multi_process` (classifiers: `fit()` shards their batches) runs on several, and
    a generative method when it says so itself (`Method.multi_process`)."""
    if processes <= 1 or HARNESSES[family].multi_process or method.multi_process:
        return
    from .methods import METHODS

    name = method.registered_as or type(method).__name__
    able = sorted(
        registered
        for registered, variants in METHODS.items()
        if any(family in variant.families and variant.multi_process for variant in variants)
    )
    raise ConfigError(
        f"method {name!r} on {family} models runs in a single process for now; launch it without --multi_gpu "
        f"(the {family} methods that run on several processes: {', '.join(able) or 'none yet'})"
    )


def check_sharding(method, accelerator) -> None:
    """Refuse, in one sentence, an FSDP launch (`accelerate launch --config_file recipes/accelerate/fsdp_*.yml`)
    that would not shard: on a machine without a GPU (accelerate runs it as plain DDP), or of a method whose loop
    does not shard its model (`Method.shards_model`)."""
    from accelerate.utils import DistributedType

    from .methods import METHODS

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError(
            "an FSDP launch config needs GPUs (accelerate runs it as plain DDP on "
            f"{accelerator.distributed_type.value}); launch with recipes/accelerate/ddp.yml or --multi_gpu"
        )
    if accelerator.distributed_type == DistributedType.FSDP and not method.shards_model:
        able = sorted(name for name, variants in METHODS.items() if any(v.shards_model for v in variants))
        name = method.registered_as or type(method).__name__
        raise ConfigError(
            f"method {name!r} does not shard its model under FSDP yet; launch it with recipes/accelerate/ddp.yml "
            f"(the methods that shard: {', '.join(able)})"
        )


def _share_failure(accelerator, failure: UnlearnError | None) -> None:
    """Raise the main process's user error (`failure`, met while it alone scored and wrote the outputs) in
    every process: the others, waiting for it, would otherwise meet a broken process group when it exits."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        said = broadcast_object_list([str(failure) if failure is not None else None], from_process=0)[0]
        if said is not None and failure is None:
            raise OutputError(said)  # not printed: only the main process speaks (`cli.main`)
    if failure is not None:
        raise failure


def evaluate_run(target: str | Path, log=print) -> dict:
    """`unlearn eval`: score a finished run folder's model, or the model a recipe names (before unlearning).

    A run folder is scored as its run scored it (the same task, seeds and references: the original model and
    the Retrain reference it names), so the result equals the run's own `metrics.json` on the keys it scores.
    Under a multi-process launch, generation, judging and FID features are spread over the processes
    (`unlearn.spread`) with the metrics of one process, the attacks' included (every process attacks; the main
    process alone writes what they write). Every process returns the metrics.
    """
    from accelerate import PartialState
    from accelerate.utils import set_seed

    path = existing_path(target, "run folder or recipe")
    if path.is_dir():
        finished_run(path, "unlearn eval")
    recipe_path = path / "recipe.yaml" if path.is_dir() else path
    recorded = {}
    if path.is_dir() and (path / "metrics.json").exists():  # checked before anything loads
        recorded = read_metrics(path / "metrics.json", f"run folder {str(path)!r}")
    recipe = load_recipe(recipe_path)
    reset_accelerate_state(recipe.train.mixed_precision, use_cpu(recipe))
    state = PartialState(cpu=use_cpu(recipe))
    log = log if state.is_main_process else (lambda message: None)
    harness = HARNESSES[recipe.model.family](recipe, state.device, log)
    set_seed(recipe.seed)
    with state.main_process_first():  # a world checkpoint is built and cached once
        original, data = harness.setup()
    with spread_over(state):
        if not path.is_dir():
            harness.before(original, data, None)
            return harness.score_original(original, data).metrics
        if (path / "pruned").exists():  # the run unlearned (and scored as original) the pruned model
            original = harness.load_output(path / "pruned", data)
        reference_dir, reference = reference_folder(recipe, path)
        harness.before(original, data, reference_dir)
        metrics: dict = {}
        if recipe.eval.original:
            metrics = {f"original_{k}": v for k, v in harness.score_original(original, data).metrics.items()}
        scores = harness.score(harness.load_output(path / "model", data), data)
    metrics = {**scores.metrics, **({"RTE_s": recorded["RTE_s"]} if "RTE_s" in recorded else {}), **metrics}
    metrics.update(harness.compare(metrics, reference))
    if recipe.eval.attacks:
        from .attacks.run import attack_run

        with spread_over(state):  # every process attacks, its share of the generation and judging
            metrics.update(attack_run(path, log=log)[0])
    return metrics


def _reference(recipe: Recipe, output: Path, log, strict: bool = False) -> tuple[dict, Path]:
    """The Retrain reference's metrics and run folder: a finished run folder, or a recipe run once into
    `output/reference`."""
    ref = resolve_reference(recipe)  # beside the recipe, here, or a shipped recipe; else one sentence
    if ref.is_dir():
        if not (ref / "metrics.json").exists():
            raise CheckpointNotFoundError(
                f"reference run {str(ref)!r} has no metrics.json; point eval.reference at a finished Retrain run "
                "folder or a Retrain recipe"
            )
        return read_metrics(ref / "metrics.json", f"reference run {str(ref)!r}"), ref
    if not ref.exists():
        raise CheckpointNotFoundError(
            f"reference {recipe.eval.reference!r} is neither a run folder nor a recipe; point eval.reference at a "
            "finished Retrain run folder or a Retrain recipe"
        )
    reference = load_recipe(ref)
    if reference.eval.reference:
        raise ConfigError(f"reference recipe {str(ref)!r} must not itself name a reference")
    # Same task, same seed, same precision as the run it judges.
    reference.data, reference.seed, reference.train = recipe.data, recipe.seed, recipe.train
    reference.model = dataclasses.replace(recipe.model, prune=None)  # Retrain is the dense gold standard
    reference.eval.original = False
    log(f"reference: {reference.method} ({ref})")
    return run(reference, output / "reference", log=log, strict=strict), output / "reference"


def _check_original(harness, model, data: UnlearnData, log, strict: bool) -> None:
    """Before any training: say in one line (with `strict`: refuse, a `DataError`) when the original model
    scores so poorly on the data as preprocessed that the run would measure nothing (`Harness.check_original`)."""
    problem = harness.check_original(model, data)
    if problem is None:
        return
    if strict:
        raise DataError(f"{problem} (--strict)")
    log(f"warning: {problem}")


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


def _refuse_unusable_spelling(path: str | None, what: str, utf8: bool) -> None:
    """Refuse a path string no file system call can take: UTF-16 surrogate halves (`\\ud83d\\ude42`, what a
    JSON-escaped emoji becomes in YAML) instead of characters; with `utf8`, also a name of undecodable bytes
    (the weights loaders take UTF-8 paths only)."""
    if not path or str(path).startswith("world:"):
        return
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ConfigError(
            f"{what} {path!r} holds UTF-16 surrogate halves, not characters (an escaped emoji?); write the "
            "characters themselves (in YAML: \\U0001F642)"
        ) from None
    if utf8:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{what} {path!r} is not valid UTF-8 (its name holds undecodable bytes); rename it"
            ) from None


def _refuse_overwriting_input(recipe: Recipe, output: Path) -> None:
    """Refuse an output folder that holds the input checkpoint (it is the checkpoint, its folder or any folder
    above it) or lies inside the input model folder or the data folder (`data.root`: the run's images would
    join the data), however either is spelled (relative, through symlinks, `..`, a bind mount of the same
    folder): a run writes its model, metrics and reports there. Beside a checkpoint file (in a new folder next
    to it) is allowed: nothing written there can replace the file."""
    real_target = Path(os.path.realpath(output))
    inputs = [(recipe.model.checkpoint, "the input model folder"), (recipe.data.root, "the data folder")]
    for given, what in inputs:
        if not given or str(given).startswith("world:"):
            continue
        try:
            source_stat = os.stat(given)
        except OSError:
            continue  # a hub id, or a missing input (loading says so)
        if not stat.S_ISDIR(source_stat.st_mode):
            continue
        real_source = Path(os.path.realpath(given))
        for folder in [real_target, *real_target.parents]:
            if folder == real_source or _same_file(folder, source_stat):
                raise ConfigError(
                    f"the output folder {shown(output)} is inside {what} {shown(given)}; choose another -o "
                    "outside it"
                )
    checkpoint = recipe.model.checkpoint
    if not checkpoint or str(checkpoint).startswith("world:"):
        return
    try:
        target_stat = os.stat(output)
        os.stat(checkpoint)
    except OSError:
        return  # the output does not exist yet (so it holds nothing), or the checkpoint is a hub id
    real_source = Path(os.path.realpath(checkpoint))
    if real_source == real_target or _same_file(real_source, target_stat):
        raise ConfigError(f"the output folder {shown(output)} is the input checkpoint; choose another -o")
    for folder in real_source.parents:
        if folder == real_target or _same_file(folder, target_stat):
            raise ConfigError(
                f"the output folder {shown(output)} holds the input checkpoint {shown(checkpoint)}; choose "
                "another -o"
            )


def _same_file(path: Path, known: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(path), known)
    except OSError:
        return False


def _file_logger(output: Path, log, main: bool):
    """`log` that also appends to `output/run.log` (main process only; never through a symlink put there)."""
    if not main:
        return lambda message: None
    make_folder(output)
    path = output / "run.log"
    os.close(open_own_file(path, os.O_WRONLY | os.O_APPEND))  # refused now, before the run, if unwritable

    def say(message: str) -> None:
        log(message)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n".encode("utf-8", "backslashreplace")
        fd = open_own_file(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        except OSError as err:
            raise output_error(path, err) from None
        finally:
            os.close(fd)

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
