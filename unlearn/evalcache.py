"""A cache of what does not change between runs: the original model's scores.

Every run of a generative recipe scores the model before unlearning (`original_*` metrics, the "original" sample
grids), and every method of a bench scores the same original again: on the digits text-to-image model that is
half of the thousands of generations a run costs. The scores depend only on the original model's weights, the
task, the evaluation settings and the seed, so they are stored once under the toolkit cache
(`$UNLEARN_CACHE/scores/`) and read back by every later run with the same key.

One entry is one safetensors file: the images the report's sample grids show (as their 8-bit pixels), and in its
metadata the metrics (JSON), the key, what the key was made of, and a sha256 digest of both. It is written atomically (a temporary file moved
into place), so concurrent writers of the same entry leave one whole file. Reading validates everything: a file
that does not parse, was written for another key, or whose digest does not match is ignored (the log says why)
and scored again, never trusted. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FORMAT = "unlearn-original-scores/1"
FOLDER = "scores"


def cache_folder() -> Path:
    """Where the entries live: `$UNLEARN_CACHE/scores` (default `~/.cache/unlearn-toolkit/scores`)."""
    from .worlds.cache import cache_dir

    return cache_dir() / FOLDER


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): the original model as it is scored,
    after pruning or half-precision casts, whatever checkpoint it came from."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        _update(digest, name, tensor)
    return digest.hexdigest()


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of one tensor's dtype, shape and bytes (the real images FID compares with, say)."""
    digest = hashlib.sha256()
    _update(digest, "", tensor)
    return digest.hexdigest()


def _update(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def entry_key(material: dict) -> str:
    """sha256 of the canonical JSON of what the scores depend on."""
    return hashlib.sha256(_canonical(material).encode()).hexdigest()


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _digest(metrics_json: str, images: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(metrics_json.encode())
    for name in sorted(images):
        _update(digest, name, images[name])
    return digest.hexdigest()


def entry_path(family: str, key: str) -> Path:
    return cache_folder() / f"{family}-{key[:32]}.safetensors"


def read_entry(path: Path, key: str, material: dict) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """The (metrics, images) stored at `path` for `key`, or one sentence saying why the file cannot be trusted
    (then the caller scores again and overwrites it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            images = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # a truncated or foreign file: safetensors raises several kinds
        return f"not a readable safetensors file ({type(err).__name__})"
    if any(pixels.dtype != torch.uint8 or pixels.ndim != 4 for pixels in images.values()):
        return "its tensors are not 8-bit images"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, not {FORMAT!r}"
    if meta.get("key") != key or meta.get("material") != _canonical(material):
        return "written for other scores (key mismatch)"
    metrics_json = meta.get("metrics", "")
    if meta.get("digest") != _digest(metrics_json, images):
        return "its digest does not match its contents"
    try:
        metrics = json.loads(metrics_json)
    except ValueError:
        return "its metrics are not JSON"
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (int, float, str))) for k, v in metrics.items()
    ):
        return "its metrics are not a flat mapping"
    return metrics, {name: pixels.float() / 255 for name, pixels in images.items()}


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit pixels the sample grids show (`metrics.generation.grid_image` rounds the
    same way, so a grid drawn from the cached images is the grid drawn from the generated ones): a quarter of
    float32's size, which matters at 512x512."""
    return (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def write_entry(path: Path, key: str, material: dict, metrics: dict, images: dict[str, torch.Tensor]) -> None:
    """Store an entry atomically (`checkpoints.atomic_path`: a temporary file beside it, then a rename)."""
    from safetensors.torch import save_file

    from .checkpoints import atomic_path

    images = {name: to_pixels(tensor) for name, tensor in images.items()}
    # in scoring's order (the run's metrics.json keeps it); NaN stays NaN, which Python's JSON reads back
    metrics_json = json.dumps(metrics, default=float)
    meta = {
        "format": FORMAT,
        "key": key,
        "material": _canonical(material),
        "metrics": metrics_json,
        "digest": _digest(metrics_json, images),
    }
    with atomic_path(path) as tmp:
        save_file(images, str(tmp), metadata=meta)
