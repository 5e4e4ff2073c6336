"""Metrics for generative unlearning (concept erasure): a judge classifier, FID, CLIP score, image grids.

Images everywhere are float tensors in [0, 1] with shape (N, C, H, W), C = 1 or 3.

- `judge_labels` / `load_judge`: classify generations with a judge (a classifier folder, a
  "module:function" factory, or any callable returning logits).
- `fid`: the Fréchet distance computed as clean-fid computes it, on clean-fid's Inception ("clean" mode) or
  on any feature extractor (e.g. the judge's penultimate features), with optional cached real statistics.
- `clip_score`: torchmetrics' `CLIPScore` on a local CLIP folder, made to work with transformers 5.
- `grid_image` / `save_grid`: a PNG contact sheet of generations.

Heavy modules (clean-fid, transformers, torchmetrics) are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoints import atomic_path, refuse_custom_code
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, DataError
from ..progress import progress
from ..spread import map_batches

# Where clean-fid (non-Windows) looks for, and otherwise downloads, its TorchScript Inception weights.
INCEPTION_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
INCEPTION_SIZE = (299, 299)

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

Extractor = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Judge


def owner_module(fn) -> nn.Module | None:
    """The `nn.Module` behind a callable: the module itself, or the owner of a bound method."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _module_device(module: nn.Module | None) -> torch.device:
    if module is not None:
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return torch.device("cpu")


def extractor_fingerprint(extractor: Extractor) -> str:
    """12 hex digits that change with the weights of the module behind `extractor` (or with the function's
    qualified name when no module owns it): part of an FID cache's name, so that statistics computed with one
    judge are never read back for another."""
    import hashlib

    digest = hashlib.sha256()
    module = owner_module(extractor)
    if module is None:
        digest.update(
            f"{getattr(extractor, '__module__', '')}.{getattr(extractor, '__qualname__', '')}".encode()
        )
    else:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


@contextmanager
def _eval_mode(module: nn.Module | None):
    """Switch `module` to eval mode for the block and restore its previous mode afterwards."""
    if module is None:
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_images(images: torch.Tensor, what: str = "images") -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise DataError(f"{what} must be a float tensor of shape (N, C, H, W) with C = 1 or 3, got {shape}")


def judge_logits(judge: Extractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """A judge classifier's logits on generated images.

    Args:
        judge: an `nn.Module` or callable mapping images in [0, 1] to logits of shape (N, K), e.g. a
            `unlearn.models.classifier.Classifier`. A module runs in eval mode (its mode is restored after).
        images: float tensor (N, C, H, W) in [0, 1].
        batch_size: images per forward pass.

    Returns:
        Float tensor (N, K) on the CPU.
    """
    _check_images(images)
    module = owner_module(judge)
    device = _module_device(module)
    bar = progress(desc="judging", total=len(images), unit="img")

    def batch(items: slice) -> torch.Tensor:
        logits = judge(images[items].to(device))
        logits = logits.logits if hasattr(logits, "logits") else logits
        bar.update(len(logits))
        return logits.float().cpu()

    with _eval_mode(module), torch.no_grad():
        out = map_batches(len(images), batch_size, batch)  # spread over the processes in scoring
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, 0)


