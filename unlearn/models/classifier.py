"""The classifier adapter: built-in architectures, torchvision architectures, transformers image classifiers."""

from __future__ import annotations

import math
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    atomic_path,
    float_dtypes,
    load_errors,
    load_into,
    load_state_dict,
    read_json_file,
    reason_of,
    refuse_custom_code,
    refuse_nonfinite,
    refuse_special_files,
    require_file,
    save_state_dict,
    saved_as,
    stored_dtypes,
    write_json,
)
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .base import Model
from .zoo import ARCHITECTURES

CONFIG_NAME = "unlearn_model.json"
FORMATS = ("builtin", "torchvision", "transformers", "module")  # module: any nn.Module (`wrap_classifier`)


class Classifier(Model):
    """An image classifier behind one interface.

    Images come in as float tensors in [0, 1], shape (N, C, H, W). The adapter repeats grey channels for
    colour models, resizes to the size the network expects (transformers models), and normalises with the
    network's mean and std, so every dataset feeds every classifier.

    Args:
        network: the wrapped `nn.Module` (returns logits, or an output object with `.logits`).
        num_classes: number of output classes.
        source: how the network was brought: {"format": builtin|torchvision|transformers|module, "arch": name,
            "weights_suffix": ".safetensors"|".pt"|...}; `save` writes the same format back.
        mean, std: per-channel normalisation.
        channels: input channels the network expects.
        image_size: square input size the network needs, or None if any size works.
        head: the classification head; by default the last `nn.Linear` with `num_classes` outputs.
    """

    family = "classifier"

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        source: dict,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels: int,
        image_size: int | None = None,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.network = network
        self.num_classes = num_classes
        self.source = dict(source)
        self.channels = channels
        self.image_size = image_size
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.head = head if head is not None else _find_head(network, num_classes)
        self._capture = False
        self._captured: torch.Tensor | None = None
        self.head.register_forward_hook(self._capture_head_input)
        # The dtype of each tensor as loaded (name -> dtype): the network trains in fp32, `save` writes each
        # tensor back in the dtype it came in.
        self.input_dtypes: dict[str, torch.dtype] = {}

    @property
    def trainable(self) -> nn.Module:
        return self.network

    def _capture_head_input(self, module, inputs, output):
        if self._capture:
            self._captured = inputs[0]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Channels, size and normalisation for the wrapped network."""
        if images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        if self.image_size is not None and images.shape[-1] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.network(self.prepare(images))
        return out.logits if hasattr(out, "logits") else out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate representation: the input of the classification head, flattened."""
        self._capture = True
        try:
            self.forward(images)
        finally:
            self._capture = False
        feats, self._captured = self._captured, None
        return feats.flatten(1)

    def loss(self, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def reinitialize(self) -> None:
        for module in self.network.modules():
            if hasattr(module, "reset_parameters") and module is not self.network:
                module.reset_parameters()
        if self.source["format"] == "transformers" and hasattr(self.network, "_init_weights"):
            self.network.apply(self.network._init_weights)

    def save(self, path: str | Path) -> None:
        """Write a folder in the format the model came in: a transformers folder (reloads with
        `from_pretrained`), or the network's plain state dict (`model.safetensors` or `model.pt`, loadable
        into the bare architecture) plus `unlearn_model.json`. Every tensor keeps the dtype it was loaded in."""
        path = Path(path)
        with atomic_path(path) as tmp, saved_as(self.network, self.input_dtypes):
            tmp.mkdir()
            config = {
                "family": self.family,
                **self.source,
                "num_classes": self.num_classes,
                "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(),
                "channels": self.channels,
                "image_size": self.image_size,
            }
            if self.source["format"] == "transformers":
                self.network.save_pretrained(str(tmp))
                processor = self.source.get("processor_file")
                if processor and Path(processor).exists():
                    shutil.copy(processor, tmp / "preprocessor_config.json")
            else:
                suffix = self.source.get("weights_suffix", ".safetensors")
                name = "model.safetensors" if suffix == ".safetensors" else f"model{suffix}"
                save_state_dict(self.network.state_dict(), tmp / name)
                config["weights"] = name
            write_json(config, tmp / CONFIG_NAME)


def _find_head(network: nn.Module, num_classes: int) -> nn.Module:
    """The classification head: the last `nn.Linear` with `num_classes` outputs."""
    heads = [m for m in network.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        raise CheckpointError(
            f"cannot find a linear classification head with {num_classes} outputs in the network"
        )
    return heads[-1]


def build_classifier(arch: str, num_classes: int, channels: int | None = None) -> Classifier:
    """A freshly initialised classifier: a built-in name (`digits_cnn`, `resnet18_cifar`) or `torchvision:<name>`."""
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise ConfigError(f"unknown torchvision architecture {name!r}")
        network = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        source = {"format": "torchvision", "arch": arch}
        return Classifier(
            network, num_classes, source, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), channels=3
        )
    if arch not in ARCHITECTURES:
        known = ", ".join([*ARCHITECTURES, "torchvision:<name>", "transformers"])
        raise ConfigError(f"unknown classifier architecture {arch!r}; known: {known}")
    builder, mean, std = ARCHITECTURES[arch]
    channels = channels or len(mean)
    if len(mean) != channels:
        mean, std = (mean[0],) * channels, (std[0],) * channels
    network = builder(num_classes, channels)
    return Classifier(network, num_classes, {"format": "builtin", "arch": arch}, mean, std, channels=channels)


def wrap_classifier(
    module: nn.Module,
    num_classes: int,
    *,
    head: nn.Module | str | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    channels: int | None = None,
    image_size: int | None = None,
) -> Classifier:
    """Wrap any image classifier `nn.Module` into the toolkit's `Classifier` adapter.

    Args:
        module: maps images (N, C, H, W) to logits (N, num_classes), or to an output object with `.logits`.
        num_classes: number of classes it predicts.
        head: the classification head (a module of `module`, or its dotted name); by default the last
            `nn.Linear` with `num_classes` outputs. Its input is what `features()` returns (LAF, representation
            metrics).
        mean, std: per-channel normalisation the adapter applies to [0, 1] images before the module; the
            defaults (0, 1) hand the images over unchanged, as the module was trained on them.
        channels: input channels the module expects (1-channel images are repeated for 3); by default the
            `in_channels` of its first convolution, else the channels of the mean.
        image_size: square input size to resize images to, or None to pass them at their own size.

    The module itself becomes the adapter's `network` (not a copy): `save()` writes its state dict, and
    `unlearn.load_model(folder, module=MyNet())` loads it back into a fresh instance.
    """
    if isinstance(module, Model):
        raise ConfigError(f"the model is already a {type(module).__name__} adapter; pass it as it is")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"wrap_classifier needs a torch.nn.Module, got a {type(module).__name__}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    if isinstance(head, str):
        modules = dict(module.named_modules())
        if head not in modules:
            raise ConfigError(f"head {head!r} is not a submodule of {type(module).__name__}")
        head = modules[head]
    elif head is None:
        heads = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        if not heads:
            raise ConfigError(
                f"cannot find the classification head of {type(module).__name__}: it has no nn.Linear with "
                f"{num_classes} outputs; name it with unlearn.wrap_classifier(module, {num_classes}, "
                "head=module.<head>)"
            )
        head = heads[-1]
    if channels is None:
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        channels = convs[0].in_channels if convs else len(mean)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise ConfigError(
            f"give one mean and one std per input channel ({channels}), or one of each; got {len(mean)} and "
            f"{len(std)}"
        )
    if not all(v > 0 for v in std):
        raise ConfigError(f"std must be positive, got {std}")
    source = {"format": "module", "arch": f"{type(module).__module__}.{type(module).__qualname__}"}
    return Classifier(module, num_classes, source, mean, std, channels, image_size, head=head)


def load_classifier(
    checkpoint: str | Path | None, arch: str | None, num_classes: int, module: nn.Module | None = None
) -> Classifier:
    """Load a classifier from any supported checkpoint.

    Args:
        checkpoint: a transformers image-classification folder; a folder written by `Classifier.save`; a
            weights file (`.safetensors`, `.pt`, `.pth`) for `arch`; or None for fresh weights.
        arch: built-in name or `torchvision:<name>`; needed for a bare weights file or fresh weights.
        num_classes: number of classes of the dataset; the checkpoint must agree.
        module: a fresh instance of the architecture of a folder saved from `wrap_classifier` (format
            "module"), or of a built-in / torchvision one, whose weights the folder holds.
    """
    if checkpoint is None:
        if not arch:
            raise ConfigError("model.arch is needed when no checkpoint is given")
        return build_classifier(arch, num_classes)
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if (path / CONFIG_NAME).exists():
            return _load_saved_folder(path, num_classes, module)
        if (path / "config.json").exists():
            return _load_transformers(path, num_classes)
        raise CheckpointError(
            f"folder {str(path)!r} is neither a transformers model folder (config.json) nor an unlearn model "
            f"folder ({CONFIG_NAME}); give such a folder or a weights file"
        )
    require_file(path)
    if not arch or arch == "transformers":
        raise ConfigError(f"model.arch must name the architecture of the weights file {str(path)!r}")
    model = build_classifier(arch, num_classes)
    state = load_state_dict(path)
    load_into(model.network, state, str(path))
    model.source["weights_suffix"] = path.suffix
    model.input_dtypes = float_dtypes(state)
    return model


def _load_saved_folder(path: Path, num_classes: int, module: nn.Module | None = None) -> Classifier:
    refuse_special_files(path)
    config = _read_model_config(path)
    _check_classes(config["num_classes"], num_classes, path)
    if config["format"] == "transformers":
        model = _load_transformers(path, num_classes)
    elif config["format"] == "module" or module is not None:
        model = _load_into_module(path, config, module)
    else:
        try:
            model = build_classifier(config["arch"], num_classes, channels=config["channels"])
        except ConfigError as err:
            raise CheckpointError(f"{str(path / CONFIG_NAME)!r}: {err}") from err
        weights = _own_file(path, config.get("weights", "model.safetensors"))
        state = load_state_dict(weights)
        load_into(model.network, state, str(weights))
        model.source["weights_suffix"] = weights.suffix
        model.input_dtypes = float_dtypes(state)
    for key in ("mean", "std"):
        values = config[key]
        if len(values) == 1:
            values = values * model.channels
        if len(values) != model.channels:
            raise CheckpointError(
                f"{str(path / CONFIG_NAME)!r} gives {len(values)} {key} values for a model of {model.channels} "
                f"input channels; give one per channel"
            )
        setattr(model, key, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))
    model.image_size = config.get("image_size")  # the size the saved model was used at, whatever its format
    return model


