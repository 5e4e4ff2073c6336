"""Weight pruning for "prune first, then unlearn" ("Model Sparsity Can Simplify Machine Unlearning", §2).

The reference code (`pruner/utils.py:pruning_model`) prunes with
`torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured, amount=rate)` over the weights of
every `nn.Conv2d` (linear layers, batch norm and biases are never pruned). This module does the same ranking
with plain tensors and returns a `ParamMask` (True = the weight survives and may change, False = pruned):

- `magnitude_mask` ranks |w| of all in-scope weights together and keeps the largest (1 - sparsity) share;
  given a previous mask, it prunes a share of the *surviving* weights, as torch's pruning container does when
  `global_unstructured` is called again on an already pruned model.
- `apply_mask` zeroes the pruned entries; `fit(..., mask=...)` then keeps them at exactly 0.0 (it pins masked
  entries to their start value), which replaces the reference's `prune.CustomFromMask` forward hooks.
- `omp` is one-shot magnitude pruning of a trained model; `imp` is iterative magnitude pruning with rewinding.

Naming: `sparsity` here (and in a recipe's `model.prune`) is the share of in-scope weights PRUNED, the same number
as the reference's `--rate` and torch's `amount` (0.95 = 95 % of the conv weights set to zero). The reference's
`check_sparsity` prints the other share, the "remain weight ratio" 100·(1 − rate) %; and SalUn's mask files
`with_<ratio>.pt` name the share KEPT, which is 1 − sparsity of SalUn's own `sparsity` field. Parity with the
reference's `pruning_model` (masks identical entry for entry, rounds 1 and 2) is tested in
tests/test_fidelity_gan_sparse_ant.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .errors import ConfigError
from .params import ParamMask, apply_mask

SCOPES = ("conv", "conv+linear", "all")


def prunable(module: nn.Module, scope: str = "conv") -> dict[str, nn.Parameter]:
    """The weights `scope` prunes, by name relative to `module`.

    Args:
        module: the network (for a classifier adapter, `model.trainable`).
        scope: "conv" (the weights of every `nn.Conv2d`, the reference's choice), "conv+linear" (also every
            `nn.Linear` weight) or "all" (every parameter with more than one dimension).
    """
    if scope not in SCOPES:
        raise ConfigError(f"unknown pruning scope {scope!r}; known: {', '.join(SCOPES)}")
    if scope == "all":
        chosen = {name: p for name, p in module.named_parameters() if p.dim() > 1}
    else:
        kinds = (nn.Conv2d,) if scope == "conv" else (nn.Conv2d, nn.Linear)
        chosen = {}
        for prefix, sub in module.named_modules():
            if isinstance(sub, kinds) and isinstance(getattr(sub, "weight", None), nn.Parameter):
                chosen[f"{prefix}.weight" if prefix else "weight"] = sub.weight
    if not chosen:
        raise ConfigError(f"the model has no weights in pruning scope {scope!r}")
    return chosen


@torch.no_grad()
def magnitude_mask(
    module: nn.Module, sparsity: float, scope: str = "conv", previous: ParamMask | None = None
) -> ParamMask:
    """Global unstructured L1 magnitude pruning: keep the largest |w| of all in-scope weights together.

    Args:
        module: the network whose weights are ranked (names in the mask are relative to it).
        sparsity: share of the weights to prune, in [0, 1] (the reference's `--rate`, not the share kept).
            Without `previous`, the share of all in-scope
            weights; with `previous`, the share of the weights `previous` keeps (torch's `amount` semantics
            on an already pruned model). The count is `round(sparsity * n)`, as in torch's `L1Unstructured`.
        scope: see `prunable`. Parameters outside the scope get no mask entry (they stay free).
        previous: the mask of an earlier pruning round; its pruned entries stay pruned.

    Returns:
        A `ParamMask` with one entry per in-scope weight. Ties at the threshold are broken by `torch.topk`.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"pruning sparsity must lie in [0, 1], got {sparsity}")
    weights = prunable(module, scope)
    if previous is not None:
        missing = set(weights) - set(previous.masks)
        if missing:
            raise ConfigError(f"the previous mask lacks the in-scope weights {sorted(missing)}")
    scores, alive = [], []
    for name, weight in weights.items():
        scores.append(weight.detach().abs().flatten().float())
        keep = previous.masks[name].to(weight.device) if previous is not None else None
        alive.append(keep.flatten() if keep is not None else torch.ones_like(scores[-1], dtype=torch.bool))
    scores, alive = torch.cat(scores), torch.cat(alive)
    to_prune = round(sparsity * int(alive.sum()))
    keep = alive.clone()
    if to_prune:
        # Already pruned entries rank above every surviving one, so they are never counted twice.
        ranked = torch.where(alive, scores, torch.full_like(scores, float("inf")))
        keep[torch.topk(ranked, k=to_prune, largest=False).indices] = False
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start : start + weight.numel()].view_as(weight).cpu()
        start += weight.numel()
    return ParamMask(masks)