def judge_labels(judge: Extractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class predictions of a judge classifier on generated images (see `judge_logits`): LongTensor (N,) on
    the CPU, the argmax class of each image."""
    logits = judge_logits(judge, images, batch_size)
    return logits.argmax(dim=1) if len(logits) else torch.zeros(0, dtype=torch.long)


def load_judge(spec: str | Path | Extractor, num_classes: int | None = None) -> Extractor:
    """Bring a judge classifier from a spec.

    Args:
        spec: a folder written by `Classifier.save` or a transformers image-classification folder; a
            "module:function" string naming a Python callable that takes no arguments and returns the judge;
            or a callable, returned as is.
        num_classes: the judge's number of classes; read from the folder when None.

    Returns:
        A callable mapping images in [0, 1] to logits (a module is put in eval mode).

    Raises:
        ConfigError: the spec is neither an existing folder, nor an importable "module:function" factory,
            nor a callable, or the factory does not return a callable.
        CheckpointError: the folder cannot be loaded as a classifier.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"a judge must be a folder, a 'module:function' string or a callable, got {spec!r}")
    path = Path(spec)
    if path.is_dir():
        from ..models.classifier import load_classifier

        judge = load_classifier(path, None, num_classes or _folder_classes(path))
        return judge.eval()
    text = str(spec)
    if _FACTORY.match(text):
        return _judge_from_factory(text)
    if path.exists():
        raise ConfigError(
            f"judge {text!r} is a file; give a classifier folder or a 'module:function' factory"
        )
    raise ConfigError(
        f"judge {text!r} is neither an existing classifier folder nor a 'module:function' factory "
        "(e.g. 'my_judges:load_resnet')"
    )


def _judge_from_factory(text: str) -> Extractor:
    module_name, attr = text.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"judge {text!r}: cannot import module {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"judge {text!r}: module {module_name!r} has no callable {attr!r}")
    judge = factory()
    if not callable(judge):
        raise ConfigError(f"judge {text!r}: {attr}() returned {type(judge).__name__}, not a callable")
    if isinstance(judge, nn.Module):
        judge.eval()
    return judge


def _folder_classes(path: Path) -> int:
    """The number of classes a classifier folder declares (unlearn_model.json or transformers config.json)."""
    from ..checkpoints import read_json_file
    from ..models.classifier import CONFIG_NAME

    for name, keys in ((CONFIG_NAME, ("num_classes",)), ("config.json", ("num_labels", "id2label"))):
        file = path / name
        if not file.exists():
            continue
        config = read_json_file(file, "judge config")
        for key in keys:
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, dict) and value:
                return len(value)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return value
            if value is not None:
                raise CheckpointError(
                    f"{key} in judge config {str(file)!r} must be a count of at least 2 classes, got {value!r}; "
                    "fix the config or pass num_classes"
                )
    raise CheckpointError(
        f"cannot tell the number of classes of judge folder {str(path)!r}; pass num_classes"
    )


