"""Safe reading and atomic writing of checkpoints.

Weights load from safetensors, or from `.pt/.pth/.bin` with `torch.load(weights_only=True)`: a pickle that
carries code is refused before anything in it runs, and so is a model folder that names Python code of its own
(`refuse_custom_code`). Every file is written to a temporary name in the target folder and moved into place, so
a crash never leaves half a file and an input is never touched. Outputs keep the dtype of each tensor as it
came in (`float_dtypes` / `stored_dtypes` at load, `saved_as` at save).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import stat
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import CheckpointError, CheckpointNotFoundError, OutputError, UnlearnError
from .paths import output_error, shown

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def require_file(
    path: str | Path, what: str = "checkpoint", error: type[Exception] = CheckpointError
) -> Path:
    """`path` as a regular, readable file, checked before anything opens it: a FIFO or a device (`/dev/zero`)
    would block or never end, a folder is not a file.

    Raises:
        CheckpointNotFoundError: nothing is there (or a symlink points nowhere).
        CheckpointError (or `error`): it is a folder, a FIFO, a device or a socket, or it cannot be read.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:  # a symlink loop, a name too long, a folder that cannot be searched
        raise error(
            f"{what} {str(path)!r} cannot be read ({err.strerror or err}); give the path of a readable file"
        ) from None
    if stat.S_ISDIR(mode):
        raise error(f"{what} {str(path)!r} is a folder; give the path of a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise error(
            f"{what} {str(path)!r} is {kind}, not a regular file; unlearn reads only regular files (copy the "
            "data into one)"
        )
    if not os.access(path, os.R_OK):
        raise error(f"{what} {str(path)!r} is not readable (permission denied); make it readable")
    return path


# What `torch.load(weights_only=True)` raises on a corrupt, truncated or foreign file (its unpickler and its
# zip reader check little and fail wherever the bytes stop making sense).
_CORRUPT = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    OverflowError,
    struct.error,
)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a weights-only torch file, unwrapping common nestings."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a folder; expected a weights file {WEIGHT_SUFFIXES}"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has suffix {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}"
        )
    require_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is an empty file; give the weights file itself")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({_first_line(err)}); "
                "it is corrupt or truncated"
            ) from err
    with open(path, "rb") as handle:
        magic = handle.read(4)
    # A torch file is a zip archive (torch >= 1.6) or a legacy pickle (protocol 2+: it starts with 0x80).
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a torch file (neither a zip archive nor a pickle); give a file "
            "written by torch.save or safetensors"
        )
    import warnings

    try:
        # garbage with a pickle-like start makes torch warn about its pickle protocol before it fails
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # a class or function to import: code
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds pickled objects beyond plain tensors; refusing to unpickle "
                "code (re-save it as a state dict or as safetensors)"
            ) from err
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or holds pickled objects beyond plain tensors; it was refused "
            "unread (re-save it as a state dict or as safetensors)"
        ) from err
    except _CORRUPT as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt, truncated or not a torch file ({_first_line(err)}); "
            "re-save it with torch.save(model.state_dict()) or as safetensors"
        ) from err
    return _unwrap(state, path)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def load_errors() -> tuple[type[BaseException], ...]:
    """What transformers and diffusers raise on a model folder whose files are wrong rather than on a bug: a
    config.json field of the wrong type (huggingface_hub's strict dataclasses, or a TypeError where a layer is
    built from it), an unknown model_type, weights of other shapes, a corrupt safetensors file."""
    from safetensors import SafetensorError

    errors: tuple[type[BaseException], ...] = (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RuntimeError,
        SafetensorError,
    )
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:  # an older huggingface_hub: configs are not validated, layers fail with TypeError
        pass
    return errors


