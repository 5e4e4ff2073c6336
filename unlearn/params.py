"""Parameter selection and masks: which weights an unlearning run may change."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from .checkpoints import load_state_dict, save_state_dict
from .errors import ConfigError


def select(module: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """Parameters of `module` whose names match any glob pattern (all parameters when `patterns` is None)."""
    named = dict(module.named_parameters())
    if patterns is None:
        return named
    patterns = list(patterns)
    chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise ConfigError(f"no parameter name matches {patterns}; names look like {list(named)[:4]}")
    return chosen


class ParamMask:
    """A boolean mask per parameter: True where the weight may change, False where it is pinned.

    `fit()` multiplies gradients by the mask and, after every optimizer step, puts pinned entries back to
    their value at the start and clears their optimizer state, so neither weight decay nor momentum can move
    them (the bug of the SalUn reference code before its PR #33).
    """

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = {name: mask.bool() for name, mask in masks.items()}

    def __len__(self) -> int:
        return len(self.masks)

    def density(self) -> float:
        """Share of the masked parameters' entries that may change."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def __and__(self, other: ParamMask) -> ParamMask:
        """Weights that both masks let change (a parameter named by one mask only keeps that mask)."""
        masks = dict(self.masks)
        for name, keep in other.masks.items():
            masks[name] = masks[name] & keep if name in masks else keep
        return ParamMask(masks)

    def check(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                raise ConfigError(f"mask names parameter {name!r}, which the model does not have")
            if params[name].shape != mask.shape:
                raise ConfigError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(params[name].shape)}"
                )

    def save(self, path) -> None:
        save_state_dict({n: m.to(torch.uint8) for n, m in self.masks.items()}, path)

    @classmethod
    def load(cls, path) -> ParamMask:
        return cls(load_state_dict(path))


@torch.no_grad()
def apply_mask(module: nn.Module, mask: ParamMask) -> None:
    """Set the pinned (False) entries of `module`'s masked parameters to exactly +0.0, in place (pruning)."""
    mask.check(module)
    params = dict(module.named_parameters())
    for name, keep in mask.masks.items():
        param = params[name]
        param.masked_fill_(~keep.to(param.device), 0.0)


def saliency_mask(
    model: nn.Module, loss_fn, batches, sparsity: float = 0.5, max_grad_norm: float | None = None
) -> ParamMask:
    """SalUn's weight saliency: the weights where the forgetting loss is most sensitive.

    As the reference code computes it (`generate_mask.py`; reference/methods.md §1.2): the model in eval mode,
    the gradient of `loss_fn(model, batch)` summed over all `batches` (a signed sum), then its magnitude ranked
    globally over every parameter of `model.trainable`; the largest `1 - sparsity` share may change, the rest
    is pinned. The reference names its masks by the share kept: sparsity s is its `with_{1 - s}.pt` (0.5 =
    `with_0.5.pt`, the threshold at the global median; 0.8 = `with_0.2.pt`). Ties at the threshold are broken
    by `torch.topk` here and by `argsort` there, so only entries with exactly equal |gradient| can differ.

    Args:
        model: a family adapter (its `trainable` part is masked).
        loss_fn: `loss_fn(model, batch) -> Tensor`, the forgetting loss (e.g. -CE on the forget set).
        batches: an iterable of batches on the model's device.
        sparsity: share of the entries that are pinned, in [0, 1) (the reference's `with_{1 - sparsity}.pt`).
        max_grad_norm: clip each batch's gradient to this norm before summing (the DDPM reference does, over
            all parameters; here over the `trainable` parameters that require a gradient).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"saliency sparsity must lie in [0, 1), got {sparsity}")
    trainable = getattr(model, "trainable", model)
    params = {n: p for n, p in trainable.named_parameters() if p.requires_grad}
    summed = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        for name, param in params.items():
            if param.grad is not None:
                summed[name] += param.grad
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    magnitude = torch.cat([g.abs().flatten() for g in summed.values()])
    keep_count = int(magnitude.numel() * (1.0 - sparsity))
    flat = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    flat[torch.topk(magnitude, keep_count, sorted=False).indices] = True
    masks, start = {}, 0
    for name, grad in summed.items():
        masks[name] = flat[start : start + grad.numel()].view_as(grad).cpu()
        start += grad.numel()
    return ParamMask(masks)