def _load_into_module(path: Path, config: dict, module: nn.Module | None) -> Classifier:
    """A folder's weights loaded into `module`, a fresh instance of the architecture the folder was saved from
    (custom architectures are code, and a folder never carries code)."""
    if module is None:
        raise CheckpointError(
            f"{str(path)!r} holds the weights of a custom architecture ({config['arch']}); reload it with "
            "unlearn.load_model(folder, module=<a fresh instance of it>)"
        )
    if not isinstance(module, nn.Module):
        raise ConfigError(f"module must be a torch.nn.Module instance, got a {type(module).__name__}")
    weights = _own_file(path, config.get("weights", "model.safetensors"))
    state = load_state_dict(weights)
    load_into(module, state, str(weights))
    model = wrap_classifier(
        module,
        config["num_classes"],
        mean=config["mean"],
        std=config["std"],
        channels=config.get("channels"),
        image_size=config.get("image_size"),
    )
    if config["format"] != "module":  # a built-in architecture brought as an instance saves as what it is
        model.source = {"format": config["format"], "arch": config["arch"]}
    model.source["weights_suffix"] = weights.suffix
    model.input_dtypes = float_dtypes(state)
    return model


def _read_model_config(path: Path) -> dict:
    """`unlearn_model.json` of a model folder, every field checked (type and range) before anything uses it."""
    file = _own_file(path, CONFIG_NAME)
    config = read_json_file(file, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{str(file)!r} must be a JSON object (mapping), got a {type(config).__name__}; fix or re-save "
            "the model"
        )
    if config.get("format") not in FORMATS:
        raise CheckpointError(
            f"{str(file)!r} names an unknown format {config.get('format')!r}; known: {', '.join(FORMATS)}"
        )

    def bad(key: str, want: str):
        value = config.get(key, "(missing)")
        return CheckpointError(
            f"{str(file)!r}: {key} must be {want}, got {value!r}; fix or re-save the model"
        )

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not positive_int(config.get("num_classes")):
        raise bad("num_classes", "a positive integer")
    if config["format"] != "transformers" and not isinstance(config.get("arch"), str):
        raise bad("arch", "an architecture name (a string)")
    for key in ("channels", "image_size"):
        if config.get(key) is not None and not positive_int(config[key]):
            raise bad(key, "a positive integer or null")
    for key in ("mean", "std"):
        values = config.get(key)
        values = [values] if number(values) else values
        if not isinstance(values, list) or not values or not all(number(v) for v in values):
            raise bad(key, "a list of finite numbers, one per input channel")
        if key == "std" and not all(v > 0 for v in values):
            raise bad(key, "a list of positive numbers")
        config[key] = [float(v) for v in values]
    if "weights" in config and not isinstance(config["weights"], str):
        raise bad("weights", "the name of a weights file inside the folder")
    return config


