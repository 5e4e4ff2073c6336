"""Safe reading and atomic writing of checkpoints.

Weights load from safetensors, or from `.pt/.pth/.bin` with `torch.load(weights_only=True)`: a pickle that
carries code is refused before anything in it runs. Every file is written to a temporary name in the target
folder and moved into place, so a crash never leaves half a file and an input is never touched.
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