# --------------------------------------------------------------------------------------------------------
# FID


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between two feature sets, exactly as clean-fid computes it.

    Args:
        real: features (N1, D).
        fake: features (N2, D).

    Returns:
        ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2 Tr sqrtm(Σ1 Σ2), with μ from `np.mean` and Σ from
        `np.cov(rowvar=False)` (`cleanfid.fid.frechet_distance`).
    """
    return _frechet(*_statistics(real), *_statistics(fake))


def _statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise DataError(f"FID needs at least 2 feature vectors of shape (N, D), got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def _frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    from cleanfid.fid import frechet_distance

    if mu1.shape != mu2.shape:
        raise DataError(f"feature sizes differ: {mu1.shape[0]} (real) vs {mu2.shape[0]} (generated)")
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def image_features(
    images: torch.Tensor, extractor: Extractor, batch_size: int = 64, device: str | torch.device | None = None
) -> np.ndarray:
    """Features of images, batch by batch, under `no_grad`.

    Args:
        images: float tensor (N, C, H, W), passed to the extractor as given.
        extractor: a callable (or `nn.Module`, or a bound method of one such as `Classifier.features`)
            returning (B, D) features; a module runs in eval mode.
        batch_size: images per call.
        device: where the batches go; by default the device of the extractor's module, else the CPU.

    Returns:
        float64 array (N, D).
    """
    module = owner_module(extractor)
    device = torch.device(device) if device is not None else _module_device(module)
    bar = progress(desc="image features", total=len(images), unit="img")

    def batch(items: slice) -> torch.Tensor:
        feats = extractor(images[items].to(device))
        bar.update(len(feats))
        return feats.detach().flatten(1).cpu().double()

    with _eval_mode(module), torch.no_grad():
        chunks = map_batches(len(images), batch_size, batch)  # spread over the processes in scoring
    bar.close()
    if not chunks:
        raise DataError("no images to compute features of")
    return torch.cat(chunks).numpy()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 RGB (grey repeated to 3 channels), rounded as a saved PNG would be."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)


def inception_extractor(device: str | torch.device = "cpu") -> Extractor:
    """clean-fid's "clean" feature path: PIL bicubic resize to 299 (float, no re-quantisation) of uint8 RGB,
    then the TorchScript Inception's 2048-d pool features of [0, 255] floats.

    Raises:
        ConfigError: the Inception weights are not at `INCEPTION_WEIGHTS` (clean-fid would download them).
    """
    if not INCEPTION_WEIGHTS.exists():
        raise ConfigError(
            f"clean-fid's Inception weights are missing: place them at {INCEPTION_WEIGHTS} (download "
            f"{INCEPTION_URL}) or pass a custom feature extractor (e.g. extractor=judge.features)"
        )
    from cleanfid import features
    from cleanfid.resize import make_resizer

    device = torch.device(device)
    model = features.build_feature_extractor("clean", device=device, use_dataparallel=False)
    resize = make_resizer("PIL", False, "bicubic", INCEPTION_SIZE)

    def extract(batch: torch.Tensor) -> torch.Tensor:
        pixels = _to_uint8(batch).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) uint8
        resized = np.stack([resize(image) for image in pixels])  # (B, 299, 299, 3) float32 in [0, 255]
        return model(torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous().to(device))

    return extract


def fid(
    real_images: torch.Tensor | None,
    fake_images: torch.Tensor,
    extractor: str | Extractor = "inception",
    device: str | torch.device = "cpu",
    cache: str | Path | None = None,
    batch_size: int = 64,
) -> float:
    """Fréchet distance between real and generated images.

    Args:
        real_images: float tensor (N, C, H, W) in [0, 1]; may be None when `cache` already holds the
            real statistics.
        fake_images: generated images, same layout.
        extractor: "inception" for clean-fid's Inception in "clean" mode (needs the weights at
            `INCEPTION_WEIGHTS`), or a callable mapping a batch of images in [0, 1] to (B, D) features,
            e.g. a judge's `Classifier.features`; the images go to the device of its module.
        device: where Inception runs.
        cache: an .npz file for the real statistics (mu, sigma): read when it exists, otherwise computed
            and written there (atomically). The path is the key: use one path per real set and extractor. An
            unreadable file is computed again and replaced when `real_images` are given.
        batch_size: images per feature pass.

    Returns:
        The FID (lower means closer).
    """
    _check_images(fake_images, "generated images")
    if isinstance(extractor, str):
        if extractor != "inception":
            raise ConfigError(f"unknown FID extractor {extractor!r}: use 'inception' or a callable")
        extract, feature_device = inception_extractor(device), torch.device("cpu")
    elif callable(extractor):
        extract, feature_device = extractor, None
    else:
        raise ConfigError(f"FID extractor must be 'inception' or a callable, got {type(extractor).__name__}")

    def features(images: torch.Tensor) -> np.ndarray:
        return image_features(images, extract, batch_size, device=feature_device)

    cache = Path(cache) if cache is not None else None
    stats = None
    if cache is not None and cache.exists():
        try:
            stats = _read_stats(cache)
        except CheckpointError:
            if real_images is None:
                raise
    if stats is not None:
        mu_real, sigma_real = stats
    else:
        if real_images is None:
            raise ConfigError("FID needs real images (or a cache file that holds their statistics)")
        _check_images(real_images, "real images")
        mu_real, sigma_real = _statistics(features(real_images))
        if cache is not None:
            _write_stats(cache, mu_real, sigma_real)
    mu_fake, sigma_fake = _statistics(features(fake_images))
    return _frechet(mu_real, sigma_real, mu_fake, sigma_fake)


def _read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as stats:
            return stats["mu"], stats["sigma"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"FID cache {str(path)!r} is not an .npz file with mu and sigma ({err})"
        ) from err


def _write_stats(path: Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a file object: np.savez adds no suffix
        np.savez(handle, mu=mu, sigma=sigma)


# --------------------------------------------------------------------------------------------------------
# CLIP score


class CLIPFeatures(nn.Module):
    """A `CLIPModel` whose `get_image_features` / `get_text_features` return tensors.

    transformers 5 returns an output object (the projected embedding in `.pooler_output`), which torchmetrics
    1.9's `CLIPScore` cannot use; this wrapper gives it the tensors and the model's `.config`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def load_clip(path: str | Path):
    """A local CLIP folder as (`CLIPFeatures` wrapper, `CLIPProcessor`), without touching the network."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"CLIP model folder {str(path)!r} does not exist")
    refuse_custom_code(path)
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot load a CLIP model and processor from {str(path)!r}: {reason}") from err
    return CLIPFeatures(model.eval()), processor


def clip_score(
    images: torch.Tensor,
    prompts: str | Sequence[str],
    clip_model_path: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> float:
    """CLIP score of images against their prompts, with torchmetrics' `CLIPScore` on a local CLIP folder.

    Args:
        images: float tensor (N, C, H, W) in [0, 1] (grey is repeated to 3 channels).
        prompts: one prompt per image, or a single prompt for all.
        clip_model_path: a folder holding a `CLIPModel` and its `CLIPProcessor` (`save_pretrained`).
        device: where CLIP runs.
        batch_size: pairs per update.

    Returns:
        max(100 · mean cos(image embedding, prompt embedding), 0), as torchmetrics computes it.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    _check_images(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise DataError(f"{len(images)} images but {len(prompts)} prompts")
    model, processor = load_clip(clip_model_path)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
    pixels = _to_uint8(images)
    with torch.no_grad():
        for start in progress(range(0, len(pixels), batch_size), "CLIP score", unit="batch"):
            stop = start + batch_size
            metric.update(pixels[start:stop].to(device), prompts[start:stop])
    return float(metric.compute())


# --------------------------------------------------------------------------------------------------------
# Image grids


def grid_image(images: torch.Tensor, nrow: int, scale: int = 4):
    """A grid of images as a PIL image.

    Args:
        images: float tensor (N, C, H, W) in [0, 1].
        nrow: images per row.
        scale: nearest-neighbour upscaling factor of every image.

    Returns:
        A PIL image ("L" for grey, "RGB" for colour): cells of (H·scale, W·scale) with a 1-pixel white gap
        between neighbours and no outer border; unused cells of the last row stay white.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    _check_images(images)
    if nrow < 1 or scale < 1:
        raise ConfigError(f"grid needs nrow >= 1 and scale >= 1, got nrow={nrow}, scale={scale}")
    if len(images) == 0:
        raise DataError("no images to put in a grid")
    channels = images.shape[1]
    pixels = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    # make_grid pads every cell, the outer border included: cut the border off, keep the gaps between cells.
    # (Not torchvision's save_image: it would write grey grids as RGB, and not atomically.)
    canvas = make_grid(pixels, nrow=nrow, padding=1, pad_value=255)[:, 1:-1, 1:-1]
    array = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)  # uint8: "L" or "RGB"


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4) -> Path:
    """Write `grid_image(images, nrow, scale)` as a PNG at `path` (atomically) and return the path."""
    image = grid_image(images, nrow, scale)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


__all__ = [
    "INCEPTION_WEIGHTS",
    "CLIPFeatures",
    "clip_score",
    "fid",
    "fid_from_features",
    "grid_image",
    "image_features",
    "inception_extractor",
    "judge_labels",
    "load_clip",
    "load_judge",
    "save_grid",
]
