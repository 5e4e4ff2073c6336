"""Safe reading and atomic writing of checkpoints.

Weights load from safetensors, or from `.pt/.pth/.bin` with `torch.load(weights_only=True)`: a pickle that
carries code is refused before anything in it runs, and so is a model folder that names Python code of its own
(`refuse_custom_code`). Every file is written to a temporary name in the target folder and moved into place, so
a crash never leaves half a file and an input is never touched. Outputs keep the dtype of each tensor as it
came in (`float_dtypes` / `stored_dtypes` at load, `saved_as` at save).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError, CheckpointNotFoundError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a weights-only torch file, unwrapping common nestings."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a folder; expected a weights file {WEIGHT_SUFFIXES}"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has suffix {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({err})"
            ) from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds pickled objects beyond plain tensors; refusing to unpickle code "
            "(re-save it as a state dict or as safetensors)"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a torch file ({err})") from err
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):  # saved from DataParallel / DDP
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` strictly, turning missing/unexpected keys and shape mismatches into one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit the architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"checkpoint {source!r} does not fit the architecture: {name} has shape "
                f"{tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    module.load_state_dict(state)


def refuse_custom_code(folder: str | Path) -> None:
    """Refuse, in one sentence and before anything loads, a model folder that would make transformers or
    diffusers import Python code shipped with it.

    Custom code is named through `auto_map` in any JSON config of the folder or of its component folders
    (transformers' remote-code classes), or through `model_index.json`: a pipeline class given as
    [module, class], or a component whose library is not diffusers or transformers (a module file beside the
    weights). Loaders are also called with `trust_remote_code=False`, so transformers never asks on a terminal.

    Raises:
        CheckpointError: the folder names custom code.
    """
    folder = Path(folder)
    reason = _custom_code(folder)
    if reason:
        raise CheckpointError(
            f"refusing checkpoint {str(folder)!r}: {reason}, and unlearn never runs custom code from a "
            "checkpoint (re-save the model with a standard transformers or diffusers class)"
        )


def _custom_code(folder: Path) -> str | None:
    """Why `folder` names custom code, or None."""
    index = _read_json(folder / "model_index.json")
    folders = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for config in (file for part in folders for file in sorted(part.glob("*.json"))):
        if b"auto_map" in config.read_bytes():
            auto_map = (_read_json(config) or {}).get("auto_map")
            if auto_map:
                names = sorted({str(v) for v in _flatten(auto_map) if v})
                return f"its {config.relative_to(folder)} maps classes to custom code (auto_map: {', '.join(names)})"
    if index is None:
        return None
    pipeline_class = index.get("_class_name")
    if not isinstance(pipeline_class, str):
        return f"its model_index.json names a custom pipeline class {pipeline_class!r}"
    from diffusers import pipelines

    for name, value in index.items():
        if (
            name.startswith("_")
            or not isinstance(value, (list, tuple))
            or len(value) != 2
            or value[0] is None
        ):
            continue
        library, class_name = value
        if (folder / name / f"{library}.py").exists():
            return f"its component {name!r} is declared as custom code ({name}/{library}.py)"
        if library not in ("diffusers", "transformers") and not hasattr(pipelines, str(library)):
            return (
                f"its component {name!r} is a {library}.{class_name}, which is neither a diffusers nor a "
                "transformers class"
            )
    return None


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({err})") from err


def _flatten(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def float_dtypes(tensors: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """The dtype of every floating-point tensor, by state-dict name: what a loader records so that `save`
    writes each tensor back in the dtype it came in (mixed precision is a training setting, not a format)."""
    state = tensors.state_dict() if isinstance(tensors, torch.nn.Module) else tensors
    return {name: value.dtype for name, value in state.items() if value.is_floating_point()}


_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def stored_dtypes(module: torch.nn.Module, folder: str | Path) -> dict[str, torch.dtype]:
    """The dtype each floating-point tensor of `module` has in the weight files of the model folder it was
    loaded from (`float_dtypes` where the files do not say: no safetensors, renamed keys).

    Loaders may load in another dtype than the files hold (diffusers loads its models in fp32 by default); the
    output is written in the files' dtypes. Only the safetensors headers are read; variant files
    (`*.fp16.safetensors`) are not what a plain `from_pretrained` loads and are skipped.
    """
    loaded = float_dtypes(module)
    stored: dict[str, torch.dtype] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        if file.name.count(".") != 1:
            continue
        try:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size < 100_000_000 else {}
        except (OSError, ValueError):
            continue
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            if dtype is not None and name in loaded:
                stored[name] = dtype
    return {**loaded, **stored}


@contextmanager
def saved_as(
    module: torch.nn.Module, dtypes: dict[str, torch.dtype], originals: dict[str, torch.Tensor] | None = None
):
    """Temporarily give `module`'s parameters and buffers the recorded `dtypes` (to save them as loaded), then
    put back exactly the tensors it had.

    Args:
        module: the module to save.
        dtypes: name -> dtype, as `float_dtypes` or `stored_dtypes` recorded it at load; other tensors are
            left as they are.
        originals: name -> the tensor as it was before the module was cast down (`Diffusion.cast_frozen`):
            saved instead where the module still holds exactly its down-cast, so a frozen part is saved bit for
            bit as it came in.
    """
    originals = originals or {}
    swapped = []
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in tensors:
        want = dtypes.get(name)
        if want is None or tensor.dtype == want:
            continue
        source = tensor.data
        original = originals.get(name)
        if original is not None and original.shape == tensor.shape:
            original = original.to(tensor.device)
            if torch.equal(original.to(tensor.dtype), tensor.data):  # unchanged since it was cast down
                source = original
        stored = source.to(want)
        swapped.append((tensor, tensor.data))
        tensor.data = stored
    try:
        yield module
    finally:
        for tensor, data in swapped:
            tensor.data = data


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict atomically as safetensors, or as a plain-tensor torch file for `.pt/.pth/.bin`."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_untie(state), str(tmp))
        else:
            torch.save(state, str(tmp))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own storage."""
    seen, out = set(), {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success move it onto `path` (files or folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
