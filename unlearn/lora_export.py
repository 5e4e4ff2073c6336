"""A diffusion run's UNet edit as files the ecosystem loads: a diffusers LoRA, and the changed tensors.

Whatever the method (a LoRA merged into the UNet, a full-weight fine-tune, a closed-form rewrite), the edit is
the difference between the UNet after and before. `export_lora` writes it as a diffusers LoRA that a stock
pipeline loads with `pipe.load_lora_weights(folder)`:

- each changed weight of a Linear or Conv2d layer becomes LoRA factors through a truncated SVD of its delta
  (a conv kernel is flattened to out × in·kh·kw, as peft's conv LoRA composes it). The rank is the smallest
  whose relative Frobenius error ||BA − Δ|| / ||Δ|| is within `tolerance`, so every layer meets it (the full
  rank reproduces any delta). An edit that is low-rank by construction (a merged LoRA, UCE's closed form) is
  found at its own small rank; a full-weight fine-tune (ESD, SalUn) usually needs a rank near full, and then
  its factors hold more numbers than the delta itself: the result says which layers, and `edit.safetensors`
  is the smaller file for them.
- a changed bias of such a layer travels as the LoRA's `lora_B.bias` (peft's `lora_bias`, which diffusers
  loads); a layer whose bias alone changed gets rank-1 zero factors to carry it.
- every other changed tensor (norms, embeddings) cannot be carried by a LoRA: it is listed, in the result and
  in the file's metadata, as not reproduced.

Every factor gets alpha = rank (scale 1), so the loaded UNet computes W x + B A x (+ b_B). `save_edit` writes the
changed tensors themselves (`edit.safetensors`). Both files carry safetensors metadata saying what they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import atomic_path
from .errors import ConfigError

LORA_FOLDER = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name: `load_lora_weights(folder)`
DEFAULT_TOLERANCE = 1e-3


@dataclass
class LayerFit:
    """How one layer's weight delta was factorized.

    Attributes:
        name: the module's name in the UNet.
        rank: the LoRA rank written.
        error: the achieved relative Frobenius error ||BA − Δ|| / ||Δ|| (0 for a bias-only change).
        full_rank: the delta's largest possible rank (min of its flattened dimensions).
        larger_than_delta: the factors hold more numbers than the delta (r·(out + k) > out·k): the edit is
            not low-rank, and the LoRA is a faithful but not a compact form of it.
    """

    name: str
    rank: int
    error: float
    full_rank: int
    larger_than_delta: bool


@dataclass
class LoraExport:
    """What `export_lora` wrote and how faithful it is."""

    path: Path
    tolerance: float
    layers: list[LayerFit]
    not_carried: list[str] = field(default_factory=list)  # changed tensors no LoRA can hold
    # False when bias changes travel as lora_B.bias (peft's lora_bias) and some targeted layer has no bias of
    # its own: diffusers then runs the LoRA but cannot fuse it into the weights
    fusable: bool = True

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    @property
    def inexact(self) -> list[LayerFit]:
        """The layers whose error exceeds the tolerance (none but for rounding to fp32: the rank can be full)."""
        return [layer for layer in self.layers if layer.error > self.tolerance]

    @property
    def exact(self) -> bool:
        """Every changed tensor is reproduced within the tolerance."""
        return not self.inexact and not self.not_carried

    def summary(self) -> str:
        """One line for the log and the report."""
        if not self.layers:
            text = "no Linear or Conv2d tensor changed: no LoRA file written"
        else:
            ranks = sorted(layer.rank for layer in self.layers)
            span = f"rank {ranks[0]}" if ranks[0] == ranks[-1] else f"ranks {ranks[0]}–{ranks[-1]}"
            text = (
                f"{len(self.layers)} layer(s), {span}, largest relative error {self.max_error:.2e} "
                f"(tolerance {self.tolerance:g})"
            )
        if not self.fusable:
            text += (
                "; bias changes travel as lora_B.bias: the LoRA loads and runs, but diffusers cannot fuse it "
                "(fuse_lora) into the targeted layers that have no bias"
            )
        if self.inexact:
            names = ", ".join(f"{layer.name} ({layer.error:.2e})" for layer in self.inexact[:5])
            more = f" and {len(self.inexact) - 5} more" if len(self.inexact) > 5 else ""
            text += f"; INEXACT: {len(self.inexact)} layer(s) miss the tolerance: {names}{more}"
        large = [layer for layer in self.layers if layer.larger_than_delta]
        if large:
            text += (
                f"; NOT LOW-RANK: {len(large)} layer(s) need ranks near full (up to "
                f"{max(layer.rank for layer in large)}), so their factors are larger than the changed weights "
                "(edit.safetensors is the compact form of those)"
            )
        if self.not_carried:
            names = ", ".join(self.not_carried[:5]) + (" ..." if len(self.not_carried) > 5 else "")
            text += (
                f"; NOT CARRIED: {len(self.not_carried)} changed tensor(s) a LoRA cannot hold (use "
                f"edit.safetensors or model/ for them): {names}"
            )
        return text


def factorize(
    delta: torch.Tensor, tolerance: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, LayerFit]:
    """LoRA factors (up B: out × r [× 1 × 1], down A: r × in [× kh × kw]) of a Linear or Conv2d weight delta.

    The rank is the smallest whose truncation error is within `tolerance` (relative Frobenius), at most the
    full rank min(out, k) of the out × k flattened delta, which reproduces it. The singular values are split evenly between the factors (B = U√S, A = √S Vᵀ), so neither factor
    is badly scaled. The returned fit's `name` is empty. Computed in float64 on `device` (a GPU makes the SVDs
    of a Stable Diffusion UNet's layers quick); the factors come back fp32, on the CPU.
    """
    if not 0 <= tolerance < 1:
        raise ConfigError(f"the LoRA tolerance must be in [0, 1), got {tolerance!r}")
    shape = delta.shape
    matrix = delta.detach().to(device=device, dtype=torch.float64).reshape(shape[0], -1)
    out, k = matrix.shape
    full_rank = min(out, k)
    norm = torch.linalg.matrix_norm(matrix)
    if norm == 0:
        up, down = matrix.new_zeros(out, 1), matrix.new_zeros(1, k)
        rank = 1
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        # tail[r] = the relative error of keeping the first r singular values (Eckart-Young)
        tail = (s.flip(0) ** 2).cumsum(0).flip(0).sqrt() / norm
        tail = torch.cat([tail, tail.new_zeros(1)])
        rank = max(int(torch.nonzero(tail <= tolerance)[0]), 1)
        root = s[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    error = float(torch.linalg.matrix_norm(up @ down - matrix) / norm) if norm > 0 else 0.0
    up, down = up.float().cpu(), down.float().cpu()
    if len(shape) == 4:  # a conv kernel: A is a conv of the layer's kernel size, B a 1 × 1 conv
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *shape[1:])
    larger = rank * (out + k) > out * k
    return up.contiguous(), down.contiguous(), LayerFit("", rank, error, full_rank, larger)


def loraable(module: nn.Module) -> bool:
    """A layer peft's LoRA wraps and diffusers loads for a UNet: a Linear, or an ungrouped Conv2d."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