def _own_file(folder: Path, name: str) -> Path:
    """The file `name` of a model folder: a folder reads only its own files, never one elsewhere (an absolute
    path, `..`, or a symlink that leads out of the folder)."""
    file = folder / name
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not name.strip():
        problem = f"{str(folder / CONFIG_NAME)!r} names weights {name!r} outside the model folder"
    elif folder.resolve() not in file.resolve().parents:
        problem = f"{str(file)!r} is a symlink that leads outside the model folder"
    else:
        return file
    raise CheckpointError(
        f"{problem}; a model folder may only read its own files (copy the file into it and name it relative "
        "to it)"
    )


def _load_transformers(path: Path, num_classes: int) -> Classifier:
    refuse_custom_code(path)
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        # trust_remote_code=False: never import code from the folder, never ask (refuse_custom_code said why)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        network = AutoModelForImageClassification.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except pickle.UnpicklingError as err:  # transformers loads .bin weights with weights_only=True
        raise CheckpointError(
            f"transformers folder {str(path)!r} holds pickled objects beyond plain tensors; refusing to unpickle "
            "code (re-save it with safetensors)"
        ) from err
    except load_errors() as err:  # a mistyped config.json, weights of other shapes, a corrupt file
        raise CheckpointError(
            f"cannot load transformers image classifier from {str(path)!r}: {reason_of(err)}; check its "
            "config.json and weights (re-save it with save_pretrained)"
        ) from err
    num_labels = getattr(config, "num_labels", None)
    if not isinstance(num_labels, int):
        raise CheckpointError(
            f"{str(path / 'config.json')!r} gives no usable number of labels ({num_labels!r})"
        )
    _check_classes(num_labels, num_classes, path)
    channels = getattr(config, "num_channels", 3)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise CheckpointError(
            f"{str(path / 'config.json')!r}: num_channels must be a positive integer, got {channels!r}"
        )
    mean, std, size = (0.5,) * channels, (0.5,) * channels, getattr(config, "image_size", None)
    processor = path / "preprocessor_config.json"
    if processor.exists():
        spec = read_json_file(processor, "preprocessor config")
        if not isinstance(spec, dict):
            raise CheckpointError(f"{str(processor)!r} must be a JSON object (mapping); fix or delete it")
        mean = _per_channel(spec.get("image_mean", mean), channels, processor)
        std = _per_channel(spec.get("image_std", std), channels, processor)
        size_spec = spec.get("size")
        if isinstance(size_spec, dict):
            size = size_spec.get("height") or size_spec.get("shortest_edge") or size
        elif isinstance(size_spec, int):
            size = size_spec
    if isinstance(size, (list, tuple)) and size:  # some configs give (height, width)
        size = size[0]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise CheckpointError(f"transformers folder {str(path)!r} gives an unusable image size {size!r}")
    source = {"format": "transformers", "arch": config.model_type}
    if processor.exists():
        source["processor_file"] = str(processor.resolve())
    refuse_nonfinite(network, str(path))
    dtypes = stored_dtypes(network, path)
    model = Classifier(network.float(), num_classes, source, mean, std, channels=channels, image_size=size)
    model.input_dtypes = dtypes
    return model


def _per_channel(value, channels: int, source: Path) -> tuple[float, ...]:
    """A processor's image_mean / image_std as one value per input channel."""
    values = (
        (value,) if isinstance(value, (int, float)) else tuple(value) if isinstance(value, list) else None
    )
    if values is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise CheckpointError(
            f"{str(source)!r} gives normalisation values {value!r}; give a number or a list of numbers"
        )
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise CheckpointError(
            f"{str(source)!r} gives {len(values)} normalisation values for {channels} channels"
        )
    return tuple(float(v) for v in values)


def _check_classes(checkpoint_classes: int, data_classes: int, path: Path) -> None:
    if checkpoint_classes != data_classes:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has {checkpoint_classes} classes but the dataset has {data_classes}"
        )