def reason_of(err: BaseException) -> str:
    """A library's error message on one short line."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if (
        not isinstance(state, dict)
        or not all(isinstance(v, torch.Tensor) for v in state.values())
        or not all(isinstance(k, str) for k in state)
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not hold a state dict of tensors (names to tensors); re-save it "
            "with torch.save(model.state_dict())"
        )
    odd = next((k for k, v in state.items() if v.layout != torch.strided or v.is_quantized), None)
    if odd is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds {odd} as a {state[odd].layout} tensor"
            f"{' (quantized)' if state[odd].is_quantized else ''}; "
            "re-save it with dense tensors (tensor.to_dense(), tensor.dequantize())"
        )
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
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "give the architecture it was saved from (model.arch, --arch)"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"checkpoint {source!r} does not fit the architecture: {name} has shape "
                f"{tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}; give the architecture and "
                "number of classes it was saved with"
            )
        if own[name].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"checkpoint {source!r} holds {name} as {tensor.dtype}, the model expects floating-point weights; "
                "re-save it with the model's own dtypes"
            )
    refuse_nonfinite(state, source)
    module.load_state_dict(state)


_ISFINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def refuse_nonfinite(tensors: torch.nn.Module | dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinite values, naming the first such tensor: a model that computes NaN
    can be neither unlearned nor scored (training would stop at its first loss, scoring would fail later).

    Raises:
        CheckpointError: a floating-point tensor holds a NaN or an infinity.
    """
    state = tensors.state_dict() if isinstance(tensors, torch.nn.Module) else tensors
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if tensor.dtype not in _ISFINITE_DTYPES and not tensor.is_complex():
                tensor = tensor.float()  # float8: torch.isfinite has no kernel for it
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = tensor[~finite]
                what = "NaN" if bool(torch.isnan(bad).any()) else "infinite"
                raise CheckpointError(
                    f"checkpoint {source!r} holds {what} values in {name} ({int(bad.numel())} of "
                    f"{tensor.numel()}); the model is broken (a diverged training run?), give a checkpoint "
                    "with finite weights"
                )


def refuse_custom_code(folder: str | Path) -> None:
    """Refuse, in one sentence and before anything loads, a model folder that would make transformers or
    diffusers import Python code shipped with it.

    Custom code is named through `auto_map` in any JSON config of the folder or of its component folders
    (transformers' remote-code classes), or through `model_index.json`: a pipeline class given as
    [module, class], or a component whose library is not diffusers or transformers (a module file beside the
    weights). Loaders are also called with `trust_remote_code=False`, so transformers never asks on a terminal.

    Also refuses, first, a folder holding a FIFO, a device or a socket (`refuse_special_files`).

    Raises:
        CheckpointError: the folder names custom code.
    """
    folder = Path(folder)
    refuse_special_files(folder)
    reason = _custom_code(folder)
    if reason:
        raise CheckpointError(
            f"refusing checkpoint {str(folder)!r}: {reason}, and unlearn never runs custom code from a "
            "checkpoint (re-save the model with a standard transformers or diffusers class)"
        )


def refuse_special_files(folder: str | Path, what: str = "model folder") -> None:
    """Refuse a folder holding (or linking to) a FIFO, a device or a socket anywhere inside, before a loader
    opens it: reading one would block forever or never end.

    Raises:
        CheckpointError: such an entry, named.
    """
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            entry = Path(root) / name
            try:
                mode = os.stat(entry).st_mode
            except OSError:  # a dangling symlink: the loader says what is missing if it needs it
                continue
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                raise CheckpointError(
                    f"{what} {str(folder)!r} holds {str(entry.relative_to(folder))!r}, which is not a regular "
                    "file (a FIFO, device or socket); remove it"
                )


def _custom_code(folder: Path) -> str | None:
    """Why `folder` names custom code, or None."""
    index = _read_json(folder / "model_index.json")
    folders = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]
    if index is not None and not isinstance(index, dict):
        raise CheckpointError(
            f"{str(folder / 'model_index.json')!r} is not a JSON mapping; the folder is corrupt"
        )
    for config in (file for part in folders for file in sorted(part.glob("*.json"))):
        if not config.is_file():
            continue
        if b"auto_map" in config.read_bytes():
            parsed = _read_json(config)
            auto_map = parsed.get("auto_map") if isinstance(parsed, dict) else None
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
    return read_json_file(path)