@torch.no_grad()
def export_lora(
    unet: nn.Module,
    before: dict[str, torch.Tensor],
    path: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    metadata: dict[str, str] | None = None,
    prefix: str = "unet",
) -> LoraExport:
    """Write the edit `unet` now carries over the state dict `before` as a diffusers LoRA file (atomically).

    Args:
        unet: the edited UNet (plain diffusers modules, no peft layers).
        before: its state dict before the edit (same names).
        path: the `.safetensors` file to write; `pipe.load_lora_weights(path.parent, weight_name=path.name)`
            loads it (`load_lora_weights(folder)` alone when the name is `pytorch_lora_weights.safetensors`).
        tolerance: the relative Frobenius error each layer's factors must meet (see `factorize`).
        metadata: extra safetensors metadata (what the file is: method, concept, base model, ...).
        prefix: the pipeline component the LoRA is for.

    Returns:
        The export's layers, their ranks and errors, and the changed tensors it could not carry.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"a LoRA is exported as .safetensors, not {path.name!r}")
    after = unet.state_dict()
    changed = [n for n, t in after.items() if n in before and not torch.equal(t.cpu(), before[n].cpu())]
    modules = dict(unet.named_modules())
    targets: dict[str, set[str]] = {}  # module -> its changed tensors ("weight", "bias")
    not_carried = []
    for name in changed:
        owner, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and owner in modules and loraable(modules[owner]):
            targets.setdefault(owner, set()).add(leaf)
        else:
            not_carried.append(name)

    def delta(name: str) -> torch.Tensor:  # one at a time: a whole UNet's deltas in float64 would not fit
        return after[name].detach().double().cpu() - before[name].double().cpu()

    with_bias = any("bias" in parts for parts in targets.values())
    tensors, fits, ranks = {}, [], {}
    for owner, parts in sorted(targets.items()):
        layer = modules[owner]
        weight = delta(f"{owner}.weight") if "weight" in parts else torch.zeros(layer.weight.shape)
        up, down, fit = factorize(weight, tolerance, layer.weight.device)
        fit.name = owner
        fits.append(fit)
        ranks[owner] = fit.rank
        tensors[f"{prefix}.{owner}.lora_A.weight"] = down
        tensors[f"{prefix}.{owner}.lora_B.weight"] = up
        if with_bias:
            bias = delta(f"{owner}.bias") if "bias" in parts else torch.zeros(layer.weight.shape[0])
            tensors[f"{prefix}.{owner}.lora_B.bias"] = bias.float().contiguous()
    fusable = not with_bias or all(modules[owner].bias is not None for owner in targets)
    result = LoraExport(path, tolerance, fits, not_carried, fusable)
    common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    config = {  # the peft LoraConfig diffusers builds when loading (its `lora_adapter_metadata`)
        "r": common,
        "lora_alpha": common,
        "rank_pattern": {n: r for n, r in ranks.items() if r != common},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != common},  # alpha = rank: scale 1
        "target_modules": sorted(ranks),
        "lora_bias": with_bias,
    }
    described = {
        "unlearn.format": "diffusers LoRA of a UNet edit",
        "unlearn.load": f"pipe.load_lora_weights(folder, weight_name={path.name!r})",
        "unlearn.lora_tolerance": f"{tolerance:g}",
        "unlearn.lora_max_relative_error": f"{result.max_error:.3e}",
        "unlearn.lora_exact": json.dumps(result.exact),
        "unlearn.lora_layers": json.dumps(
            {f.name: {"rank": f.rank, "relative_error": float(f"{f.error:.3e}")} for f in fits}
        ),
        "unlearn.lora_inexact_layers": json.dumps([f.name for f in result.inexact]),
        "unlearn.lora_not_low_rank_layers": json.dumps([f.name for f in fits if f.larger_than_delta]),
        "unlearn.not_carried": json.dumps(not_carried),
        **(metadata or {}),
    }
    if not tensors:  # nothing a LoRA holds changed: an empty LoRA would not load, so the file is not written
        return result
    file_metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
        **described,
    }
    write_safetensors(tensors, path, file_metadata)
    return result


def save_edit(
    unet: nn.Module, before: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> list[str]:
    """Write the UNet tensors that differ from `before`, under their diffusers names, with `metadata`
    (atomically); returns their names. Load them over the base UNet with `load_state_dict(..., strict=False)`."""
    after = unet.state_dict()
    changed = {
        n: t.detach().cpu()
        for n, t in after.items()
        if n not in before or not torch.equal(t.detach().cpu(), before[n])
    }
    described = {
        "unlearn.format": "UNet edit: the changed tensors' full values, diffusers names",
        "unlearn.load": "unet.load_state_dict(load_file(path), strict=False) over the base UNet",
        **(metadata or {}),
    }
    write_safetensors(changed, Path(path), {"format": "pt", **described})
    return sorted(changed)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file` with string metadata, written atomically (each tensor on its own storage)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order: which base model an edit
    applies to."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