@torch.no_grad()
def sparsity(module: nn.Module, mask: ParamMask) -> float:
    """The measured share of zeros among the entries of the parameters `mask` names."""
    mask.check(module)
    params = dict(module.named_parameters())
    zeros = sum(int((params[name] == 0).sum()) for name in mask.masks)
    total = sum(params[name].numel() for name in mask.masks)
    return zeros / max(total, 1)


def omp(model: nn.Module, sparsity: float = 0.95, scope: str = "conv") -> ParamMask:
    """One-shot magnitude pruning (OMP) of a trained model, in place; returns the mask.

    Zeroes the smallest-|w| `sparsity` share of the in-scope weights of `model.trainable` (or of `model` itself
    for a bare module). Run any unlearning method on the result with `fit(..., mask=mask)`; the pruned
    weights then stay exactly zero.

    `sparsity` is the share pruned, the reference's `--rate` (0.95: 5 % of the conv weights survive).
    The reference's OMP (`main_imp.py --rate 0.95 --pruning_times 2`, Unlearn-Sparse issue #2) also rewinds
    and retrains once after pruning; that is `imp(..., rounds=1, rate=sparsity)`. `omp` prunes the trained
    weights without retraining.
    """
    trainable = getattr(model, "trainable", model)
    mask = magnitude_mask(trainable, sparsity, scope)
    apply_mask(trainable, mask)
    return mask


TrainFn = Callable[[nn.Module, ParamMask, int], object]


def imp(
    model: nn.Module,
    data: Dataset | None,
    accelerator=None,
    *,
    rounds: int,
    rewind_state: Mapping[str, torch.Tensor],
    rate: float = 0.2,
    epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_schedule: str = "cosine",
    augment: str = "none",
    scope: str = "conv",
    train_fn: TrainFn | None = None,
) -> ParamMask:
    """Iterative magnitude pruning with rewinding (IMP, lottery-ticket style), in place; returns the mask.

    Each round r = 0 .. rounds - 1:
        1. prune `rate` of the surviving in-scope weights of the trained model (global magnitude ranking);
        2. rewind: load `rewind_state` into `model.trainable` and zero the pruned entries;
        3. retrain with the mask pinned: `fit` on `data` for `epochs` epochs with a fresh SGD optimizer and LR
           schedule (stage `imp_round{r}`, so an interrupted run resumes per round), or `train_fn(model,
           mask, r)` if given.
    After `rounds` rounds the pruned share is 1 - (1 - rate) ** rounds.

    Mapping to the reference (`main_imp.py --prune_type rewind_lt --rate R --pruning_times N`): its state 0 is
    the dense training run (which saves the rewind weights at `--rewind_epoch 8`); `model` here is that trained
    dense model and `rounds` = N - 1. Each later state prunes `--rate` of the remaining conv weights
    (`pruning_model`), rewinds to the epoch-8 weights and LR schedule (`rewind_lt`) and retrains for the full
    schedule (182 epochs, MultiStepLR there; `epochs`/`lr_schedule` here). OMP in that script is N = 2 with
    `--rate 0.95`, i.e. `rounds=1, rate=0.95`.

    Differences from `main_imp.py`, kept because this module has no validation split or MultiStepLR: the
    reference rewinds the learning-rate schedule too (it steps MultiStepLR `--rewind_epoch` times before the
    182 retraining epochs, so their decays come 8 epochs early), here the schedule restarts; the reference's unlearning
    loads the round's best-validation checkpoint (`1model_SA_best.pth.tar`), here the last weights are kept.
    The mask itself is the reference's: ranked on the weights at the end of training, before rewinding.

    Args:
        model: the trained model (adapter or bare module); edited in place.
        data: the training set for retraining (ignored when `train_fn` is given).
        accelerator: an `accelerate.Accelerator` for `fit` (ignored when `train_fn` is given).
        rounds: pruning rounds (each followed by retraining).
        rewind_state: a state dict of `model.trainable` saved early in training (all of its entries, buffers
            included, are restored: the reference rewinds the whole network).
        rate: share of the surviving weights pruned per round.
        epochs, lr, batch_size, momentum, weight_decay, lr_schedule, augment: the retraining run
            (cross-entropy; augment "crop_flip" for CIFAR).
        scope: pruning scope (see `prunable`).
        train_fn: a custom retraining step `train_fn(model, mask, round)`, which must train `model` in place
            and keep the pruned entries at zero (e.g. by calling `fit(..., mask=mask)`).
    """
    if rounds < 1:
        raise ConfigError(f"imp needs at least one pruning round, got rounds={rounds}")
    if train_fn is None and (data is None or accelerator is None):
        raise ConfigError("imp needs `data` and `accelerator` to retrain (or a `train_fn`)")
    trainable = getattr(model, "trainable", model)
    mask: ParamMask | None = None
    for round_index in range(rounds):
        mask = magnitude_mask(trainable, rate, scope, previous=mask)
        trainable.load_state_dict(rewind_state)
        apply_mask(trainable, mask)
        if train_fn is not None:
            train_fn(model, mask, round_index)
        else:
            _retrain(
                model, data, accelerator, mask, round_index,
                epochs, lr, batch_size, momentum, weight_decay, lr_schedule, augment,
            )  # fmt: skip
        trainable = getattr(model, "trainable", model)
    return mask


