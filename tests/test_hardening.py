"""The hardening corpus: bad values, hostile files, hostile paths, amplification and faults, as a careless or
hostile user would try them. Every case must end in one sentence on stderr that names the problem, exit status 2
(or the library's typed `unlearn.errors` exception), no traceback, no input file modified and nothing
half-written left behind that looks finished.

Each case is one function below, registered with `@case(phrase)`: it builds its hostile inputs under `tmp` and
returns the `unlearn` command line (a list; run in this process, or as a script with `script=True` where a hang
or a second process is the point), or a zero-argument callable for a library case (which must raise an
`UnlearnError` whose message contains the phrase).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from unlearn.cli import main
from unlearn.errors import UnlearnError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RL = str(RECIPES / "classifier" / "digits" / "random_label.yaml")
T2I_UCE = str(RECIPES / "diffusion" / "digits_t2i" / "uce.yaml")
FAST = ["method.epochs=1", "eval.reference=null", "eval.original=false"]


@dataclass
class Case:
    name: str
    build: Callable[[Path], list | Callable]
    phrase: str
    exit: int
    script: bool
    timeout: int


CASES: list[Case] = []


def case(phrase: str, *, exit: int = 2, script: bool = False, timeout: int = 120, slow: bool = False):
    """Register the decorated `build(tmp)` as a corpus case whose message must contain `phrase` (`{tmp}` in it
    stands for the case's temporary folder)."""

    def register(build):
        entry = Case(build.__name__, build, phrase, exit, script, timeout)
        CASES.append(pytest.param(entry, id=build.__name__, marks=[pytest.mark.slow] if slow else []))
        return build

    return register


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (FIFOs and other special files are skipped, never opened)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def run_cli(argv: list, capsys, script: bool, timeout: int) -> tuple[int, str]:
    argv = [str(item) for item in argv]
    if script:
        proc = subprocess.run(
            [sys.executable, "-m", "unlearn", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        return proc.returncode, proc.stderr
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ values

DIGITS = RECIPES / "classifier" / "digits"
DDPM = RECIPES / "diffusion" / "digits_ddpm"
T2I = RECIPES / "diffusion" / "digits_t2i"
GAN = RECIPES / "gan" / "digits"


def recipe_file(tmp: Path, base: Path | str, overrides: list[str], name: str = "recipe.yaml") -> Path:
    """`base` with `overrides` written out as a recipe file of its own (what a user edits by hand)."""
    import yaml

    from unlearn.recipe import apply_override

    raw = yaml.safe_load(Path(base).read_text())
    for item in overrides:
        apply_override(raw, item)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# (name, recipe, overrides, phrase): each is tried twice, as `unlearn erase RECIPE OVERRIDES` and as
# `unlearn check FILE` with the overrides written into the file; both must refuse it before anything loads.
BAD_VALUES = [
    ("negative_lr", RL, ["method.lr=-1"], "method.lr must be greater than 0, got -1"),
    ("zero_lr", RL, ["method.lr=0"], "method.lr must be greater than 0"),
    ("nan_lr", RL, ["method.lr=.nan"], "method.lr must be a finite number"),
    ("infinite_lr", RL, ["method.lr=.inf"], "method.lr must be a finite number"),
    ("zero_batch_size", RL, ["method.batch_size=0"], "method.batch_size must be at least 1, got 0"),
    ("zero_epochs", RL, ["method.epochs=0"], "method.epochs must be at least 1, got 0"),
    ("negative_epochs", RL, ["method.epochs=-1"], "method.epochs must be at least 1, got -1"),
    (
        "unknown_optimizer",
        RL,
        ["method.optimizer=adagrad"],
        "method.optimizer must be one of sgd, adam, adamw",
    ),
    ("unknown_lr_schedule", RL, ["method.lr_schedule=step"], "method.lr_schedule must be one of constant"),
    ("unknown_augment", RL, ["method.augment=mixup"], "method.augment must be one of none, crop_flip"),
    ("momentum_above_one", RL, ["method.momentum=1.5"], "method.momentum must be in [0, 1)"),
    ("negative_weight_decay", RL, ["method.weight_decay=-0.1"], "method.weight_decay must be at least 0"),
    ("zero_max_grad_norm", RL, ["method.max_grad_norm=0"], "method.max_grad_norm must be greater than 0"),
    ("salun_sparsity_one", DIGITS / "salun.yaml", ["method.sparsity=1"], "method.sparsity must be in [0, 1)"),
    (
        "l1_no_l1_epochs_beyond_epochs",
        DIGITS / "l1_sparse.yaml",
        ["method.no_l1_epochs=99"],
        "no_l1_epochs must",
    ),
    ("laf_negative_temp", DIGITS / "laf.yaml", ["method.temp=-1"], "method.temp must be greater than 0"),
    (
        "laf_zero_vae_epochs",
        DIGITS / "laf.yaml",
        ["method.vae_epochs=0"],
        "method.vae_epochs must be at least 1",
    ),
    ("laf_accumulation", DIGITS / "laf.yaml", ["train.gradient_accumulation_steps=2"], "does not accumulate"),
    ("class_out_of_range", RL, ["data.forget_class=[10]"], "class id 10 is out of range"),
    ("negative_class", RL, ["data.forget_class=[-1]"], "class id -1 is out of range"),
    ("class_twice", RL, ["data.forget_class=[3, 3]"], "names a class twice"),
    ("every_class", RL, ["data.forget_class=[0,1,2,3,4,5,6,7,8,9]"], "nothing would be left to retain"),
    (
        "fraction_above_one",
        RL,
        ["data.forget_fraction=1.5", "data.forget_class=null"],
        "data.forget_fraction must lie strictly between 0 and 1",
    ),
    (
        "class_share_out_of_range",
        RL,
        ["data.forget_fraction={3: 2}", "data.forget_class=null"],
        "must lie in (0, 1]",
    ),
    ("negative_seed", RL, ["seed=-1"], "seed must be an integer in 0.."),
    ("huge_seed", RL, ["seed=99999999999"], "seed must be an integer in 0.."),
    ("zero_eval_batch_size", RL, ["eval.batch_size=0"], "eval.batch_size must be at least 1"),
    (
        "zero_accumulation",
        RL,
        ["train.gradient_accumulation_steps=0"],
        "gradient_accumulation_steps must be at least 1",
    ),
    ("mixed_precision_yes", RL, ["train.mixed_precision=yes"], "quote the value"),
    ("mixed_precision_unknown", RL, ["train.mixed_precision=fp8"], "unknown train.mixed_precision"),
    ("world_of_another_family", RL, ["model.checkpoint=world:digits/gan"], "is a gan model"),
    ("unknown_world_model", RL, ["model.checkpoint=world:digits/vae"], "has no 'vae' model"),
    ("unknown_world", RL, ["model.checkpoint=world:mnist"], "unknown world in model.checkpoint"),
    ("prune_sparsity_one", DIGITS / "finetune_omp.yaml", ["model.prune={sparsity: 1.0}"], "sparsity"),
    (
        "class_on_text_to_image",
        T2I_UCE,
        ["data.forget_class=[3]", "data.concept=null"],
        "is a text-to-image model: it erases a concept, not a class",
    ),
    (
        "concept_on_class_conditional",
        DDPM / "esd.yaml",
        ["data.concept=three", "data.forget_class=null"],
        "is a class-conditional model: it erases a class, not a concept",
    ),
    ("unknown_digits_concept", T2I_UCE, ["data.concept=cat"], "unknown digits concept 'cat'"),
    ("concept_twice", T2I_UCE, ["data.concept=[three, '3']"], "names the same digit twice"),
    ("ddpm_two_classes", DDPM / "esd.yaml", ["data.forget_class=[3, 4]"], "one class at a time"),
    ("ddpm_anchor_not_a_class", DDPM / "esd.yaml", ["data.anchor=cat"], "data.anchor of a class-conditional"),
    ("ddpm_anchor_is_the_erased_class", DDPM / "esd.yaml", ["data.anchor=3"], "is the class being erased"),
    ("t2i_anchor_is_the_concept", T2I / "esd.yaml", ["data.anchor=Three"], "is a concept being erased"),
    (
        "cross_attention_method_on_class_conditional",
        T2I_UCE,
        ["model.checkpoint=world:digits/ddpm", "data.concept=null", "data.forget_class=[3]"],
        "edits a text-to-image model's cross-attention",
    ),
    ("esd_xattn_on_class_conditional", DDPM / "esd.yaml", ["method.params=xattn"], "class-conditioned"),
    ("unknown_parameter_set", T2I / "esd.yaml", ["method.params=most"], "method.params must be one of"),
    ("uce_zero_ridge", T2I_UCE, ["method.ridge=0"], "method.ridge must be greater than 0"),
    ("uce_unknown_positions", T2I_UCE, ["method.positions=first"], "method.positions must be one of"),
    ("esd_unknown_timestep", T2I / "esd.yaml", ["method.timestep=random"], "method.timestep must be one of"),
    (
        "esd_zero_ddim_steps",
        T2I / "esd.yaml",
        ["method.ddim_steps=0"],
        "method.ddim_steps must be at least 1",
    ),
    ("doco_fp16", T2I / "doco.yaml", ["train.mixed_precision=fp16"], "no fp16 loss scaling"),
    ("doco_warm_up_past_steps", T2I / "doco.yaml", ["method.warm_up=999999"], "doco warm_up"),
    ("doco_unknown_cpg", T2I / "doco.yaml", ["method.cpg=magic"], "method.cpg must be one of"),
    ("ant_split_step_past_ddim_steps", T2I / "ant.yaml", ["method.split_step=50"], "split_step must lie"),
    ("ant_unknown_mode", T2I / "ant.yaml", ["method.mode=fast"], "unknown ant mode 'fast'"),
    (
        "realera_no_stage",
        T2I / "realera.yaml",
        ["method.closed_form=false", "method.lora_steps=0"],
        "runs no stage",
    ),
    (
        "realera_cosine_band",
        T2I / "realera.yaml",
        ["method.min_cosine=2"],
        "method.min_cosine must be in [-1, 1]",
    ),
    ("salun_diffusion_dropout", DDPM / "salun.yaml", ["method.condition_dropout=1.5"], "condition_dropout"),
    ("diffusion_zero_samples", DDPM / "esd.yaml", ["eval.samples=0"], "eval.samples must be at least 1"),
    ("diffusion_zero_sampling_steps", DDPM / "esd.yaml", ["eval.steps=0"], "eval.steps must be at least 1"),
    (
        "diffusion_negative_guidance",
        DDPM / "esd.yaml",
        ["eval.guidance=-1"],
        "eval.guidance must be at least 0",
    ),
    (
        "gan_retrain_accumulation",
        GAN / "retrain.yaml",
        ["train.gradient_accumulation_steps=2"],
        "does not accumulate",
    ),
    (
        "gan_without_feedback",
        GAN / "adapt_then_unlearn.yaml",
        ["method.feedback=null"],
        "needs method.feedback",
    ),
    ("gan_class_out_of_range", GAN / "adapt_then_unlearn.yaml", ["data.forget_class=[10]"], "out of range"),
    (
        "gan_unknown_repulsion",
        GAN / "adapt_then_unlearn.yaml",
        ["method.repulsion=magnetic"],
        "unknown repulsion 'magnetic'",
    ),
    ("gan_beta_one", GAN / "adapt_then_unlearn.yaml", ["method.beta2=1"], "method.beta2 must be in [0, 1)"),
    (
        "gan_world_class_out_of_range",
        GAN / "adapt_then_unlearn.yaml",
        ["data.dataset=generated", "data.forget_class=[11]"],
        "the digits world's models have classes 0..9",
    ),
    ("zero_num_images", T2I_UCE, ["data.num_images=0"], "data.num_images must be at least 1"),
    ("concept_label_not_a_digit", T2I_UCE, ["eval.concept_label=12"], "is not a digit"),
    ("gan_retrain_without_images", GAN / "retrain.yaml", ["data.dataset=generated"], "needs real images"),
]


def register_value_case(name: str, recipe, overrides: list[str], phrase: str) -> None:
    def erase(tmp):
        return ["erase", recipe, "-o", tmp / "run", *overrides]

    def check(tmp):
        return ["check", recipe_file(tmp, recipe, overrides)]

    erase.__name__, check.__name__ = f"erase_{name}", f"check_{name}"
    case(phrase)(erase)
    case(phrase)(check)


for _entry in BAD_VALUES:
    register_value_case(*_entry)


@case("is a text-to-image model: it erases a concept, not a class")
def forget_class_option_on_text_to_image(tmp):
    return ["erase", T2I_UCE, "-o", tmp / "run", "--forget-class", "3"]


@case("is a class-conditional model: it erases a class, not a concept")
def concept_option_on_class_conditional(tmp):
    return ["erase", DDPM / "esd.yaml", "-o", tmp / "run", "--concept", "three"]


@case("is a folder; give the path of a file")
def erase_recipe_is_a_folder(tmp):
    return ["erase", tmp, "-o", tmp / "run"]


@case("is a folder; give the path of a file")
def check_recipe_is_a_folder(tmp):
    return ["check", tmp]


@case("is a folder; give the path of a file")
def check_recipe_folder_of_the_project(tmp):
    return ["check", "recipes/classifier"]


def suite_file(tmp: Path, **changes) -> Path:
    """The digits class-wise suite with `changes` (a value None drops the key)."""
    import yaml

    raw = yaml.safe_load(Path(SUITE).read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@case("seeds must list at least one seed")
def check_suite_without_seeds(tmp):
    return ["check", suite_file(tmp, seeds=[])]


@case("seeds must list at least one seed")
def bench_suite_without_seeds(tmp):
    return ["bench", suite_file(tmp, seeds=[]), "-o", tmp / "bench"]


@case("seeds must be integers")
def check_suite_with_a_text_seed(tmp):
    return ["check", suite_file(tmp, seeds=[0, "one"])]


@case("seeds lists a seed twice")
def check_suite_with_a_seed_twice(tmp):
    return ["check", suite_file(tmp, seeds=[0, 0])]


@case("methods must list at least one method")
def check_suite_without_methods(tmp):
    return ["check", suite_file(tmp, methods=[])]


@case("is listed twice in methods")
def check_suite_with_a_method_twice(tmp):
    return ["check", suite_file(tmp, methods=["finetune", "finetune"])]


@case("not paths")
def check_suite_with_a_path_as_method(tmp):
    return ["check", suite_file(tmp, methods=["../../etc/passwd"])]


@case("does not exist")
def check_suite_with_an_unknown_method(tmp):
    return ["check", suite_file(tmp, methods=["finetuned"])]


@case("overrides must list section.key=value strings")
def check_suite_with_overrides_not_a_list(tmp):
    return ["check", suite_file(tmp, overrides="data.forget_class=[3]")]


@case("needs 'recipes'")
def check_suite_without_recipes(tmp):
    return ["check", suite_file(tmp, recipes=None)]


@case("method.lr must be greater than 0")
def check_suite_with_a_bad_override(tmp):
    return ["check", suite_file(tmp, overrides=["method.lr=-1"])]


@case("the value is not valid YAML text (unacceptable character #xdcff")
def override_value_of_undecodable_bytes(tmp):
    # a shell argument holding the byte 0xff arrives in Python as the lone surrogate U+DCFF
    return ["erase", RL, "method.optimizer=\udcff", "-o", tmp / "out", *FAST]


@case("unknown hyperparameter of method 'random_label' '\\udcff'")
def override_key_of_undecodable_bytes(tmp):
    return ["erase", RL, "method.\udcff=1", "-o", tmp / "out", *FAST]


def test_mixed_precision_no_is_accepted(tmp_path, capsys):
    """`train.mixed_precision=no` arrives as YAML false: it is the string "no", on the command line and in a
    recipe file alike; other booleans elsewhere stay refused."""
    from unlearn.recipe import load_recipe

    assert load_recipe(RL, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_recipe(RL, ["train.mixed_precision=No"]).train.mixed_precision == "no"
    path = tmp_path / "recipe.yaml"
    retrain = Path(RL).with_name("retrain.yaml")  # the copy names its reference where it is
    path.write_text(Path(RL).read_text().replace("reference: retrain.yaml", f"reference: {retrain}"))
    path.write_text(path.read_text() + "\ntrain: {mixed_precision: no}\n")
    assert load_recipe(path).train.mixed_precision == "no"
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    with pytest.raises(UnlearnError, match="must be str"):
        load_recipe(RL, ["eval.fid_features=no"])


def test_every_numeric_method_field_has_a_range():
    """Every int or float hyperparameter of every method declares its range (or takes the one its name
    implies), so that `unlearn check` refuses what the method cannot run; the few fields any finite value suits
    are listed here."""
    import dataclasses

    from unlearn.methods import METHODS
    from unlearn.methods.base import field_rule

    any_value = {"feedback_threshold"}  # a logit threshold: any real number
    missing = [
        f"{cls.__name__}.{f.name}"
        for classes in METHODS.values()
        for cls in classes
        for f in dataclasses.fields(cls)
        if any(t in str(f.type) for t in ("int", "float")) and not field_rule(f) and f.name not in any_value
    ]
    assert not missing, f"fields without a range: {missing}"


def test_every_shipped_recipe_and_suite_passes_check(capsys):
    files = sorted(str(p) for p in RECIPES.rglob("*.yaml")) + sorted(
        str(p) for p in (ROOT / "evals").glob("*.yaml")
    )
    assert main(["check", *files]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- files


def _world_classifier() -> Path:
    """The digits world's classifier folder (built by the `digits_world` fixture)."""
    from unlearn.worlds.digits import classifier_path

    return Path(classifier_path(verbose=False))


def _world_state() -> dict:
    from safetensors.torch import load_file

    return load_file(str(_world_classifier() / "model.safetensors"))


def _erase_checkpoint(tmp: Path, checkpoint, *extra) -> list:
    return ["erase", RL, "--checkpoint", checkpoint, "--arch", "digits_cnn", "-o", tmp / "out", *FAST, *extra]


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _model_folder(tmp: Path, **changes) -> Path:
    """A copy of the world classifier's model folder with `changes` to its unlearn_model.json (None: drop)."""
    import json
    import shutil

    folder = tmp / "model"
    shutil.copytree(_world_classifier(), folder)
    config = json.loads((folder / "unlearn_model.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "unlearn_model.json").write_text(json.dumps(config))
    return folder


def _tiny_vit(folder: Path, **changes) -> Path:
    """A transformers ViT folder with `changes` written into its config.json."""
    import json

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=10,
    )
    ViTForImageClassification(config).save_pretrained(str(folder))
    spec = json.loads((folder / "config.json").read_text())
    spec.update(changes)
    (folder / "config.json").write_text(json.dumps(spec))
    return folder


def _run_folder(tmp: Path, metrics: bytes | None = None, recipe: bytes | None = None) -> Path:
    """A finished-looking run folder of the fast digits recipe: recipe.yaml, model/, and `metrics`."""
    import shutil

    import yaml

    from unlearn.recipe import load_recipe

    run = tmp / "run"
    run.mkdir()
    shutil.copytree(_world_classifier(), run / "model")
    resolved = load_recipe(RL, FAST).to_dict()
    (run / "recipe.yaml").write_bytes(recipe if recipe is not None else yaml.safe_dump(resolved).encode())
    if metrics is not None:
        (run / "metrics.json").write_bytes(metrics)
    _write_finished_record(run)
    return run


def _write_finished_record(run: Path) -> None:
    """A run.json that says the run in `run` finished (`unlearn eval` and `attack` read only finished runs)."""
    record = '{"recipe": "0", "checkpoint": "world:digits", "segments": [], "complete": true}'
    (run / "run.json").write_text(record)


def _image_folder(tmp: Path) -> Path:
    """train/ and test/ with two classes of two 4x4 PNGs each."""
    import numpy as np
    from PIL import Image

    root = tmp / "images"
    for split in ("train", "test"):
        for cls, value in (("a", 10), ("b", 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = np.full((4, 4), value + i, dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / cls / f"{i}.png")
    return root


def _erase_images(tmp: Path, root: Path) -> list:
    images = ["data.dataset=imagefolder", f"data.root={root}", "data.forget_class=[0]"]
    return ["erase", RL, "-o", tmp / "out", *FAST, *images]


@case("is not a torch file")
def garbage_pt(tmp):
    return _erase_checkpoint(tmp, _write(tmp / "garbage.pt", bytes(range(7, 250, 3)) * 5))


@case("corrupt")
def garbage_pickle_pth(tmp):
    # starts like a pickle (protocol 2), then nonsense: the weights-only unpickler fails inside
    return _erase_checkpoint(tmp, _write(tmp / "garbage.pth", b"\x80\x02" + b"hello world" * 10))


@case("corrupt, truncated or not a torch file")
def zip_not_torch_bin(tmp):
    import zipfile

    with zipfile.ZipFile(tmp / "weights.bin", "w") as archive:
        archive.writestr("notes.txt", "not a tensor")
    return _erase_checkpoint(tmp, tmp / "weights.bin")


@case("is an empty file")
def empty_checkpoint(tmp):
    return _erase_checkpoint(tmp, _write(tmp / "empty.safetensors", b""))


@case("not a readable safetensors file")
def truncated_safetensors(tmp):
    data = (_world_classifier() / "model.safetensors").read_bytes()
    return _erase_checkpoint(tmp, _write(tmp / "half.safetensors", data[: len(data) // 2]))


@case("not a readable safetensors file")
def huge_safetensors_header(tmp):
    # declares a 1 TB header: refused by its size, never allocated
    return _erase_checkpoint(tmp, _write(tmp / "huge.safetensors", (10**12).to_bytes(8, "little") + b"{}"))


@case("does not hold a state dict of tensors")
def list_in_pt(tmp):
    import torch

    torch.save([1, 2, 3], tmp / "list.pt")
    return _erase_checkpoint(tmp, tmp / "list.pt")


@case("does not hold a state dict of tensors")
def int_in_pt(tmp):
    import torch

    torch.save(7, tmp / "int.pt")
    return _erase_checkpoint(tmp, tmp / "int.pt")


@case("holds NaN values in body.0.weight")
def nan_weights(tmp):
    from safetensors.torch import save_file

    state = _world_state()
    state["body.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp / "nan.safetensors"))
    return _erase_checkpoint(tmp, tmp / "nan.safetensors")


@case("holds infinite values in fc.bias")
def inf_weights_pt(tmp):
    import torch

    state = _world_state()
    state["fc.bias"][3] = float("inf")
    torch.save(state, tmp / "inf.pt")
    return _erase_checkpoint(tmp, tmp / "inf.pt")


@case("holds NaN values in body.1.running_var")
def eval_nan_model(tmp):
    from safetensors.torch import save_file

    run = _run_folder(tmp)
    state = _world_state()
    state["body.1.running_var"][:] = float("nan")
    save_file(state, str(run / "model" / "model.safetensors"))
    return ["eval", run]


@case("does not fit the architecture")
def weights_of_another_arch(tmp):
    weights = _world_classifier() / "model.safetensors"
    return ["erase", RL, "--checkpoint", weights, "--arch", "digits_mlp", "-o", tmp / "out", *FAST]


@case("fc.bias has shape (5,), the model expects (10,)")
def weights_of_wrong_shape(tmp):
    from safetensors.torch import save_file

    state = _world_state()
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:5].clone(), state["fc.bias"][:5].clone()
    save_file(state, str(tmp / "five.safetensors"))
    return _erase_checkpoint(tmp, tmp / "five.safetensors")


@case("neither a transformers model folder")
def folder_named_safetensors(tmp):
    (tmp / "model.safetensors").mkdir()
    return _erase_checkpoint(tmp, tmp / "model.safetensors")


@case("is a FIFO, not a regular file", script=True, timeout=60)
def fifo_checkpoint(tmp):
    import os

    os.mkfifo(tmp / "weights.pt")
    return _erase_checkpoint(tmp, tmp / "weights.pt")


@case("model.checkpoint '{tmp}/weights.pt' is a FIFO, not a regular file", script=True, timeout=60)
def check_a_recipe_whose_checkpoint_is_a_fifo(tmp):
    import os

    import yaml

    os.mkfifo(tmp / "weights.pt")
    raw = yaml.safe_load(Path(RL).read_text())
    raw["model"].update(checkpoint=str(tmp / "weights.pt"), arch="digits_cnn")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return ["check", tmp / "recipe.yaml"]


@case("is a device, not a regular file", script=True, timeout=60)
def device_checkpoint(tmp):
    return _erase_checkpoint(tmp, "/dev/zero")


@case("is a FIFO, not a regular file", script=True, timeout=60)
def fifo_recipe(tmp):
    import os

    os.mkfifo(tmp / "recipe.yaml")
    return ["erase", tmp / "recipe.yaml", "-o", tmp / "out", *FAST]


@case("is a device, not a regular file", script=True, timeout=60)
def device_recipe_check(tmp):
    return ["check", "/dev/zero"]


@case("is a folder")
def folder_recipe(tmp):
    (tmp / "recipe.yaml").mkdir()
    return ["erase", tmp / "recipe.yaml", "-o", tmp / "out", *FAST]


@case("not a regular file", script=True, timeout=60)
def fifo_in_transformers_folder(tmp):
    import os

    folder = _tiny_vit(tmp / "vit")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    return _erase_checkpoint(tmp, folder)


@case("num_classes must be a positive integer")
def model_json_without_num_classes(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, num_classes=None))


@case("mean must be a list of finite numbers")
def model_json_mean_abc(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, mean="abc"))


@case("std must be a list of positive numbers")
def model_json_std_zero(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, std=[0.0]))


@case("gives 3 mean values for a model of 1 input channels")
def model_json_mean_per_channel(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, mean=[0.1, 0.2, 0.3]))


@case("channels must be a positive integer or null")
def model_json_channels_string(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, channels="one"))


@case("arch must be an architecture name")
def model_json_arch_number(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, arch=5))


@case("must be a JSON object")
def model_json_list(tmp):
    folder = _model_folder(tmp)
    (folder / "unlearn_model.json").write_text("[1, 2]")
    return _erase_checkpoint(tmp, folder)


@case("is not valid JSON")
def model_json_garbage(tmp):
    folder = _model_folder(tmp)
    (folder / "unlearn_model.json").write_bytes(b"{\xff not json")
    return _erase_checkpoint(tmp, folder)


@case("nests its JSON too deeply")
def model_json_nested_too_deeply(tmp):
    folder = _model_folder(tmp)
    (folder / "unlearn_model.json").write_text("[" * 100_000 + "]" * 100_000)
    return _erase_checkpoint(tmp, folder)


@case("outside the model folder; a model folder may only read its own files")
def model_json_weights_parent(tmp):
    _write(tmp / "elsewhere.safetensors", (_world_classifier() / "model.safetensors").read_bytes())
    return _erase_checkpoint(tmp, _model_folder(tmp, weights="../elsewhere.safetensors"))


@case("outside the model folder; a model folder may only read its own files")
def model_json_weights_absolute(tmp):
    return _erase_checkpoint(tmp, _model_folder(tmp, weights=str(_world_classifier() / "model.safetensors")))


@case("is a symlink that leads outside the model folder")
def model_json_weights_symlink(tmp):
    folder = _model_folder(tmp, weights="linked.safetensors")
    (folder / "linked.safetensors").symlink_to(_world_classifier() / "model.safetensors")
    return _erase_checkpoint(tmp, folder)


@case("hidden_size")
def transformers_config_wrong_type(tmp):
    return _erase_checkpoint(tmp, _tiny_vit(tmp / "vit", hidden_size="big"))


@case("model type `vitt`")
def transformers_config_unknown_model_type(tmp):
    return _erase_checkpoint(tmp, _tiny_vit(tmp / "vit", model_type="vitt"))


@case("cannot load transformers image classifier")
def transformers_config_id2label_number(tmp):
    return _erase_checkpoint(tmp, _tiny_vit(tmp / "vit", id2label=5))


@case("cannot be read")
def image_folder_with_a_broken_png(tmp):
    root = _image_folder(tmp)
    _write(root / "train" / "a" / "broken.png", b"\x89PNG\r\n\x1a\n but not an image")
    return _erase_images(tmp, root)


@case("is not an image file")
def image_folder_with_a_text_file(tmp):
    root = _image_folder(tmp)
    _write(root / "train" / "b" / "notes.txt", b"the b images")
    return _erase_images(tmp, root)


@case("not a regular file", script=True, timeout=60)
def image_folder_with_a_fifo(tmp):
    import os

    root = _image_folder(tmp)
    os.mkfifo(root / "train" / "a" / "2.png")
    return _erase_images(tmp, root)


@case("exceeds limit of")
def image_folder_with_a_decompression_bomb(tmp):
    import struct
    import zlib

    from PIL import Image

    root = _image_folder(tmp)
    Image.new("L", (1, 1)).save(tmp / "one.png")
    data = bytearray((tmp / "one.png").read_bytes())
    # IHDR (bytes 12-29: type, width, height, ...): declare 40000 x 40000 pixels, a 1.6 GB image from 70 bytes
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    _write(root / "train" / "a" / "bomb.png", bytes(data))
    return _erase_images(tmp, root)


@case("is a symlink that loops back to a folder that contains it")
def image_folder_with_a_symlink_loop(tmp):
    root = _image_folder(tmp)
    (root / "train" / "a" / "again").symlink_to(root / "train")
    return _erase_images(tmp, root)


@case("is a symlink that leads outside the image folder")
def image_folder_with_a_symlink_outside(tmp):
    root = _image_folder(tmp)
    (root / "train" / "a" / "system").symlink_to("/usr")
    return _erase_images(tmp, root)


@case("of dataset cifar10 is not a regular file", script=True, timeout=60)
def cifar_folder_with_a_fifo(tmp):
    import os

    (tmp / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    os.mkfifo(tmp / "cifar" / "cifar-10-batches-py" / "data_batch_1")
    return ["erase", RL, "-o", tmp / "out", *FAST, "data.dataset=cifar10", f"data.root={tmp / 'cifar'}"]


@case("holds no images")
def image_folder_empty(tmp):
    (tmp / "images" / "train").mkdir(parents=True)
    (tmp / "images" / "test").mkdir()
    return _erase_images(tmp, tmp / "images")


@case("holds no images")
def image_folder_empty_classes(tmp):
    for split in ("train", "test"):
        (tmp / "images" / split / "a").mkdir(parents=True)
    return _erase_images(tmp, tmp / "images")


@case("is corrupt")
def reference_metrics_garbage(tmp):
    _write(tmp / "ref" / "metrics.json", b'{"UA": 1.0, ')
    return ["erase", RL, "-o", tmp / "out", *FAST, f"eval.reference={tmp / 'ref'}"]


@case("is not a mapping of metric names to numbers")
def reference_metrics_not_a_mapping(tmp):
    _write(tmp / "ref" / "metrics.json", b"[1, 2, 3]")
    return ["erase", RL, "-o", tmp / "out", *FAST, f"eval.reference={tmp / 'ref'}"]


@case("is corrupt")
def eval_metrics_garbage(tmp):
    return ["eval", _run_folder(tmp, metrics=b"\x00\x01 garbage")]


@case("is not a mapping of metric names to numbers")
def eval_metrics_not_a_mapping(tmp):
    return ["eval", _run_folder(tmp, metrics=b'"UA"')]


@case("recipe.yaml' is not valid YAML")
def eval_recipe_garbage(tmp):
    return ["eval", _run_folder(tmp, metrics=b"{}", recipe=b"method: [unclosed\n")]


@case("must be a YAML mapping")
def eval_recipe_not_a_mapping(tmp):
    return ["eval", _run_folder(tmp, recipe=b"- a list\n")]


@case("run.json' is corrupt")
def rerun_into_corrupt_run_json(tmp):
    _write(tmp / "out" / "run.json", b'{"recipe": "abc", "segm')
    _write(tmp / "out" / "recipe.yaml", b"method: random_label\n")
    return ["erase", RL, "-o", tmp / "out", *FAST]


@case("segments must be a list")
def rerun_into_run_json_of_wrong_types(tmp):
    import json

    record = {"recipe": "x", "checkpoint": "world:digits", "segments": "many", "complete": True}
    _write(tmp / "out" / "run.json", json.dumps(record).encode())
    return ["erase", RL, "-o", tmp / "out", *FAST]


@case("metrics.json' of run folder")
def rerun_into_complete_folder_with_corrupt_metrics(tmp):
    import json

    from unlearn.recipe import load_recipe
    from unlearn.runfolder import recipe_fingerprint

    recipe = load_recipe(RL, FAST)
    record = {
        "recipe": recipe_fingerprint(recipe.to_dict()),
        "checkpoint": "world:digits",
        "segments": [{"started": 1.0, "seconds": 2.0}],
        "complete": True,
    }
    _write(tmp / "out" / "run.json", json.dumps(record).encode())
    _write(tmp / "out" / "metrics.json", b"{{{")
    _write(tmp / "out" / "recipe.yaml", b"method: random_label\n")
    _write(tmp / "out" / "report.md", b"# report\n")
    _write(tmp / "out" / "model" / "model.safetensors", b"weights")
    return ["erase", RL, "-o", tmp / "out", *FAST]


@case("holds fc.weight as a torch.sparse_coo tensor")
def sparse_weights(tmp):
    import torch

    state = _world_state()
    state["fc.weight"] = state["fc.weight"].to_sparse()
    torch.save(state, tmp / "sparse.pt")
    return _erase_checkpoint(tmp, tmp / "sparse.pt")


@case("holds fc.weight as torch.int64, the model expects floating-point weights")
def integer_weights(tmp):
    import torch
    from safetensors.torch import save_file

    state = _world_state()
    state["fc.weight"] = state["fc.weight"].to(torch.int64)
    save_file(state, str(tmp / "int.safetensors"))
    return _erase_checkpoint(tmp, tmp / "int.safetensors")


@case("is corrupt or holds pickled objects beyond plain tensors")
def library_garbage_pickle(tmp):
    from unlearn.checkpoints import load_state_dict

    path = _write(tmp / "junk.pt", b"\x80\x02" + bytes(range(40, 200)))
    return lambda: load_state_dict(path)


@case("holds 'generator.safetensors', which is not a regular file")
def library_gan_folder_with_a_fifo(tmp):
    import os

    from unlearn.models.gan import build_gan, load_gan

    build_gan("dcgan_digits").save(tmp / "gan")
    (tmp / "gan" / "generator.safetensors").unlink()
    os.mkfifo(tmp / "gan" / "generator.safetensors")
    return lambda: load_gan(tmp / "gan")


def _tiny_ddpm(tmp: Path) -> Path:
    from tiny_diffusion import tiny_ddpm_pipeline  # tests/ is on sys.path, as for the other test modules

    tiny_ddpm_pipeline(tmp / "ddpm")
    return tmp / "ddpm"


@case("holds NaN values in")
def library_diffusion_nan_unet(tmp):
    from safetensors.torch import load_file, save_file

    from unlearn.models.diffusion import load_diffusion

    file = _tiny_ddpm(tmp) / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    name = sorted(key for key, value in state.items() if value.is_floating_point())[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(file))
    return lambda: load_diffusion(tmp / "ddpm")


@case("sample_size must be a positive integer")
def library_diffusion_mistyped_unet_config(tmp):
    import json

    from unlearn.models.diffusion import load_diffusion

    config = _tiny_ddpm(tmp) / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": "x"}))
    return lambda: load_diffusion(tmp / "ddpm")


@case("model_index.json' is not a JSON mapping")
def library_diffusion_model_index_list(tmp):
    from unlearn.models.diffusion import load_diffusion

    (_tiny_ddpm(tmp) / "model_index.json").write_text("[1, 2]")
    return lambda: load_diffusion(tmp / "ddpm")


# ------------------------------------------------------------------------------------------------- paths

SUITE = str(ROOT / "evals" / "digits_classwise.yaml")


def erase_into(output, *extra) -> list:
    return ["erase", RL, "-o", output, *FAST, *extra]


def fake_model(folder: Path) -> Path:
    """A model folder (refused by path before anything loads it)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@case("is a file, not a folder")
def output_is_a_file(tmp):
    (tmp / "out").write_text("mine")
    return erase_into(tmp / "out")


@case("cannot be a folder")
def output_parent_is_a_file(tmp):
    (tmp / "out").write_text("mine")
    return erase_into(tmp / "out" / "run")


@case("is a symlink loop")
def output_symlink_loop(tmp):
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return erase_into(tmp / "a")


@case("is a symlink loop")
def output_below_a_symlink_loop(tmp):
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return erase_into(tmp / "a" / "run")


@case("which does not exist")
def output_dangling_symlink(tmp):
    (tmp / "out").symlink_to(tmp / "nowhere")
    return erase_into(tmp / "out")


@case("holds a run of another recipe")
def output_symlink_to_a_run_of_another_recipe(tmp):
    other = tmp / "other"
    other.mkdir()
    (other / "recipe.yaml").write_text("method: {name: retrain, epochs: 3}\nseed: 0\n")
    (other / "run.json").write_text(
        '{"recipe": "0000", "checkpoint": "world:digits", "segments": [{"started": 1.0, "seconds": 2.0}], '
        '"complete": true}'
    )
    (other / "metrics.json").write_text('{"UA": 1.0}')
    (tmp / "out").symlink_to(other)
    return erase_into(tmp / "out")


@case("is too long")
def output_name_over_255_bytes(tmp):
    return erase_into(tmp / ("ø" * 130))  # 260 bytes in UTF-8


@case("is too long")
def output_path_over_path_max(tmp):
    return erase_into(tmp.joinpath(*["d" * 250] * 20))


@case("permission denied")
def output_in_a_read_only_folder(tmp):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into a chmod 555 folder; see test_output_on_a_read_only_file_system")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return erase_into(tmp / "ro" / "run")


@case("inside the input model folder")
def output_inside_the_input_model_folder(tmp):
    model = fake_model(tmp / "model")
    return erase_into(model / "run", "--checkpoint", model)


@case("inside the input model folder")
def output_inside_the_input_model_folder_through_a_symlink(tmp):
    model = fake_model(tmp / "model")
    (tmp / "link").symlink_to(model)
    return erase_into(tmp / "link" / "run", "--checkpoint", model)


@case("inside the input model folder")
def output_inside_the_input_model_folder_spelled_relative(tmp):
    import os

    model = Path(os.path.relpath(fake_model(tmp / "model")))
    return erase_into(f"{model}/../model/./run", "--checkpoint", f"./{model}")


@case("inside the data folder")
def output_inside_the_data_folder(tmp):
    (tmp / "data").mkdir()
    return erase_into(tmp / "data" / "run", f"data.root={tmp / 'data'}")


@case("holds the input checkpoint")
def output_is_the_folder_of_the_checkpoint_file(tmp):
    model = fake_model(tmp / "model")
    return erase_into(model, "--checkpoint", model / "model.safetensors", "--arch", "digits_cnn")


@case("holds the input checkpoint")
def output_above_the_input_model_folder(tmp):
    model = fake_model(tmp / "deep" / "model")
    return erase_into(tmp, "--checkpoint", model)


@case("is the input checkpoint")
def output_is_the_checkpoint_file(tmp):
    model = fake_model(tmp / "model")
    return erase_into(model / "model.safetensors", "--checkpoint", model / "model.safetensors")


@case("is not empty and holds no run.json", script=True)
def output_is_the_current_folder(tmp):
    return erase_into(".")  # run in the project's root


@case("is not empty and holds no run.json")
def output_is_the_root_folder(tmp):
    return erase_into("/")


@case("is not empty and holds no run.json")
def output_is_the_home_folder(tmp):
    home = Path.home()
    if not home.is_dir() or not any(home.iterdir()):
        pytest.skip(f"the home folder {home} is empty or missing")
    return erase_into(home)


@case("is not empty and holds no run.json")
def output_holding_only_hidden_files(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / ".bashrc").write_text("mine")
    return erase_into(tmp / "out")


@case("is a folder where the run writes a file")
def output_lock_is_a_folder(tmp):
    (tmp / "out" / ".lock").mkdir(parents=True)
    return erase_into(tmp / "out")


@case("is a symlink; a run writes only its own files")
def output_lock_is_a_symlink_out_of_the_folder(tmp):
    (tmp / "outside.txt").write_text("not yours")
    (tmp / "out").mkdir()
    (tmp / "out" / ".lock").symlink_to(tmp / "outside.txt")
    return erase_into(tmp / "out")


@case("is a symlink; a run writes only its own files")
def output_run_log_is_a_symlink_out_of_the_folder(tmp):
    (tmp / "outside.txt").write_text("not yours")
    (tmp / "out").mkdir()
    (tmp / "out" / "run.log").symlink_to(tmp / "outside.txt")
    return erase_into(tmp / "out")


@case("not a regular file")
def output_lock_is_a_fifo(tmp):
    import os

    (tmp / "out").mkdir()
    os.mkfifo(tmp / "out" / ".lock")
    return erase_into(tmp / "out")


@case("is not valid UTF-8")
def checkpoint_path_with_undecodable_bytes(tmp):
    import os

    model = fake_model(Path(os.fsdecode(bytes(tmp) + b"/m\xffdel")))
    return erase_into(tmp / "run", "--checkpoint", model)


@case("output must be a folder path")
def recipe_output_that_is_not_a_string(tmp):
    return ["erase", RL, *FAST, "output=[1, 2]"]


@case("is a file, not a folder")
def bench_output_is_a_file(tmp):
    (tmp / "out").write_text("mine")
    return ["bench", SUITE, "-o", tmp / "out"]


@case("is a symlink loop")
def bench_output_symlink_loop(tmp):
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return ["bench", SUITE, "-o", tmp / "a"]


@case("holds no bench results")
def bench_output_is_a_folder_of_other_files(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return ["bench", SUITE, "-o", tmp / "out"]


def assert_refused(argv: list, capsys, phrase: str) -> None:
    code, err = run_cli(argv, capsys, script=False, timeout=120)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len([line for line in lines if "error:" in line]) == 1, err
    assert phrase in lines[-1], lines[-1]


def test_output_on_a_read_only_file_system(tmp_path, capsys, digits_world, one_thread):
    """A read-only tmpfs (root only: `mount` is refused otherwise), as a new folder and as an existing one."""
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    try:
        assert_refused(erase_into(mount / "run"), capsys, "read-only file system")
        assert_refused(erase_into(mount), capsys, "read-only file system")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_output_in_an_immutable_folder(tmp_path, capsys, digits_world, one_thread):
    """`chattr +i` (root on a file system that has it): new files and folders in it are refused."""
    folder = tmp_path / "frozen"
    folder.mkdir()
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot make a folder immutable here: {made.stderr.decode().strip()}")
    try:
        assert_refused(erase_into(folder / "run"), capsys, "permission denied")
        assert_refused(erase_into(folder), capsys, "permission denied")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("concept", ["../../etc/x", "AC/DC", "z" * 300, "ø" * 200, "a\x00b"])
def test_default_output_is_one_folder_under_runs(concept):
    """Without -o, a concept spelled as a path (or too long for a name) still names one folder under runs/."""
    from unlearn.pipeline import default_output
    from unlearn.recipe import load_recipe

    recipe = load_recipe(T2I_UCE)
    recipe.data.concept = concept
    output = default_output(recipe)
    assert output.parent == Path("runs") and not output.name.startswith(".")
    assert len(output.name.encode()) <= 255


def test_emoji_paths_work(tmp_path, capsys, digits_world, one_thread):
    """A checkpoint and an output folder named with non-ASCII characters (an emoji is outside the BMP) run
    through: the recipe records the checkpoint path exactly, and the run folder is written."""
    import shutil

    from unlearn.recipe import load_recipe

    model = tmp_path / "mødel-🙂"
    shutil.copytree(digits_world["classifier"], model)
    out = tmp_path / "rün-🙂"
    code, err = run_cli(erase_into(out, "--checkpoint", model), capsys, script=False, timeout=120)
    assert code == 0, err
    assert (out / "metrics.json").is_file()
    assert load_recipe(out / "recipe.yaml").model.checkpoint == str(model)


# ----------------------------------------------------------------------------------------- amplification


def alias_bomb(levels: int = 9, head: str = "") -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels strings ("billion laughs")."""
    lines = [head.rstrip("\n")] if head else []
    lines.append('l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]')
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def bomb_recipe(tmp: Path) -> Path:
    """A digits recipe that hides a 9**8-string value in `method.epochs`: loaded naively it takes a gigabyte."""
    path = tmp / "bomb.yaml"
    text = alias_bomb(8, "data: {forget_class: [3]}")
    path.write_text(text + "method: {name: random_label, epochs: *l7}\n")
    assert len(path.read_bytes()) < 1000
    return path


@case("expands to more than")
def erase_alias_bomb_recipe(tmp):
    return ["erase", bomb_recipe(tmp), "-o", tmp / "run"]


@case("expands to more than")
def check_alias_bomb_recipe(tmp):
    return ["check", bomb_recipe(tmp)]


@case("expands to more than")
def erase_alias_bomb_override(tmp):
    bomb = (
        "["
        + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 10) + "]" for i in range(6))
        + "]"
    )
    return ["erase", RL, "-o", tmp / "run", f"method.lr={bomb}"]


@case("expands to more than")
def check_alias_bomb_of_long_strings(tmp):
    path = tmp / "long.yaml"
    text = "x: &x " + "a" * 100_000 + "\ny: [" + ", ".join(["*x"] * 100) + "]\n"  # 10 MB of text from 110 kB
    path.write_text("method: random_label\ndata: {forget_class: [3]}\n" + text)
    return ["check", path]


@case("expands to more than")
def check_alias_bomb_suite(tmp):
    path = tmp / "suite.yaml"
    path.write_text(Path(SUITE).read_text() + alias_bomb(9))
    return ["check", path]


@case("expands to more than")
def bench_alias_bomb_suite(tmp):
    path = tmp / "suite.yaml"
    path.write_text(Path(SUITE).read_text() + alias_bomb(9))
    return ["bench", path, "-o", tmp / "bench"]


@case("expands to more than")
def eval_run_folder_with_an_alias_bomb_recipe(tmp):
    run = fake_model(tmp / "run" / "model").parent
    (run / "recipe.yaml").write_text(bomb_recipe(tmp).read_text())
    _write_finished_record(run)
    return ["eval", run]


@case("holds a run of another recipe (its recipe.yaml is unreadable)")
def output_folder_whose_recipe_is_an_alias_bomb(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text(alias_bomb(9) + "method: {name: retrain}\n")
    (out / "run.json").write_text(
        '{"recipe": "0000", "checkpoint": "world:digits", "segments": [{"started": 1.0, "seconds": 2.0}], '
        '"complete": true}'
    )
    (out / "metrics.json").write_text('{"UA": 1.0}')
    return ["erase", RL, "-o", out, *FAST]


@case("contains itself through a YAML alias")
def check_recipe_that_contains_itself(tmp):
    path = tmp / "loop.yaml"
    path.write_text("method: &m {name: random_label, again: *m}\ndata: {forget_class: [3]}\n")
    return ["check", path]


@case("is larger than 1,000,000 bytes")
def check_recipe_over_a_megabyte(tmp):
    path = tmp / "big.yaml"
    path.write_text("method: random_label\ndata: {forget_class: [3]}\n# " + "x" * 1_100_000 + "\n")
    return ["check", path]


@case("nests its lists and mappings too deeply")
def check_recipe_nested_too_deeply(tmp):
    path = tmp / "deep.yaml"
    path.write_text("method: " + "[" * 50_000 + "]" * 50_000 + "\n")
    return ["check", path]


@case("is not UTF-8 text")
def check_recipe_that_is_binary(tmp):
    path = tmp / "binary.yaml"
    path.write_bytes(b"method: \xff\xfe random_label\n")
    return ["check", path]


def test_alias_bomb_is_refused_in_well_under_a_second(tmp_path):
    import time

    from unlearn.recipe import load_recipe

    path = tmp_path / "bomb.yaml"
    path.write_text(
        alias_bomb(12, "data: {forget_class: [3]}") + "method: {name: random_label, epochs: *l11}\n"
    )
    started = time.perf_counter()
    with pytest.raises(UnlearnError, match="expands to more than"):
        load_recipe(path)
    assert time.perf_counter() - started < 0.5


def test_aliases_within_the_bounds_still_work(tmp_path):
    """A recipe that shares a value through an alias, as YAML users do, loads as before."""
    from unlearn.recipe import load_recipe

    path = tmp_path / "shared.yaml"
    path.write_text(
        "method: {name: random_label, epochs: &n 2, batch_size: 32}\ndata: {forget_class: &c [3]}\n"
        "eval: {batch_size: 64}\nmodel: {checkpoint: 'world:digits'}\nseed: *n\n"
    )
    recipe = load_recipe(path)
    assert recipe.method_args["epochs"] == 2 and recipe.seed == 2


# ------------------------------------------------------------------------------------------------ faults
# A full disk, a read-only folder, a kill or a SIGTERM while a run writes; a run folder deleted under a run; a
# multi-process launch whose batch does not split. Faults are injected at the Nth write of one file name
# (`_fail_writes`), or by killing a child process in the middle of that write (`_KILLER`).


def _fail_writes(patch, name: str, error: BaseException, nth: int = 1) -> None:
    """Make the `nth` write of a file called `name` raise `error`, through every low-level writer the outputs
    use: `Path.write_text` (JSON, reports), `torch.save` (training checkpoints) and safetensors' `save_file`
    (models), each of which first writes part of the file, as a full disk does."""
    import os

    import safetensors.torch
    import torch

    seen = [0]

    def hit(target) -> bool:
        if os.path.basename(str(target)) != name:
            return False
        seen[0] += 1
        if seen[0] == nth:
            Path(target).write_bytes(b"PK\x03\x04 half a file")  # what a writer leaves when the disk fills
            return True
        return False

    write_text, save, save_file = Path.write_text, torch.save, safetensors.torch.save_file

    def patched_write_text(self, *args, **kwargs):
        if hit(self):
            raise error
        return write_text(self, *args, **kwargs)

    def patched_save(obj, f, *args, **kwargs):
        if hit(f):
            raise error
        return save(obj, f, *args, **kwargs)

    def patched_save_file(tensors, filename, *args, **kwargs):
        if hit(filename):
            raise error
        return save_file(tensors, filename, *args, **kwargs)

    patch.setattr(Path, "write_text", patched_write_text)
    patch.setattr(torch, "save", patched_save)
    patch.setattr(safetensors.torch, "save_file", patched_save_file)


def _disk_full(patch) -> None:
    """os.statvfs says the file system is full (what torch's zip writer met, as it gives no errno)."""
    import os

    statvfs = os.statvfs

    class Full:
        def __init__(self, real):
            self.f_frsize, self.f_bavail = real.f_frsize, 0

    patch.setattr(os, "statvfs", lambda path: Full(statvfs(path)))


def _enospc():
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _run_with_fault(out: Path, name: str, error: BaseException, nth: int = 1, full: bool = False, extra=()):
    """A library case: the FAST run into `out`, its `nth` write of `name` failing with `error`."""
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    def attempt():
        with pytest.MonkeyPatch.context() as patch:
            _fail_writes(patch, name, error, nth)
            if full:
                _disk_full(patch)
            run(load_recipe(RL, [*FAST, *extra]), out, log=lambda message: None)

    return attempt


def _temporaries(folder: Path) -> list[str]:
    """Hidden entries an atomic write left (the folder's lock file aside)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".lock")


@case("no space left on")
def full_disk_while_the_run_folder_is_recorded(tmp):
    return _run_with_fault(tmp / "run", "run.json", _enospc())


@case("read-only file system")
def read_only_file_system_while_the_recipe_is_written(tmp):
    import errno
    import os

    return _run_with_fault(tmp / "run", "recipe.yaml", OSError(errno.EROFS, os.strerror(errno.EROFS)))


@case("no space left on", slow=True)
def full_disk_while_the_report_is_written(tmp):
    return _run_with_fault(tmp / "run", "report.md", _enospc())


@case("permission denied", slow=True)
def permission_denied_while_the_model_is_written(tmp):
    from safetensors import SafetensorError

    return _run_with_fault(
        tmp / "run", "model.safetensors", SafetensorError("I/O error: Permission denied (os error 13)")
    )


def test_full_disk_at_a_training_checkpoint_keeps_the_last_one_and_resumes(
    tmp_path, capsys, monkeypatch, digits_world, one_thread
):
    """torch.save's zip writer fails on a full disk with `[enforce fail at inline_container.cc]` and no errno:
    one sentence naming the file system, exit 2, the first checkpoint kept as it was, no temporary left, and
    the rerun resumes after it."""
    import torch

    out = tmp_path / "run"
    argv = ["erase", RL, *FAST, "method.epochs=2", "-o", str(out)]
    with monkeypatch.context() as patch:
        failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        _fail_writes(patch, "state.pt", failure, nth=2)
        _disk_full(patch)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no space left on the file system mounted at" in err and "state.pt" in err, err
    assert "the last good checkpoint is kept" in err and "rerun" in err, err
    assert _temporaries(out) == [], "the failed write left its temporary"
    saved = torch.load(out / "checkpoints" / "random_label" / "state.pt", weights_only=True)
    assert saved["position"] == 1, "the last good checkpoint is the first epoch's"
    assert not json_of(out / "run.json")["complete"] and not (out / "metrics.json").exists()

    assert main(argv) == 0
    log = (out / "run.log").read_text()
    assert "continuing the interrupted run" in log and "after epoch 1" in log, log
    assert json_of(out / "run.json")["complete"] and (out / "report.md").exists()
    assert not (out / "checkpoints").exists() and _temporaries(out) == []


def json_of(path: Path):
    import json

    return json.loads(path.read_text())


def _record_run(out: Path, recipe, outputs=("model", "metrics.json", "report.md")) -> None:
    """A run folder recorded complete (RunFolder alone, no training) holding `outputs`."""
    from unlearn.runfolder import RunFolder

    with RunFolder(out, recipe) as folder:
        folder.begin_segment()
        for name in outputs:
            if name == "model":
                (out / "model").mkdir()
                (out / "model" / "model.safetensors").write_bytes(b"weights")
            else:
                (out / name).write_text("{}" if name.endswith(".json") else "report\n")
        folder.finish(1.0)


def test_a_folder_recorded_complete_without_its_report_or_model_is_done_again(tmp_path):
    from unlearn.recipe import load_recipe
    from unlearn.runfolder import RunFolder

    recipe = load_recipe(RL, FAST)
    for missing in ("report.md", "model", "metrics.json"):
        out = tmp_path / missing
        _record_run(out, recipe)
        with RunFolder(out, recipe) as folder:
            assert folder.complete
        path = out / missing
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
        with RunFolder(out, recipe) as folder:
            assert not folder.complete and folder.resuming and folder.missing == [missing]
            assert folder.begin_segment() == 0.0, "a run done again from the start counts only its own time"


def test_opening_a_run_folder_removes_the_temporaries_of_killed_writes(tmp_path):
    """Only what atomic_path leaves (`.NAME.XXXXXXXX` holding at most NAME, `.NAME.old<pid>`), only with the
    lock held, never inside a nested run folder (the Retrain reference cleans its own)."""
    from unlearn.recipe import load_recipe
    from unlearn.runfolder import RunFolder

    recipe = load_recipe(RL, FAST)
    out = tmp_path / "run"
    with RunFolder(out, recipe) as folder:
        folder.begin_segment()
    stale = [
        out / ".report.md.k2j_h4g5" / "report.md",
        out / "checkpoints" / "fit" / ".state.pt.abcdefgh" / "state.pt",
        out / ".model.0123abcd" / "model" / "model.safetensors",
        out / ".model.old4242" / "model.safetensors",
    ]
    kept = [
        out / ".notes.abcdefgh" / "something-else.txt",  # holds another name: not an atomic write's
        out / ".mydata" / "x",  # no such pattern
        out / "reference" / ".report.md.abcdefgh" / "report.md",  # a nested run folder's own
    ]
    (out / "reference").mkdir()
    (out / "reference" / "run.json").write_text("{}")
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"trunc")
    (out / ".empty.report.md.12345678").mkdir()  # an empty temporary (killed before its first byte)
    with RunFolder(out, recipe) as folder:
        assert folder.resuming
    for path in stale:
        assert not path.parent.exists(), path
    assert not (out / ".empty.report.md.12345678").exists()
    for path in kept:
        assert path.exists(), path
    assert (out / "checkpoints" / "fit").is_dir()


@case("was deleted or replaced", slow=True)
def run_folder_deleted_during_training(tmp):
    import shutil

    import unlearn.pipeline
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    out = tmp / "run"
    timed = unlearn.pipeline._timed_unlearn

    def deleting(*args, **kwargs):
        result = timed(*args, **kwargs)
        shutil.rmtree(out)
        return result

    def attempt():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(unlearn.pipeline, "_timed_unlearn", deleting)
            run(load_recipe(RL, FAST), out, log=lambda message: None)

    return attempt


def test_sigterm_stops_like_ctrl_c(tmp_path, capsys, monkeypatch, digits_world, one_thread):
    """A plain `kill` (SIGTERM) during a run: "interrupted; rerun ... to resume", exit 143, the lock released,
    and the rerun resumes."""
    import os
    import signal

    from unlearn.runfolder import RunFolder

    out = tmp_path / "run"
    begin = RunFolder.begin_segment

    def killed(self):
        earlier = begin(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return earlier

    argv = ["erase", RL, *FAST, "-o", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(RunFolder, "begin_segment", killed)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
    assert code == 143 and err.splitlines()[-1].endswith("interrupted; rerun the same command to resume"), err
    assert "Traceback" not in err and not (out / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "main() must put the SIGTERM handler back"
    assert main(argv) == 0 and json_of(out / "run.json")["complete"]


def test_other_processes_of_a_launch_stay_silent(tmp_path, capsys, monkeypatch):
    """In a multi-process launch only rank 0 prints the one-line error; the others exit 2 in silence."""
    missing = str(tmp_path / "no-such-recipe.yaml")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert main(["erase", missing]) == 2
        err = capsys.readouterr().err
        assert ("error:" in err) is said, err


# Runs `unlearn` with argv[3:] in a child that SIGKILLs itself halfway through the argv[2]-th write of a file
# named argv[1] (half the bytes written to the temporary, as a kill mid-write leaves them).
_KILLER = """
import io, os, signal, sys
from pathlib import Path
import safetensors.torch, torch
name, nth = sys.argv[1], int(sys.argv[2])
seen = [0]
def hit(target, data):
    if os.path.basename(str(target)) == name:
        seen[0] += 1
        if seen[0] == nth:
            with open(target, "wb") as handle:
                handle.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
write_text, save, save_file = Path.write_text, torch.save, safetensors.torch.save_file
def patched_write_text(self, data, *args, **kwargs):
    hit(self, data.encode())
    return write_text(self, data, *args, **kwargs)
def patched_save(obj, f, *args, **kwargs):
    if os.path.basename(str(f)) == name:
        buffer = io.BytesIO()
        save(obj, buffer)
        hit(f, buffer.getvalue())
    return save(obj, f, *args, **kwargs)
Path.write_text, torch.save = patched_write_text, patched_save
from unlearn.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _killed(name: str, nth: int, argv: list) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _KILLER, name, str(nth), *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, nth, redone",
    [
        ("report.md", 1, "a kill in the middle of writing the report"),
        ("run.json", 3, "a kill after metrics.json, while run.json is marked complete"),
        ("state.pt", 2, "a kill in the middle of the second training checkpoint"),
    ],
)
def test_a_killed_write_leaves_nothing_that_looks_finished_and_the_rerun_completes(
    name, nth, redone, tmp_path, digits_world
):
    import torch

    out = tmp_path / "run"
    argv = ["erase", RL, *FAST, "method.epochs=2", "-o", out]
    killed = _killed(name, nth, argv)
    assert killed.returncode == -9, killed.stderr[-3000:]
    leftovers = _temporaries(out)
    assert any((out / p / name).is_file() for p in leftovers), (redone, leftovers)  # a truncated file
    assert not json_of(out / "run.json")["complete"], redone
    if name == "state.pt":  # the first checkpoint stays whole and loadable
        saved = torch.load(out / "checkpoints" / "random_label" / "state.pt", weights_only=True)
        assert saved["position"] == 1

    rerun = subprocess.run(
        [sys.executable, "-m", "unlearn", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already complete" not in rerun.stdout + rerun.stderr, redone
    assert _temporaries(out) == [], redone
    assert json_of(out / "run.json")["complete"] and (out / "report.md").exists() and (out / "model").is_dir()
    if name == "state.pt":
        assert "after epoch 1" in (out / "run.log").read_text()


def _small_tmpfs(folder: Path, size: str) -> Path:
    """Mount a tmpfs of `size` at `folder` (root only), or skip the test saying why."""
    import os

    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    return folder


@pytest.mark.slow
def test_a_real_full_disk_keeps_the_last_checkpoint_and_the_rerun_resumes(
    tmp_path, capsys, digits_world, one_thread
):
    """On a tmpfs with room for one training checkpoint but not for a second beside it (an atomic write needs
    both at once): one sentence, exit 2; then, with room made, the rerun resumes after the first epoch."""
    import torch

    disk = _small_tmpfs(tmp_path / "disk", "1900k")
    try:
        out = disk / "run"
        argv = ["erase", RL, *FAST, "method.epochs=2", "-o", str(out)]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"no space left on the file system mounted at {str(disk)!r}" in err, err
        assert _temporaries(out) == []
        assert (
            torch.load(out / "checkpoints" / "random_label" / "state.pt", weights_only=True)["position"] == 1
        )
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(argv) == 0
        assert "after epoch 1" in (out / "run.log").read_text()
        assert json_of(out / "run.json")["complete"] and _temporaries(out) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_batch_that_does_not_split_across_two_processes_is_said_once(tmp_path, digits_world):
    """`accelerate launch` with 2 CPU processes (gloo) and method.batch_size=63: the one-line error once (rank 0
    only), from both processes before anything runs. accelerate's launcher itself then raises
    torch's `ChildFailedError` (its own traceback, exit 1) whenever a process exits non-zero: that part is the
    launcher's, not ours."""
    import os

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
        "-m", "unlearn", "erase", RL, *FAST, "method.batch_size=63", "-o", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "unlearn erase: error:" in line]
    assert result.returncode != 0
    assert len(said) == 1 and "must be a multiple of the 2 processes" in said[0], (
        result.stdout + result.stderr
    )
    assert "exitcode  : 2" in result.stderr, "both processes exit with the user-error status"
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------- other commands
# `unlearn attack`, `eval`, `ls`, `prepare`, and attack settings. The attack cases share one finished digits
# random-label run with its Retrain reference (built once, ~20 s), copied into each case's folder.

_FINISHED: dict = {}
_HELD_LOCKS: list = []  # lock files a case holds while its command runs (closed at the module's end)


@pytest.fixture(scope="module", autouse=True)
def _finished_run_factory(tmp_path_factory):
    _FINISHED["factory"] = tmp_path_factory
    yield
    for handle in _HELD_LOCKS:
        handle.close()
    _HELD_LOCKS.clear()
    _FINISHED.clear()


def _finished_run(tmp: Path) -> Path:
    """A copy under `tmp` of a finished classifier run folder with its Retrain reference in `reference/`."""
    import shutil

    if "folder" not in _FINISHED:
        folder = _FINISHED["factory"].mktemp("attacked") / "run"
        assert main(["erase", RL, "method.epochs=1", "-o", str(folder)]) == 0
        _FINISHED["folder"] = folder
    return Path(shutil.copytree(_FINISHED["folder"], tmp / "run"))


def _attack(tmp: Path, *argv) -> list:
    return ["attack", _finished_run(tmp), *argv]


def _recipe_with_attacks(tmp: Path, attacks: list, recipe: str = RL) -> Path:
    """`recipe` copied under `tmp` with `eval.attacks`, its Retrain reference still found."""
    import yaml

    raw = yaml.safe_load(Path(recipe).read_text())
    reference = (raw.get("eval") or {}).get("reference")
    if reference:
        raw["eval"]["reference"] = str(Path(recipe).parent / reference)
    raw.setdefault("eval", {})["attacks"] = attacks
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@case("relearn.lr must be a finite number > 0, got -1")
def attack_negative_lr(tmp):
    return _attack(tmp, "--attack", "relearn", "lr=-1", "steps=2")


@case("relearn.lr must be a finite number > 0, got nan")
def attack_nan_lr(tmp):
    return _attack(tmp, "--attack", "relearn", "lr=.nan")


@case("relearn.r1_gamma must be a finite number >= 0, got inf")
def attack_infinite_r1_gamma(tmp):
    return _attack(tmp, "--attack", "relearn", "r1_gamma=.inf")


@case("relearn.steps must be an integer of at least 1, got 0")
def attack_zero_steps(tmp):
    return _attack(tmp, "--attack", "relearn", "steps=0")


@case("relearn.batch_size must be an integer of at least 2, got 1")
def attack_batch_of_one(tmp):
    return _attack(tmp, "--attack", "relearn", "batch_size=1")


@case("relearn.shots must be a non-empty list of counts of at least 0, got [0, -5]")
def attack_negative_shots(tmp):
    return _attack(tmp, "--attack", "relearn", "shots=[0, -5]")


@case("relearn.shots must be a non-empty list of counts of at least 0, got []")
def attack_no_shots(tmp):
    return _attack(tmp, "--attack", "relearn", "shots=[]")


@case("feature_probe.shots must be an integer of at least 1, got 0")
def attack_feature_probe_without_shots(tmp):
    return _attack(tmp, "--attack", "feature_probe", "shots=0")


@case("ulira.shadows must be an integer of at least 2, got 1")
def attack_ulira_one_shadow(tmp):
    return _attack(tmp, "--attack", "ulira", "shadows=1")


@case("the value is not valid YAML")
def attack_setting_of_bad_yaml(tmp):
    return _attack(tmp, "--attack", "relearn", "shots=[1")


@case("the value expands to more than")
def attack_setting_alias_bomb(tmp):
    levels = ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 10) + "]" for i in range(7))
    return _attack(tmp, "--attack", "relearn", f"shots=[{levels}]")


@case("names no attacks (its recipe has no eval.attacks); name one with --attack NAME")
def attack_a_run_that_names_none(tmp):
    return _attack(tmp)


@case("--attack relearn is given twice")
def attack_named_twice(tmp):
    return _attack(tmp, "--attack", "relearn", "--attack", "relearn")


@case("apply to exactly one --attack NAME")
def attack_settings_for_two_attacks(tmp):
    return _attack(tmp, "--attack", "relearn", "--attack", "feature_probe", "steps=2")


@case("unknown setting of attack 'relearn' 'stepz'. Did you mean steps?")
def attack_unknown_setting(tmp):
    return _attack(tmp, "--attack", "relearn", "stepz=2")


@case("attack 'latent_search' does not apply to the classifier family")
def attack_of_another_family(tmp):
    return _attack(tmp, "--attack", "latent_search")


@case("run folder '{tmp}/nowhere' does not exist; give an existing run folder")
def attack_a_folder_that_does_not_exist(tmp):
    return ["attack", tmp / "nowhere", "--attack", "relearn"]


@case("has no model/; restore it")
def attack_with_a_reference_without_its_model(tmp):
    import shutil

    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    shutil.rmtree(tmp / "run" / "reference" / "model")
    return argv


@case("is not a readable safetensors file")
def attack_with_a_corrupt_reference_model(tmp):
    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    (tmp / "run" / "reference" / "model" / "model.safetensors").write_bytes(b"garbage")
    return argv


@case("of reference run")
def attack_with_a_corrupt_reference_metrics(tmp):
    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    (tmp / "run" / "reference" / "metrics.json").write_bytes(b"{not json")
    return argv


@case("metrics.json' of run folder")
def attack_into_a_corrupt_metrics_json(tmp):
    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    (tmp / "run" / "metrics.json").write_bytes(b"{not json")
    return argv


@case("is not a mapping of metric names to numbers")
def attack_into_a_metrics_json_list(tmp):
    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    (tmp / "run" / "metrics.json").write_text("[1, 2]")
    return argv


@case("is writing to run folder", script=True, timeout=120)
def attack_a_locked_run_folder(tmp):
    import fcntl
    import os

    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    handle = open(tmp / "run" / ".lock", "a+")  # noqa: SIM115 (held until the module ends)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _HELD_LOCKS.append(handle)
    return argv


@case("is a symlink; a run writes only its own files")
def attack_a_run_folder_whose_lock_is_a_symlink_out(tmp):
    argv = _attack(tmp, "--attack", "relearn", "steps=2")
    (tmp / "outside.txt").write_text("not the run's")
    (tmp / "run" / ".lock").symlink_to(tmp / "outside.txt")
    return argv


@case("relearn.lr must be a finite number > 0, got -0.5")
def check_recipe_with_a_negative_attack_lr(tmp):
    return ["check", _recipe_with_attacks(tmp, [{"name": "relearn", "lr": -0.5}])]


@case("relearn.lr must be a finite number > 0, got inf")
def check_recipe_with_an_infinite_attack_lr(tmp):
    return ["check", _recipe_with_attacks(tmp, [{"name": "relearn", "lr": float("inf")}])]


@case("seed_search needs at least one generation per target")
def check_recipe_with_fewer_generations_than_targets(tmp):
    return ["check", _recipe_with_attacks(tmp, [{"name": "seed_search", "generations": 2}], T2I_UCE)]


@case("adversarial_prompt.guidance_sweep must be a non-empty list of finite guidances")
def check_recipe_with_a_nan_guidance(tmp):
    attacks = [{"name": "adversarial_prompt", "guidance_sweep": [1.0, float("nan")]}]
    return ["check", _recipe_with_attacks(tmp, attacks, T2I_UCE)]


@case("concept_inversion.templates must be a list of prompts, each with {token} in it")
def check_recipe_with_a_template_of_another_field(tmp):
    attacks = [{"name": "concept_inversion", "templates": ["a photo of {concept}"]}]
    return ["check", _recipe_with_attacks(tmp, attacks, T2I_UCE)]


@case("token_search.positions must be a non-empty list of prefix, replace")
def check_recipe_with_an_unknown_token_position(tmp):
    attacks = [{"name": "token_search", "positions": ["suffix"]}]
    return ["check", _recipe_with_attacks(tmp, attacks, T2I_UCE)]


@case("relearn.eval_every must be an integer of at least 1, got 0")
def library_attack_built_with_a_bad_setting(tmp):
    from unlearn.attacks import get_attack

    return lambda: get_attack("relearn")(eval_every=0)


@case("unknown attack 'relearm'; did you mean relearn?")
def ls_an_unknown_attack(tmp):
    return ["ls", "attacks", "relearm"]


@case("takes no name")
def ls_metrics_with_a_name(tmp):
    return ["ls", "metrics", "accuracy"]


@case("no shipped recipes/ folder is found in the checkout or in the installed package")
def ls_recipes_where_none_are_shipped(tmp):
    import argparse

    from unlearn import recipe
    from unlearn.cli import _ls

    def call():
        found = recipe.shipped_roots
        recipe.shipped_roots = (
            lambda: []
        )  # an install that lost its recipes (a local recipes/ file is no help)
        try:
            _ls(argparse.Namespace(what="recipes", name=None))
        finally:
            recipe.shipped_roots = found

    return call


@case("is too long a path (a name over 255 bytes or a path over 4096 bytes); give an existing run folder")
def eval_a_name_too_long(tmp):
    return ["eval", str(tmp / ("a" * 300))]


@case("is a symlink loop; give an existing run folder")
def attack_a_symlink_loop(tmp):
    (tmp / "loop").symlink_to(tmp / "loop")
    return ["attack", str(tmp / "loop"), "--attack", "relearn"]


@case("is not a run folder (no run.json in it); give unlearn attack a folder `unlearn erase` wrote")
def attack_the_model_folder_of_a_run(tmp):
    return ["attack", str(_finished_run(tmp) / "model"), "--attack", "relearn"]


@case("is unfinished (its run.json does not say complete")
def eval_an_unfinished_run(tmp):
    import json

    run = _finished_run(tmp)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "complete": False}))
    return ["eval", str(run)]


@case("unknown world 'mnist'")
def prepare_an_unknown_world(tmp):
    return ["prepare", "mnist"]


def _prepare_with_cache(cache: Path) -> Callable:
    """`prepare("digits")` with UNLEARN_CACHE pointed at `cache` (restored after)."""
    import os

    from unlearn.worlds import prepare

    def call():
        old = os.environ.get("UNLEARN_CACHE")
        os.environ["UNLEARN_CACHE"] = str(cache)
        try:
            prepare("digits", verbose=False)
        finally:
            if old is None:
                os.environ.pop("UNLEARN_CACHE", None)
            else:
                os.environ["UNLEARN_CACHE"] = old

    return call


@case("is a file, not a folder; point UNLEARN_CACHE at a writable folder")
def prepare_into_a_cache_that_is_a_file(tmp):
    cache = tmp / "cache"
    cache.write_text("not a folder")
    return _prepare_with_cache(cache)


@case("cannot be created (Not a directory); point UNLEARN_CACHE at a writable folder")
def prepare_into_a_cache_below_a_file(tmp):
    (tmp / "file").write_text("not a folder")
    return _prepare_with_cache(tmp / "file" / "cache")


@case("families must be None, 'all' or a list of model names")
def prepare_with_families_of_another_type(tmp):
    from unlearn.worlds import prepare

    return lambda: prepare("digits", families=3)


def test_a_corrupt_attack_cache_entry_is_recomputed(tmp_path, capsys, digits_world, one_thread):
    """The original's and Retrain's results cached in the reference folder are ours, not the user's: a damaged
    entry is recomputed and rewritten, and the numbers are those of a clean run."""
    import json

    run = _finished_run(tmp_path)
    argv = ["attack", str(run), "--attack", "relearn", "steps=2", "shots=[0]", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    entries = sorted((run / "reference" / "attacks").glob("relearn-*.json"))
    assert entries
    for entry in entries:
        entry.write_text("{damaged")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first
    for entry in entries:
        assert json.loads(entry.read_text())["success"] is not None
    assert not (run / ".lock").exists()  # the lock went with the command


# -------------------------------------------------------------------------------------------------- test


@pytest.mark.parametrize("entry", CASES)
def test_case(entry: Case, tmp_path, capsys, digits_world, one_thread):
    built = entry.build(tmp_path)
    phrase = entry.phrase.replace("{tmp}", str(tmp_path))
    before = file_hashes(tmp_path)
    if callable(built):
        with pytest.raises(UnlearnError) as raised:
            built()
        message = str(raised.value)
        assert phrase in message, message
    else:
        code, err = run_cli(built, capsys, entry.script, entry.timeout)
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert code == entry.exit, err
        assert lines and "error:" in lines[-1], err
        assert len([line for line in lines if "error:" in line]) == 1, err  # said once
        assert phrase in lines[-1], lines[-1]
    after = file_hashes(tmp_path)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"inputs modified or removed: {changed}"
    finished = [p for p in tmp_path.rglob("metrics.json") if str(p) not in before]
    assert not finished, f"a failed run left a folder that looks finished: {finished}"