MAX_CONFIG_BYTES = 10_000_000  # a model's JSON config is kilobytes (a tokenizer's vocabulary a few megabytes)


def read_json_file(path: str | Path, what: str = "config file"):
    """The JSON content of a model folder's config file, read safely: a regular file (not a FIFO or device), at
    most `MAX_CONFIG_BYTES`, valid UTF-8 JSON.

    Raises:
        CheckpointNotFoundError: nothing is at `path`.
        CheckpointError: anything else wrong with it, in one sentence.
    """
    path = require_file(path, what)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{what} {str(path)!r} is larger than {MAX_CONFIG_BYTES:,} bytes, too large for a model config; "
            "give the model's own config file"
        )
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8; RecursionError: see below
        raise CheckpointError(
            f"{str(path)!r} is not valid JSON ({_first_line(err)}); fix or re-save it"
        ) from err
    except RecursionError as err:  # [[[[...]]]] nested deeper than Python's stack
        raise CheckpointError(f"{str(path)!r} nests its JSON too deeply; fix or re-save it") from err


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
    """Write a state dict atomically as safetensors, or as a plain-tensor torch file for `.pt/.pth/.bin`.

    Raises:
        OutputError: the file cannot be written (no space left, a read-only file system, no permission).
    """
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


# The temporaries of `atomic_path` beside their target NAME: `.NAME.XXXXXXXX` (tempfile.mkdtemp's 8 characters:
# it holds at most NAME itself) and `.NAME.old<pid>` (the previous version of a folder being replaced).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<random>[a-z0-9_]{8})|old\d+)$")
# What torch.save's zip writer raises when a write fails: no errno, only its C++ enforce message (a full disk
# reads "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534").
_TORCH_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter", "file write failed")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success move it onto `path` (files or folders).

    The temporary (`.NAME.XXXXXXXX/NAME`) is removed whatever happens, so a failed write leaves the previous
    version of `path` as it was and nothing half-written; a killed process leaves its temporary behind, which
    `remove_temporaries` clears (a run folder does when it is opened again). What is moved onto `path` gets the
    permissions a plain `open()` or `mkdir` would give it (`honour_umask`), whatever the writer chose:
    safetensors writes its files 0600.

    Raises:
        OutputError: the write failed for want of space, permission or a writable file system, whether the
            code writing into the temporary or the move failed (one sentence naming `path`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    except OSError as err:
        if isinstance(err, UnlearnError):
            raise
        raise write_error(path, err) from None
    try:
        yield tmp
        honour_umask(tmp)
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # the previous version goes back where it was
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except UnlearnError:
        raise
    except (OSError, RuntimeError, SafetensorError) as err:  # only a failed write becomes an OutputError
        error = _write_fault(path, tmp.parent, err)
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (`/proc/self/status`); elsewhere set
    and put back at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(tmp: Path) -> None:
    """Give the file or folder tree `tmp` the permissions a plain `open()` / `mkdir` gives under the current
    umask (0644 files and 0755 folders under umask 022; executables keep their execute bits), so weight files
    are as readable as the rest of the run folder whichever library wrote them. Symlinks are left alone."""
    mask = current_umask()

    def fix(entry: str) -> None:
        mode = os.lstat(entry).st_mode
        if stat.S_ISLNK(mode):
            return
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        want = full & ~mask
        if stat.S_IMODE(mode) != want:
            os.chmod(entry, want)

    if not os.path.lexists(tmp):
        return
    fix(str(tmp))
    if tmp.is_dir() and not tmp.is_symlink():
        for root, dirs, files in os.walk(tmp):
            for name in [*dirs, *files]:
                fix(os.path.join(root, name))


def _write_fault(path: Path, scratch: Path, err: BaseException) -> OutputError | None:
    """The OutputError for `err` raised while writing `path` (through the temporary folder `scratch`), or None
    when `err` is not a failed write: a bug, or a read of an input, propagates unchanged."""
    if isinstance(err, OSError):
        if err.errno in _FULL or err.errno == errno.EROFS:
            return write_error(path, err)
        if err.errno is None:
            return None
        if not err.filename:  # a writer that does not say which file (numpy, PIL): the one being written
            return write_error(path, err)
        name = os.path.abspath(os.fsdecode(err.filename))
        places = [os.path.abspath(place) for place in (scratch, path)]
        ours = name == os.path.abspath(path.parent) or any(
            name == place or name.startswith(place + os.sep) for place in places
        )
        return write_error(path, err) if ours else None  # else an input's error: its reader says what
    text = str(err)
    if isinstance(err, SafetensorError):  # "I/O error: No space left on device (os error 28)"
        found = re.search(r"os error (\d+)", text)
        if found:
            code = int(found.group(1))
            return write_error(path, OSError(code, os.strerror(code)))
        return None
    if isinstance(err, RuntimeError) and any(mark in text for mark in _TORCH_WRITE_FAILURE):
        try:
            usage = os.statvfs(scratch if scratch.exists() else path.parent)
            full = usage.f_bavail * usage.f_frsize < max(1 << 20, sum(_sizes(scratch)))
        except OSError:
            full = False
        if full:
            return write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return OutputError(
            f"cannot write {shown(path)}: torch's file writer failed ({_first_line(err)}); check the disk it is "
            "on and rerun the same command (the last good checkpoint is kept)"
        )
    return None


def _sizes(folder: Path):
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                yield os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass


def mount_point(path: str | Path) -> str:
    """The mount point of the file system `path` is (or would be) on."""
    here = os.path.abspath(path)
    while not os.path.ismount(here):
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return here


def write_error(path: str | Path, err: OSError) -> OutputError:
    """The one-sentence `OutputError` for an OSError met while writing the output `path`: a full disk names the
    file system and says that the last good checkpoint is kept; the other causes (a read-only file system, no
    permission, a name too long, ...) are worded as `unlearn.paths.output_error` words them."""
    path = Path(path)
    if err.errno in _FULL:
        return OutputError(
            f"no space left on the file system mounted at {mount_point(path.parent)!r} while writing "
            f"{shown(path)}; the last good checkpoint is kept: free some space and rerun the same command to "
            "resume"
        )
    if err.filename and f"{os.sep}.{path.name}." in os.fsdecode(err.filename):  # a temporary: name the target
        err = OSError(err.errno, err.strerror, str(path))
    error = output_error(path, err, "make it writable or choose another -o, and rerun the same command")
    return error if isinstance(error, OutputError) else OutputError(str(error))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove what killed atomic writes left under `folder` (`.NAME.XXXXXXXX` folders holding at most NAME, and
    `.NAME.old<pid>` folders), not descending into nested run folders (a `reference/` holding its own run.json
    cleans its own) nor following symlinks; returns what was removed. Only for a folder whose lock the caller
    holds: another writer's temporaries would look the same."""
    folder = Path(folder)
    removed = []
    for root, dirs, _ in os.walk(folder):
        here = Path(root)
        if here != folder and (here / "run.json").exists():
            dirs[:] = []
            continue
        keep = []
        for name in dirs:
            match = _TEMPORARY.match(name)
            entry = here / name
            if match and not entry.is_symlink():
                try:
                    inside = os.listdir(entry)
                except OSError:
                    inside = None
                if inside is not None and (not match.group("random") or set(inside) <= {match.group("name")}):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                    continue
            keep.append(name)
        dirs[:] = keep
    return removed


def write_json(obj, path: str | Path) -> None:
    """Write `obj` as indented JSON, atomically (`atomic_path`; raises `OutputError` when it cannot)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(text: str, path: str | Path) -> None:
    """Write `text` atomically (`atomic_path`; raises `OutputError` when it cannot)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