def prune_model(model, spec, train_set: Dataset, accelerator) -> ParamMask:
    """Make `model` sparse as a recipe's `model.prune` says (a `PruneSpec`), in place; returns the mask.

    "omp" without retraining zeroes the smallest weights once (`omp`); "omp" with `epochs` > 0 is the
    reference's OMP, one round of `imp` at rate `sparsity`; "imp" runs `rounds` rounds at `rate`; "zeros"
    takes the exact zeros of an already sparse checkpoint. The mask is also set as `model.pruning_mask`, so
    every training loop keeps the pruned weights at exactly zero.
    """
    trainable = getattr(model, "trainable", model)
    if spec.method == "zeros":
        mask = ParamMask(
            {name: weight.detach() != 0 for name, weight in prunable(trainable, spec.scope).items()}
        )
    elif spec.method == "omp" and spec.epochs == 0:
        mask = omp(model, spec.sparsity, spec.scope)
    else:
        from .checkpoints import load_state_dict

        if spec.rewind:
            rewind_state = load_state_dict(spec.rewind)
        else:
            rewind_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
        one_shot = spec.method == "omp"
        mask = imp(
            model, train_set, accelerator,
            rounds=1 if one_shot else spec.rounds,
            rewind_state=rewind_state,
            rate=spec.sparsity if one_shot else spec.rate,
            epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, momentum=spec.momentum,
            weight_decay=spec.weight_decay, lr_schedule=spec.lr_schedule, augment=spec.augment,
            scope=spec.scope,
        )  # fmt: skip
    model.pruning_mask = mask
    return mask


def _retrain(
    model,
    data,
    accelerator,
    mask,
    round_index,
    epochs,
    lr,
    batch_size,
    momentum,
    weight_decay,
    schedule,
    augment,
):
    from .train import Phase, fit, make_loader, make_optimizer

    def cross_entropy(net, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(net(images), labels)

    optimizer = make_optimizer(model.parameters(), "sgd", lr, momentum, weight_decay)
    phases = [Phase(make_loader(data, batch_size), cross_entropy, "retain")]
    fit(
        model,
        phases,
        optimizer,
        accelerator,
        epochs,
        lr_schedule=schedule,
        augment=augment,
        mask=mask,
        stage=f"imp_round{round_index}",
    )
