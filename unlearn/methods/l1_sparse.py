"""ℓ1-sparse unlearning ("sparsity-aware unlearning"), `reference/methods.md` §2.3."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import Phase, fit, make_loader, make_optimizer
from .base import Method, hyperparameter

SCHEDULES = ("decay", "constant", "increase")


def l1_weight_at(
    epoch: int, epochs: int, l1_weight: float, no_l1_epochs: int = 0, schedule: str = "decay"
) -> float:
    """γ_t, the weight of the ℓ1 term in epoch `epoch` (0-based), as the reference's `FT_iter` computes it.

    With A = epochs - no_l1_epochs active epochs and w = `l1_weight` (the reference's `--alpha`): for
    epoch < A, "decay" gives w·(1 - epoch/A) (the reference default), "increase" w·epoch/A (the reference's
    commented-out variant) and "constant" w; from epoch A on, 0. When A = 0 the reference's CIFAR branch uses
    w throughout (`unlearn/FT.py:92-100`), and so does this function (its ImageNet branch, FT.py:51-56, has
    no such case and uses 0). Constant within an epoch, as in the reference (γ depends on the epoch only).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown l1 schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    active = epochs - no_l1_epochs
    if active == 0:
        return l1_weight
    if epoch >= active:
        return 0.0
    if schedule == "decay":
        return l1_weight * (1 - epoch / active)
    if schedule == "increase":
        return l1_weight * (epoch / active)
    return l1_weight


def l1_norm(parameters) -> torch.Tensor:
    """||θ||₁ over all given parameters (the reference's `l1_regularization`: norm of the concatenation)."""
    return sum(p.abs().sum() for p in parameters)


def epoch_view(dataset: Dataset, epoch: int) -> Dataset:
    """`dataset` in a fixed order of its own for epoch `epoch` (epoch 0: unchanged).

    Each epoch is its own `fit` call, whose loader restarts at sampler epoch 0; accelerate's seedable sampler
    (which the pipeline uses) would then shuffle every epoch alike. Feeding each epoch a differently permuted
    view gives a different order per epoch that is the same on every process and on a resumed run.
    """
    if epoch == 0:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch))
    return Subset(dataset, order.tolist())


@dataclass
class L1Sparse(Method):
    """Model Sparsity Can Simplify Machine Unlearning (Jia et al., NeurIPS 2023): ℓ1-sparse unlearning.

    Sparsity-aware unlearning: fine-tune on the retain set while an ℓ1 penalty pushes the weights towards a
    sparse model, which the paper finds closes much of the gap between fine-tuning and retraining.

    1. For epoch t = 0 .. epochs - 1, set γ_t by `l1_schedule` (`l1_weight_at`): by default the linear decay
       γ_t = `l1_weight`·(1 - t/(epochs - no_l1_epochs)) for t < epochs - no_l1_epochs, else 0.
    2. Train one epoch on D_r with loss CE + γ_t·||θ||₁, where θ is every parameter of the network (batch
       norm and biases included, as in the reference code), with SGD (momentum, weight decay).

    Each epoch is one `fit` call (stage `l1_sparse_<t>`) so γ_t is a plain constant within it; all calls share
    one optimizer, so momentum carries across epochs as in the reference, and an interrupted run resumes at
    the last finished epoch (fit restores weights and optimizer state per stage). Each epoch reads D_r in an
    order of its own (`epoch_view`); with `l1_weight` 0 the first epoch is exactly `FineTune`'s first epoch. The
    learning rate is constant (the reference's MultiStepLR milestones 91/136 never trigger within 10 epochs).

    "Prune first, then unlearn" (the paper's other scheme) is not part of this method: prune with
    `unlearn.prune.omp` / `imp` and pass the mask to training; this class stays the pure ℓ1 objective.

    Reference (OPTML-Group/Unlearn-Sparse @ 80ba55d): `unlearn/FT_prune.py` → `FT_l1` → `FT_iter(with_l1=True)`
    in `unlearn/FT.py` (loss `CE + current_alpha·‖cat(model.parameters())‖₁`, lines 14-18 and 92-104; SGD
    from `unlearn/impl.py`). Command: `main_forget.py --unlearn FT_prune --alpha α --unlearn_lr 0.01
    --unlearn_epochs 10` (`--alpha` is `l1_weight` here). The README gives no α and the argparse default
    (0.2, "unlearn noise") is shared with other unlearners; third-party scripts use 1e-4 and 3e-4; the default
    5e-4 here is unconfirmed. The schedule and one training step are checked against the reference's formula
    in tests/test_fidelity_gan_sparse_ant.py.
    """

    families = ("classifier",)
    epochs: int = hyperparameter(10, "passes over the retain set (reference 10)")
    lr: float = hyperparameter(0.01, "learning rate, constant (reference 0.01)")
    batch_size: int = hyperparameter(64, "examples per batch (reference 256)")
    optimizer: str = hyperparameter("sgd", "sgd (the reference's), adam or adamw")
    momentum: float = hyperparameter(0.9, "SGD momentum (reference 0.9)")
    weight_decay: float = hyperparameter(5e-4, "L2 weight decay of the optimizer (reference 5e-4)")
    l1_weight: float = hyperparameter(
        5e-4, "weight of the ℓ1 penalty ‖θ‖₁, scaled per epoch by l1_schedule (the reference's --alpha)"
    )
    no_l1_epochs: int = hyperparameter(0, "last epochs trained without the ℓ1 penalty", ge=0)
    l1_schedule: str = hyperparameter(
        "decay", "how γ changes over the epochs: decay (linear to 0, the reference's), constant or increase"
    )
    max_grad_norm: float | None = hyperparameter(None, "clip the gradient to this L2 norm; null: no clipping")
    augment: str = hyperparameter(
        "none", "batch augmentation: none, or crop_flip (CIFAR's random crop and flip)"
    )

    def check(self) -> None:
        if self.l1_schedule not in SCHEDULES:
            raise ConfigError(f"unknown l1_schedule {self.l1_schedule!r}; known: {', '.join(SCHEDULES)}")
        if not 0 <= self.no_l1_epochs <= self.epochs:
            raise ConfigError(
                f"method.no_l1_epochs must lie in [0, method.epochs] = [0, {self.epochs}], got {self.no_l1_epochs}; "
                "lower it or raise method.epochs"
            )

    def gamma(self, epoch: int) -> float:
        """γ_t of epoch `epoch` (0-based)."""
        return l1_weight_at(epoch, self.epochs, self.l1_weight, self.no_l1_epochs, self.l1_schedule)

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        params = [p for p in model.trainable.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, self.optimizer, self.lr, self.momentum, self.weight_decay)
        for epoch in range(self.epochs):
            gamma = self.gamma(epoch)
            retain = make_loader(epoch_view(data.retain, epoch), self.batch_size)

            def loss(net, batch, gamma=gamma):
                images, labels = batch
                value = F.cross_entropy(net(images), labels)
                return value + gamma * l1_norm(params) if gamma else value

            model = fit(
                model,
                [Phase(retain, loss, "retain")],
                optimizer,
                accelerator,
                1,
                max_grad_norm=self.max_grad_norm,
                augment=self.augment,
                stage=f"l1_sparse_{epoch}",
                settings={"method": self},
            )
        return model
