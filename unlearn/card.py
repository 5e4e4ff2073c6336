"""The Hugging Face model card of a run's output model (`RUN_DIR/model/README.md`), and `--push-to-hub`.

The card says what was erased, from which model (its name and the sha256 fingerprint the run recorded in
`run.json`), with which method and settings (the resolved recipe), what the run measured beside the original's
and Retrain's numbers, what the attacks found where they ran, and which toolkit version wrote it. Its YAML header
is machine-readable: the Hub's `model-index` holds every finite metric as an evaluation result (built with
huggingface_hub's `ModelCardData` and `EvalResult`, so `ModelCard.load` parses it), and an `unlearning` block
holds the provenance. The body tells a reader how to load the folder and how to read the numbers.

The card is documentation, not weights: every loader ignores it (transformers, diffusers, our classifier and
GAN folders), and `unlearn.runfolder.checkpoint_fingerprint` leaves it out, so a card rewritten later (`unlearn
attack` adds its results) does not make a run that took this folder as its input see another checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .checkpoints import write_text
from .errors import ConfigError, OutputError

CARD_NAME = "README.md"
ROLES = {"": "unlearned", "original_": "original", "retrain_": "Retrain", "gap_": "gap to Retrain"}


def write_model_card(run_dir: str | Path, metrics: dict, recipe=None) -> Path:
    """Write (or rewrite) the card of `run_dir/model` from the run's `metrics`, atomically; returns its path.

    Args:
        run_dir: the run folder; its `run.json` gives the input checkpoint's fingerprint.
        metrics: the run's metrics (with the attacks' keys where attacks ran).
        recipe: the run's resolved recipe; default: read from `run_dir/recipe.yaml`.
    """
    from .recipe import load_recipe

    run_dir = Path(run_dir)
    recipe = recipe if recipe is not None else load_recipe(run_dir / "recipe.yaml")
    path = run_dir / "model" / CARD_NAME
    write_text(
        str(build_model_card(recipe, metrics, _recorded_fingerprint(run_dir), run_dir / "model")), path
    )
    return path


def build_model_card(recipe, metrics: dict, fingerprint: str, model_dir: Path):
    """The `huggingface_hub.ModelCard` of an unlearned model (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    fmt = _model_format(model_dir)
    task = _pipeline_tag(recipe.model.family, model_dir)
    erased = _erased(recipe.data)
    base = _base_name(recipe.model.checkpoint, recipe.model.arch)
    name = f"{base} without {_erased_text(erased)} ({recipe.method})"
    results = _eval_results(recipe, metrics, task, erased)
    hub_base = recipe.model.checkpoint if fingerprint.startswith("hub id ") else None
    data = ModelCardData(
        model_name=name,
        library_name={"transformers": "transformers", "diffusers": "diffusers"}.get(fmt),
        pipeline_tag=task,
        base_model=hub_base,
        tags=["machine-unlearning", "unlearn-toolkit", f"unlearning-{recipe.method}", recipe.model.family],
        eval_results=results or None,
        unlearning={
            "erased": erased,
            "base_model": {
                "name": base,
                "checkpoint": recipe.model.checkpoint,
                "arch": recipe.model.arch,
                "fingerprint": f"sha256:{fingerprint}"
                if re.fullmatch(r"[0-9a-f]{64}", fingerprint)
                else fingerprint,
            },
            "method": {"name": recipe.method, "settings": _method_settings(recipe)},
            "recipe": _plain({k: v for k, v in recipe.to_dict().items() if k != "output"}),
            "retrain_reference": any(key.startswith("retrain_") for key in metrics),
            "attacks": sorted(_attack_names(metrics)),
            "utility_warning": metrics.get("utility_warning"),  # the utility guard's sentence, or None
            "toolkit": {"name": "unlearn-toolkit", "version": __version__},
        },
    )
    if hub_base is not None:
        data.base_model_relation = "finetune"  # the Hub's word for weights derived by further training
    body = _body(recipe, metrics, (name, base), fingerprint, model_dir, erased)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# --------------------------------------------------------------------------------------------- what it is


def _recorded_fingerprint(run_dir: Path) -> str:
    """The input checkpoint's fingerprint as the run recorded it (`run.json`), else "unknown"."""
    try:
        return str(json.loads((run_dir / "run.json").read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _erased(data) -> dict:
    """What was erased, as plain data: classes, a concept (with its anchor), or a random share of examples."""
    if data.concept is not None:
        concepts = data.concept if isinstance(data.concept, list) else [data.concept]
        return {"concept": [str(c) for c in concepts], "anchor": data.anchor, "dataset": data.dataset}
    if data.forget_class:
        return {"classes": [int(c) for c in data.forget_class], "dataset": data.dataset}
    share = data.forget_fraction
    return {"random_examples": _plain(share), "dataset": data.dataset}


def _erased_text(erased: dict) -> str:
    if "concept" in erased:
        return "the concept " + " and ".join(repr(c) for c in erased["concept"])
    if "classes" in erased:
        classes = erased["classes"]
        return f"class{'es' if len(classes) > 1 else ''} {', '.join(map(str, classes))}"
    share = erased["random_examples"]
    if not isinstance(share, (int, float, dict)):
        return "its forget set"
    if isinstance(share, dict):
        return "random examples of " + ", ".join(f"{100 * v:g} % of class {c}" for c, v in share.items())
    return f"a random {100 * share:g} % of its training examples"


def _base_name(checkpoint: str | None, arch: str | None) -> str:
    """The input model's name: a world or hub id as written, a local path by its last part (a card may be
    published: it does not spell out the user's folders; the recipe in the header does)."""
    if not checkpoint:
        return f"{arch} (fresh weights)"
    text = str(checkpoint)
    if text.startswith("world:") or not Path(text).exists():
        return text
    return Path(text).resolve().name or text


def _model_format(model_dir: Path) -> str:
    """How the folder loads: "diffusers", "transformers", "gan" or "unlearn" (a classifier's state dict)."""
    if (model_dir / "model_index.json").exists():
        return "diffusers"
    if (model_dir / "gan_config.json").exists():
        return "gan"
    if (model_dir / "config.json").exists():
        return "transformers"
    return "unlearn"


def _pipeline_tag(family: str, model_dir: Path) -> str:
    if family == "classifier":
        return "image-classification"
    if family == "diffusion":
        try:
            index = json.loads((model_dir / "model_index.json").read_text())
        except (OSError, ValueError):
            index = {}
        if isinstance(index, dict) and index.get("text_encoder") not in (None, [None, None]):
            return "text-to-image"
    return "unconditional-image-generation"


def _plain(value):
    """`value` with tuples as lists and non-finite floats as strings (YAML and the Hub's JSON both read it)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------- the numbers


def _metric_info(family: str, key: str):
    """(role prefix, label, MetricInfo) of a metric key, or None for keys that are not measurements (device,
    num_processes). The label is the catalogue's title with its unit, naming the class or concept of a
    per-class or per-concept key (`acc. class 3 (%)`, `erasure rate: three (%)`)."""
    from .attacks.run import attack_info
    from .harness import HARNESSES

    info = attack_info(key)
    prefixes = ("original_", "retrain_") if info is not None else ("original_", "retrain_", "gap_")
    prefix = next((p for p in prefixes if key.startswith(p)), "")
    base = key[len(prefix) :]
    label = info.title if info is not None else ""
    if info is None:
        harness = HARNESSES[family]
        name, _, concept = base.partition(":")
        info = harness.info(name)
        if info is None:
            return None
        label = info.title + (f": {concept}" if concept else "")
        pattern = next((p for p, i in harness.catalogue.items() if "<" in p and i is info), None)
        if pattern is not None:  # a per-class key: say which class
            label += f" {name[len(pattern.split('<')[0]) :]}"
    if info.unit and f"({info.unit})" not in label:
        label += f" ({info.unit})"
    return prefix, label, info


def _measurements(family: str, metrics: dict) -> dict:
    """{key: (prefix, label, info)} of the finite numeric metrics, in the run's order."""
    found = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        described = _metric_info(family, key)
        if described is not None:
            found[key] = described
    return found


def _eval_results(recipe, metrics: dict, task: str, erased: dict) -> list:
    """One `EvalResult` per finite metric: `metric_type` is the metrics.json key (`UA`, `retrain_UA`,
    `relearn.R`), `metric_name` says whose number it is (unlearned, original, Retrain) and its unit."""
    from huggingface_hub import EvalResult

    results = []
    for key, (prefix, label, _) in _measurements(recipe.model.family, metrics).items():
        results.append(
            EvalResult(
                task_type=task,
                task_name=f"Unlearning: erase {_erased_text(erased)}",
                dataset_type=str(recipe.data.dataset),
                dataset_name=f"{recipe.data.dataset}: erase {_erased_text(erased)}",
                metric_type=key,
                metric_name=f"{ROLES[prefix]}: {label}",
                metric_value=float(metrics[key]),
            )
        )
    return results


def _attack_names(metrics: dict) -> set[str]:
    """The attacks that ran: each writes its residual `<attack>.R`."""
    return {key[: -len(".R")] for key in metrics if key.endswith(".R")}


# ---------------------------------------------------------------------------------------------------- the body


def _body(
    recipe, metrics: dict, names: tuple[str, str], fingerprint: str, model_dir: Path, erased: dict
) -> str:
    name, base = names
    fmt = _model_format(model_dir)
    from . import __version__

    lines = [
        f"# {name}",
        "",
        f"`{base}` with {_erased_text(erased)} erased by the unlearning method **{recipe.method}** "
        f"([unlearn-toolkit](https://pypi.org/project/unlearn-toolkit/) {__version__}).",
        "",
        "## How to load it",
        "",
        "```python",
        *_loading(fmt, recipe, model_dir),
        "```",
        "",
        "## Results",
        "",
        "Retrain is the control: the same model trained from scratch without the erased data. An unlearning "
        "method aims at Retrain's numbers (a model that never saw the data), not at zero: on the erased data "
        "closest to Retrain is best; on the retained data, higher is better. `original` is the input model "
        "before unlearning.",
        "",
        *_table(recipe.model.family, metrics),
        *_utility_warning(metrics),
        *_attack_table(metrics),
        "",
        "## Provenance",
        "",
        f"- input model: `{base}`, fingerprint `{fingerprint}` ({_fingerprint_meaning(fingerprint)})",
        f"- method: `{recipe.method}` with {_settings_text(_method_settings(recipe))}",
        f"- seed: {recipe.seed}",
        f"- toolkit: unlearn-toolkit {__version__}",
        "",
        "The header of this card holds every number as a machine-readable evaluation result (`model-index`) and "
        "the resolved recipe under `unlearning.recipe`; rerun it with `unlearn erase recipe.yaml` (the run "
        "folder holds the recipe, `metrics.json` and `report.md`).",
        "",
    ]
    return "\n".join(lines)


def _fingerprint_meaning(fingerprint: str) -> str:
    if re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        return "sha256 over its files, as the run recorded it in run.json"
    if fingerprint.startswith("world:"):
        return "an embedded world model, built deterministically by the toolkit"
    return "as the run recorded it in run.json"


def _loading(fmt: str, recipe, model_dir: Path) -> list[str]:
    if fmt == "diffusers":
        return [
            "from diffusers import DiffusionPipeline",
            "",
            'pipeline = DiffusionPipeline.from_pretrained("path/to/this/folder")',
        ]
    if fmt == "transformers":
        return [
            "from transformers import AutoModelForImageClassification",
            "",
            'model = AutoModelForImageClassification.from_pretrained("path/to/this/folder")',
        ]
    if recipe.model.family == "classifier":
        try:  # the saved folder says its number of classes; load_model checks the one it is given
            classes = json.loads((model_dir / "unlearn_model.json").read_text())["num_classes"]
        except (OSError, ValueError, KeyError, TypeError):
            classes = 10
        family = f", num_classes={classes}"
    else:
        family = f', family="{recipe.model.family}"'
    return [
        "from unlearn import load_model  # pip install unlearn-toolkit",
        "",
        f'model = load_model("path/to/this/folder"{family})',
    ]


def _table(family: str, metrics: dict) -> list[str]:
    """Metric | original | unlearned | Retrain, for the unprefixed measurements that are not per-class keys."""
    from .harness.base import better_text, fmt

    rows, meanings = [], []
    for key, (prefix, label, info) in _measurements(family, metrics).items():
        if prefix or "." in key or re.search(r"_\d+$", key):  # roles, attacks and per-class keys: header only
            continue
        cells = [fmt(metrics.get(f"original_{key}")), fmt(metrics[key]), fmt(metrics.get(f"retrain_{key}"))]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        if ":" not in key:
            meanings.append(f"- {info.title}: {info.meaning}; {better_text(info.better)}.")
    if not rows:
        return ["No metrics were recorded."]
    control = (
        [] if any(k.startswith("retrain_") for k in metrics) else ["", "This run had no Retrain reference."]
    )
    table = ["| metric | original | unlearned | Retrain |", "|---|---|---|---|", *rows]
    return [*table, *control, "", *meanings, "", "Per-class and per-role numbers are in this card's header."]


def _utility_warning(metrics: dict) -> list[str]:
    """The utility guard's sentence (retained or test accuracy fell past its margin), where it warned."""
    warning = metrics.get("utility_warning")
    return ["", f"**Utility warning:** {warning}"] if isinstance(warning, str) and warning else []


def _attack_table(metrics: dict) -> list[str]:
    from .harness.base import fmt

    names = sorted(_attack_names(metrics))
    if not names:
        return []
    lines = [
        "",
        "### Attacks: is it really gone?",
        "",
        "Each attack tried to bring the erased data back, with the same settings and seeds, from the original, "
        "from Retrain and from this model. R = (this − Retrain) / (original − Retrain): 0 = as gone as in "
        "Retrain, 1 = as present as in the original.",
        "",
        "| attack | success on original (%) | on Retrain (%) | on this model (%) | R |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        cells = [metrics.get(f"{p}{name}.success") for p in ("original_", "retrain_", "")]
        lines.append(f"| {name} | " + " | ".join(map(fmt, [*cells, metrics.get(f"{name}.R")])) + " |")
    return lines


def _method_settings(recipe) -> dict:
    """The method's settings as the run resolved them (defaults spelt out, as in the run's recipe.yaml)."""
    section = recipe.to_dict().get("method", {})
    return _plain({key: value for key, value in section.items() if key != "name"})


def _settings_text(settings: dict) -> str:
    shown = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    return shown or "its defaults"


# ------------------------------------------------------------------------------------------------ the upload


def check_push_target(repo_id: str) -> None:
    """Refuse, before anything runs, a `--push-to-hub` target that cannot work: a malformed repo id, or no
    Hugging Face token on this machine (`hf auth login` or `HF_TOKEN`).

    Raises:
        ConfigError: one sentence saying which, and how to fix it.
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"--push-to-hub {repo_id!r} is not a Hugging Face repo id; write it as NAME or OWNER/NAME (letters, "
            "digits, '-', '_', '.')"
        ) from None
    if get_token() is None:
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then rerun "
            "(nothing was run)"
        )


def push_to_hub(run_dir: str | Path, repo_id: str, private: bool | None = None) -> str:
    """Upload `run_dir/model` (with its card; written first where an older run has none) to the Hub model repo
    `repo_id`, created if it does not exist; returns the repo's URL.

    Raises:
        OutputError: the Hub cannot be reached (offline) or refuses (no access, a bad token); the run folder
            is complete either way, and the same command uploads it once the cause is fixed.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .runfolder import read_metrics

    # The Hub's HTTP client's base error (httpx's HTTPError): a connection refused, a name not resolved, a
    # timeout. Its refusals (HfHubHTTPError) and offline mode (OfflineModeIsEnabled) are OSErrors too.
    network = HfHubHTTPError.__bases__[0]

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / CARD_NAME).exists():
        write_model_card(run_dir, read_metrics(run_dir / "metrics.json", f"run folder {str(run_dir)!r}"))
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=url.repo_id,
            repo_type="model",
            folder_path=str(model_dir),
            commit_message=f"unlearn-toolkit: upload {run_dir.name}",
        )
    except (OSError, ValueError, network) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OutputError(
            f"could not upload {run_dir / 'model'} to the Hugging Face repo {repo_id!r} ({reason}); the run folder "
            "is complete: fix the access or the connection and rerun the same command to upload it"
        ) from err
    return str(url)
