"""SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image Classification and
Generation (Fan, Liu, Zhang, Wong, Wei, Liu; ICLR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..params import ParamMask, saliency_mask
from ..train import (
    AUGMENTATIONS,
    Phase,
    broadcast_tensors,
    data_parallel,
    endless,
    fit,
    make_loader,
    make_optimizer,
    shard,
    share_weight,
    train_steps,
)
from .base import Method, hyperparameter


@dataclass
class SalUn(Method):
    """SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency (Fan et al., ICLR 2024).

    Random labelling restricted to the salient weights:

    1. Saliency mask: sum the gradient of the forgetting loss -CE over one pass of the forget set at the
       original weights, take its magnitude, keep the global top `1 - sparsity` share of entries
       (`unlearn.params.saliency_mask`). Naming: `sparsity` is the share *pinned*, the reference's file name
       the share *kept*: sparsity s = `with_{1 - s}.pt` (0.5 = `with_0.5.pt`, 0.8 = `with_0.2.pt`). As the
       reference (`Classification/generate_mask.py`), the pass visits the forget set in a random order seeded
       from the run's seed (`mask_shuffle`; the batching changes the mask, since each batch loss is a mean)
       and sees the training augmentation (`augment`: the reference builds the mask from its training loader,
       random crop + flip on CIFAR). Or load a saved mask from `mask_path`. The mask is saved to the run
       folder as `saliency_mask.safetensors` for reuse.
    2. Random labelling on the masked model (`phases`), as the reference code schedules it
       (`Classification/unlearn/RL.py`): each epoch one pass over the forget set, every example labelled with
       a fresh uniformly random class, then one pass over the retain set with true labels (both terms weighted
       1, sequential: the authors' answer in issue #21). `mixed: true` is the reference's CIFAR-100 branch:
       one shuffled loader for both. `exclude_true_label: true` draws y' != y as the paper writes (the
       reference code may draw the true label). SGD (momentum, weight decay) as the reference.
    3. Weights outside the mask never move: gradients are masked and, after every step, pinned entries and
       their optimizer state are restored, so weight decay and momentum cannot move them either (the
       reference's PR #33 fix; the paper's numbers predate it).

    With `soft: true`, SalUn-soft (Table 1's SalUn-soft row; reference `Classification/unlearn/RL_pro.py:
    RL_proximal`) replaces steps 1 and 3; no saliency mask is computed (the reference takes none):

    1. Snapshot θ_o, the proximal anchor: with `soft_anchor: epoch` (the default, the reference's) the trainable
       weights at the start of every epoch (`RL_proximal` runs once per epoch and takes `init_params` when it
       starts); with `soft_anchor: original` the weights before unlearning, which is what the paper's formula
       implies (it writes the unlearned model against θ_o, the original model: θ_u = m ⊙ (Δθ + θ_o) +
       (1 - m) ⊙ θ_o).
    2. Random labelling on the whole model, as in step 2 (the reference's CIFAR-10/100 branch is the mixed one:
       `mixed: true`).
    3. After every optimizer step, the proximal step `soft_threshold_`: with Δ = θ - θ_o over all trainable
       weights together and τ the k-th smallest |Δ|, θ ← θ - τ where Δ > τ, θ + τ where Δ < -τ, θ_o elsewhere.
       k = `soft_k`: the share `sparsity` (here the reference's `mask_ratio` itself, a share reset to θ_o, not
       `1 - ratio` as for the hard mask) of the weights at the first epoch,
       decaying linearly with the epoch, constant within one as in the reference's CIFAR branch. So the
       reset share falls from `sparsity` to `sparsity / epochs`: a soft, shrinking saliency mask.
       Weights a pruned model pins (`model.pruning_mask`) take no part: they stay exactly 0.0 and do not
       count in k.

    SalUn shares its random labelling with the `random_label` baseline but keeps its own copy here, so that
    the method reads top to bottom in this file. Defaults suit the digits world; the CIFAR-10 recipe carries
    the paper's settings (10 epochs, lr 0.013, batch 256).
    """

    families = ("classifier",)
    epochs: int = hyperparameter(
        10, "epochs of random labelling; one epoch = a pass over the forget set, then one over the retain set"
    )
    lr: float = hyperparameter(0.02, "learning rate (digits default; the paper's CIFAR-10 value is 0.013)")
    batch_size: int = hyperparameter(
        64, "examples per batch, for the saliency pass and for training (paper 256)"
    )
    optimizer: str = hyperparameter("sgd", "sgd (the reference's), adam or adamw")
    momentum: float = hyperparameter(0.9, "SGD momentum (reference 0.9)")
    weight_decay: float = hyperparameter(5e-4, "L2 weight decay of the optimizer (reference 5e-4)")
    lr_schedule: str = hyperparameter(
        "constant", "constant (the reference's), cosine or linear decay over all steps"
    )
    max_grad_norm: float | None = hyperparameter(
        None, "clip the full gradient to this L2 norm, then mask it; null: no clipping (the reference's)"
    )
    augment: str = hyperparameter(
        "none",
        "batch augmentation, in training and in the saliency pass: none, or crop_flip (CIFAR's random crop and "
        "flip, the reference's CIFAR loaders)",
    )
    mixed: bool = hyperparameter(
        False, "one shuffled loader for forget and retain examples (the reference's CIFAR-100 branch)"
    )
    exclude_true_label: bool = hyperparameter(
        False, "draw random labels different from the true one (the paper's y' != y; the reference may not)"
    )
    sparsity: float = hyperparameter(
        0.5,
        "share of weights pinned outside the saliency mask, in [0, 1): sparsity s = the reference's "
        "with_{1-s}.pt (0.5 = with_0.5.pt, 0.8 = with_0.2.pt); soft: the first epoch's reset share (mask_ratio)",
    )
    mask_path: str | None = hyperparameter(
        None, "load a saved saliency mask (saliency_mask.safetensors) instead of computing it"
    )
    mask_shuffle: bool = hyperparameter(
        True,
        "the saliency pass visits the forget set in a random order seeded from the run's seed (the reference's); "
        "false: in dataset order",
    )
    soft: bool = hyperparameter(
        False,
        "SalUn-soft: no mask; after every step reset a shrinking share (from sparsity) of weights to θ_o",
    )
    soft_anchor: str = hyperparameter(
        "epoch",
        "SalUn-soft's θ_o: epoch (the weights at the start of each epoch, the reference's) or original (the "
        "weights before unlearning, as the paper's formula reads)",
    )

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"salun sparsity must lie in [0, 1), got {self.sparsity}")
        if self.soft and self.mask_path:
            raise ConfigError("salun soft: true takes no saliency mask; drop mask_path (or set soft: false)")
        if self.soft_anchor not in ("epoch", "original"):
            raise ConfigError(f"salun soft_anchor must be epoch or original, got {self.soft_anchor!r}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augment!r}; known: {', '.join(AUGMENTATIONS)}")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        if self.soft:
            return self.unlearn_soft(model, data, accelerator)
        mask = self.mask(model, data, accelerator)
        return self._fit(model, self.phases(data), accelerator, "salun", mask=mask)

    def mask(self, model: Model, data: UnlearnData, accelerator) -> ParamMask:
        """The saliency mask: loaded from `mask_path`, or computed on the forget set (and saved in the run)."""
        if self.mask_path:
            return ParamMask.load(self.mask_path)
        device = next(model.parameters()).device
        augment = AUGMENTATIONS[self.augment] or (lambda images: images)
        forget = seeded_order(data.forget) if self.mask_shuffle else data.forget
        batches = (
            (augment(images.to(device)), labels.to(device))
            for images, labels in make_loader(forget, self.batch_size, shuffle=False)
        )

        def forgetting_loss(model, batch):
            images, labels = batch
            return -F.cross_entropy(model(images), labels)

        mask = saliency_mask(model, forgetting_loss, batches, self.sparsity)
        if accelerator.project_dir and accelerator.is_main_process:
            mask.save(Path(accelerator.project_dir) / "saliency_mask.safetensors")
        return mask

    def phases(self, data: UnlearnData) -> list[Phase]:
        """One epoch of random labelling: the forget pass with random labels and the retain pass (or one mixed
        pass). Random labels are drawn per batch, in the order the loss is evaluated."""
        num_classes = data.num_classes

        def random_labels(labels: torch.Tensor) -> torch.Tensor:
            if not self.exclude_true_label:
                return torch.randint(0, num_classes, labels.shape, device=labels.device)
            shift = torch.randint(1, num_classes, labels.shape, device=labels.device)
            return (labels + shift) % num_classes

        def forget_loss(model, batch):
            images, labels = batch
            return F.cross_entropy(model(images), random_labels(labels))

        def retain_loss(model, batch):
            images, labels = batch
            return F.cross_entropy(model(images), labels)

        if not self.mixed:
            return [
                Phase(make_loader(data.forget, self.batch_size), forget_loss, "forget"),
                Phase(make_loader(data.retain, self.batch_size), retain_loss, "retain"),
            ]
        both = torch.utils.data.ConcatDataset([_Flagged(data.forget, True), _Flagged(data.retain, False)])

        def mixed_loss(model, batch):
            images, labels, is_forget = batch
            labels = torch.where(is_forget, random_labels(labels), labels)
            return F.cross_entropy(model(images), labels)

        return [Phase(make_loader(both, self.batch_size), mixed_loss, "mixed")]

    def _fit(
        self, model: Model, phases: list[Phase], accelerator, stage: str, mask=None, after_step=None
    ) -> Model:
        """`epochs` epochs over `phases` with the configured optimizer (masked weights pinned)."""
        optimizer = make_optimizer(
            model.parameters(), self.optimizer, self.lr, self.momentum, self.weight_decay
        )
        return fit(
            model,
            phases,
            optimizer,
            accelerator,
            self.epochs,
            lr_schedule=self.lr_schedule,
            mask=mask,
            max_grad_norm=self.max_grad_norm,
            augment=self.augment,
            stage=stage,
            after_step=after_step,
            settings={"method": self},
        )

    def unlearn_soft(self, model: Model, data: UnlearnData, accelerator) -> Model:
        """SalUn-soft: random labelling with a proximal step towards θ_o after every optimizer step."""
        named = [(name, p) for name, p in model.trainable.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        init = [p.detach().clone() for p in params]  # θ_o
        pruning = getattr(model, "pruning_mask", None)
        free = [pruning.masks.get(name) if pruning is not None else None for name, _ in named]
        n_free = sum(p.numel() if f is None else int(f.sum()) for p, f in zip(params, free))
        # soft_anchor "epoch": θ_o is taken anew by the first forward pass of every epoch (after a resume too,
        # where it sees the restored weights), i.e. from the weights the previous epoch ended with.
        retake = {"anchor": self.soft_anchor == "epoch"}

        def anchored(loss):
            def loss_taking_anchor(prepared, batch):
                if retake["anchor"]:
                    init[:] = [p.detach().clone() for p in params]
                    retake["anchor"] = False
                return loss(prepared, batch)

            return loss_taking_anchor

        def proximal_step(step: int, total_steps: int) -> None:
            if init[0].device != params[0].device:  # fit() moved the model to the accelerator's device
                init[:] = [i.to(p.device) for i, p in zip(init, params)]
            if any(f is not None and f.device != p.device for f, p in zip(free, params)):
                free[:] = [None if f is None else f.to(p.device) for f, p in zip(free, params)]
            soft_threshold_(params, init, soft_k(step, total_steps, self.epochs, self.sparsity, n_free), free)
            last_of_epoch = step % (total_steps // self.epochs) == 0
            if self.soft_anchor == "epoch" and last_of_epoch:
                retake["anchor"] = True

        phases = [Phase(phase.loader, anchored(phase.loss), phase.name) for phase in self.phases(data)]
        return self._fit(model, phases, accelerator, "salun_soft", after_step=proximal_step)


class _Flagged(torch.utils.data.Dataset):
    """Adds a forget flag to each example of a dataset (the mixed loader's way to tell forget from retain)."""

    def __init__(self, dataset, flag: bool):
        self.dataset, self.flag = dataset, flag

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, torch.tensor(self.flag)


def seeded_order(dataset, seed: int | None = None) -> torch.utils.data.Dataset:
    """`dataset` in the order a shuffling `DataLoader` made right after `torch.manual_seed(seed)` yields in its
    first pass: the reference's mask passes read such a loader (`generate_mask.py`: `replace_loader_dataset(
    forget_dataset, seed=seed, shuffle=True)`, which seeds first). The loader's iterator draws its base seed, then
    its sampler's seed, from the global RNG; here both come from a generator of their own, so the run's RNG is
    left untouched. `seed` defaults to the run's seed (`torch.initial_seed()`, set by the pipeline)."""
    generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the iterator's base seed, unused here
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(sampler_seed))
    return torch.utils.data.Subset(dataset, order.tolist())


def soft_k(step: int, total_steps: int, epochs: int, ratio: float, n_params: int) -> int:
    """How many weights SalUn-soft's proximal step resets to θ_o after optimizer step `step` (from 1).

    The reference's `int(mask_ratio * ((total_steps - (epoch * steps_per_epoch + 1)) / total_steps * n_params))`
    with `epoch` the 0-based epoch of the step: the share of the steps left after the epoch's first one, so k
    is constant within an epoch and falls linearly from about `ratio * n_params` to `ratio * n_params / epochs`.
    (reference/methods.md §1.4.4 writes `+ 1` for the reference's `- 1`; the difference is 2 / total_steps.)
    We keep the reference's per-epoch steps rather than decaying per step: the paper's numbers come from it,
    and the two differ by less than one epoch's share.
    """
    steps_per_epoch = total_steps // epochs
    epoch = (step - 1) // steps_per_epoch
    return int(ratio * ((total_steps - (epoch * steps_per_epoch + 1)) / total_steps * n_params))


@torch.no_grad()
def soft_threshold_(
    params: Sequence[torch.Tensor],
    init: Sequence[torch.Tensor],
    k: int,
    free: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """SalUn-soft's proximal step, in place: soft-threshold θ - θ_o so the k entries nearest θ_o sit on it.

    Δ = θ - θ_o over all `params` flattened together; τ = the k-th smallest |Δ|; then θ ← θ - τ where Δ > τ,
    θ ← θ + τ where Δ < -τ and θ ← θ_o elsewhere (the proximal operator of τ·‖θ - θ_o‖₁). Entries tied with
    the k-th are reset too, so exactly k entries land on θ_o unless |Δ| has ties at τ.

    Args:
        params: the parameters, edited in place.
        init: θ_o, one tensor per parameter.
        k: how many entries to reset; 0 leaves the parameters as they are, more than there are resets all.
        free: per parameter, None (all entries take part) or a boolean tensor; entries where it is False
            (a pruned model's pruned weights) are neither ranked nor changed.

    Returns:
        τ as a 0-d tensor (0 when k is 0), left on the device so that a GPU step need not wait for it.
    """
    free = list(free) if free is not None else [None] * len(params)
    deltas = [p - i for p, i in zip(params, init)]
    ranked = torch.cat([(d if f is None else d[f]).abs().flatten() for d, f in zip(deltas, free)])
    k = min(k, ranked.numel())
    if k <= 0:
        return ranked.new_zeros(())
    tau = torch.kthvalue(ranked, k).values
    for p, i, d, f in zip(params, init, deltas, free):
        new = torch.where(d > tau, p - tau, torch.where(d < -tau, p + tau, i))
        p.copy_(new if f is None else torch.where(f, new, p))
    return tau


@dataclass
class SalUnDiffusion(Method):
    """SalUn for diffusion models (Fan et al., ICLR 2024, Eq. for L_SalUn^(2); reference/methods.md §1.2-1.4.3).

    Class erasure in a class-conditional DDPM and concept erasure in text-to-image models, one algorithm. The
    defaults are the DDPM reference's (`DDPM/runners/diffusion.py`, `configs/cifar10_saliency_unlearn.yml`); the
    SD recipes set the SD reference's choices (`SD/train-scripts/generate_mask.py`, `random_label.py`), noted
    below as "SD:".

    1. Saliency mask at the original weights (model in eval mode): sum over one pass of D_f the gradient of the
       diffusion loss of the classifier-free guided prediction, per image the sum of squared errors
       |ε - (ε_u + w (ε(x_t | c_f) - ε_u))|², averaged over the batch, with w = `mask_guidance` = 3: the DDPM
       code's test-mode output (1 + s) ε_c - s ε_∅ at its `--cond_scale` s = 2 is ε_∅ + 3 (ε_c - ε_∅) (SD: its
       c_guidance 7.5 gives w = 8.5). Each batch's gradient is clipped to `max_grad_norm` before the sum (SD:
       no clipping). The pass visits D_f in a random order seeded from the run's seed (`mask_shuffle`; SD: in
       dataset order). Keep the global top `1 - sparsity` share of |sum|: sparsity s = the reference's
       `with_{1 - s}.pt` (0.5 = `with_0.5.pt`). Or load `mask_path`. The mask is saved to the run folder as
       `saliency_mask.safetensors`.
    2. For `steps` steps, on a forget batch (x, c_f) and a retain batch (x_r, c_r):
       forget loss = MSE(ε_θ(x_t | c_f), sg[ε_θ(x_t | c')]) (the mean over all entries) with one noise ε and t
       for both branches, c' the anchor (the pseudo class (c + 1) mod K / the pseudo prompt): the target is the
       *current* model under c', detached, as both reference codes do (not a frozen copy);
       retain loss = the ordinary diffusion loss on the retain batch, per image the *sum* of squared errors,
       averaged over the batch (`retain_reduction: sum`, the DDPM code's `noise_estimation_loss_conditional`;
       SD: `mean` over all entries, its LDM loss);
       loss = forget + `retain_weight` * retain (`retain_weight` is the reference's `--alpha` on the
       reference's scale: 1e-3 with `sum` is the DDPM README's; with `mean` the same weight would be C·H·W
       times smaller, e.g. 1e-3 · 3072 on CIFAR-10). Every training forward pass (forget, pseudo target,
       retain) replaces each condition by the unconditional one with probability `condition_dropout`, each
       pass drawing its own (the DDPM code calls its model in mode="train", cond_drop_prob 0.1; SD: 0).
       Timesteps are antithetic, t and T - 1 - t (`antithetic_timesteps`, in the mask pass too; SD: uniform).
       Clip the full gradient to `max_grad_norm`, then mask it (`clip_before_mask`); Adam.
    3. Weights outside the mask never move (values and optimizer state restored after every step).

    Several processes (`multi_process`): the UNet trains under DDP; every process computes the same mask (the main
    process's is broadcast) and draws each step's global batches, noise, timesteps and dropped conditions alike,
    then trains on its share of them (`unlearn.train.shard`), so the run is the one-process run.

    Defaults are the DDPM reference's (Adam lr 1e-4, batch 128, clip 1, retain weight 1e-3 per the authors'
    answer in issue #19: 0 collapses every class); the SD recipes carry lr 1e-5, retain weight 0.5
    (Imagenette) or 0.1 (nudity) with `retain_reduction: mean`, batch 8 and `mask_guidance` 8.5. Not followed:
    the DDPM code's CIFAR-10 loader flips images at random (`random_flip: true`); images are used as the data
    gives them.
    """

    families = ("diffusion",)
    multi_process = True
    shards_model = True  # FSDP: `train_steps` shards the trained UNet
    steps: int = hyperparameter(1000, "optimizer steps, each on one forget batch and one retain batch")
    lr: float = hyperparameter(1e-4, "Adam learning rate (DDPM reference 1e-4; Stable Diffusion 1e-5)")
    batch_size: int = hyperparameter(128, "images per forget batch and per retain batch (DDPM 128, SD 8)")
    retain_weight: float = hyperparameter(
        1e-3,
        "the reference's --alpha: weight of the retain loss (DDPM README 1e-3 with retain_reduction sum; SD 0.5 "
        "or 0.1 with mean)",
    )
    retain_reduction: str = hyperparameter(
        "sum",
        "retain loss per image: sum of squared errors averaged over the batch (the DDPM reference's) or mean "
        "over all entries (the SD reference's; retain_weight then weighs C*H*W times less)",
    )
    sparsity: float = hyperparameter(
        0.5,
        "share of trained weights pinned outside the saliency mask, in [0, 1): sparsity s = the reference's "
        "with_{1-s}.pt (0.5 = with_0.5.pt, 0.8 = with_0.2.pt)",
    )
    mask_guidance: float = hyperparameter(
        3.0,
        "guidance w of the saliency pass, in eps_u + w (eps_c - eps_u): DDPM code cond_scale 2 -> 3; SD code "
        "c_guidance 7.5 -> 8.5",
    )
    mask_path: str | None = hyperparameter(
        None, "load a saved saliency mask (saliency_mask.safetensors) instead of computing it"
    )
    mask_shuffle: bool = hyperparameter(
        True,
        "the saliency pass visits D_f in a random order seeded from the run's seed (the DDPM reference's); "
        "false: in dataset order (the SD reference's)",
    )
    condition_dropout: float = hyperparameter(
        0.1,
        "probability that a training forward pass (forget, pseudo target, retain) sees the unconditional "
        "condition instead, drawn per pass (the DDPM reference's mode='train', 0.1; SD 0)",
        ge=0,
        le=1,
    )
    antithetic_timesteps: bool = hyperparameter(
        True, "pair timesteps t and T-1-t within a batch (the DDPM reference's); false: independent (SD's)"
    )
    params: str | list = hyperparameter(
        "full", "UNet weights that may move: full, xattn, kv, noxattn, or a list of parameter-name globs"
    )
    max_grad_norm: float | None = hyperparameter(
        1.0, "clip each step's gradient (and each saliency batch's) to this L2 norm; null: no clipping"
    )
    clip_before_mask: bool = hyperparameter(
        True,
        "clip the full gradient, then mask it (the DDPM reference's order); false: mask, then clip what is left",
    )
    weight_decay: float = hyperparameter(0.0, "Adam's L2 weight decay (reference 0)")

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"salun sparsity must lie in [0, 1), got {self.sparsity}")
        if self.retain_reduction not in ("sum", "mean"):
            raise ConfigError(f"salun retain_reduction must be sum or mean, got {self.retain_reduction!r}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ConfigError(f"salun condition_dropout must lie in [0, 1], got {self.condition_dropout}")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        chosen = model.train_only(self.params)
        mask = self.mask(model, data, accelerator)
        prompts = data.prompts
        pseudo = dict(zip(map(_key, prompts.forget), prompts.anchor))
        forget, retain = endless(data.forget, self.batch_size), endless(data.retain, self.batch_size)
        net = data_parallel(model, accelerator)  # the trained UNet passes, under DDP on several processes

        def loss_fn(step: int) -> torch.Tensor:
            forget_loss = self.forget_loss(model, next(forget), pseudo, net, accelerator)
            return forget_loss + self.retain_weight * self.retain_loss(model, next(retain), net, accelerator)

        optimizer = torch.optim.Adam(chosen.values(), lr=self.lr, weight_decay=self.weight_decay)
        return train_steps(
            net,
            loss_fn,
            optimizer,
            accelerator,
            self.steps,
            mask=mask,
            max_grad_norm=self.max_grad_norm,
            clip_before_mask=self.clip_before_mask,
            stage="salun",
            state={"forget": forget, "retain": retain},
            settings={"method": self, "data": data},
        )

    def forget_loss(self, model: Model, batch, pseudo: dict, net=None, accelerator=None) -> torch.Tensor:
        """MSE(ε_θ(x_t | c_f), sg[ε_θ(x_t | c')]) on a forget batch; `pseudo` maps a condition to its anchor c'.

        `batch` is the global batch: its noise, timesteps and dropped conditions are drawn for all of it, and the
        loss is this process's share of it (`shard`; a pass's short last batch may split unevenly, the loss
        scaled by `share_weight`), with the trained forward pass through `net` (DDP)."""
        net = model if net is None else net
        images, conditions = batch
        x_t, _, t = model.noised(model.to_latents(images), antithetic=self.antithetic_timesteps)
        anchors = model.as_conditions(pseudo[_key(c)] for c in conditions)
        forget_cond = model.drop_conditions(conditions, self.condition_dropout)
        pseudo_cond = model.drop_conditions(anchors, self.condition_dropout)  # drawn apart
        x_t, t, forget_cond, pseudo_cond = shard(accelerator, x_t, t, forget_cond, pseudo_cond, uneven=True)
        forget_out = net(x_t, t, model.encode(forget_cond))
        with torch.no_grad():  # the target: the current model under c', detached
            pseudo_out = model(x_t, t, model.encode(pseudo_cond))
        return F.mse_loss(forget_out.float(), pseudo_out.float()) * share_weight(accelerator, len(images))

    def retain_loss(self, model: Model, batch, net=None, accelerator=None) -> torch.Tensor:
        """The diffusion loss on a retain batch: per image the sum of squared errors, averaged over the batch
        (`retain_reduction: sum`), or the mean over all entries (`mean`); this process's share of the global
        `batch`, as `forget_loss`."""
        net = model if net is None else net
        images, conditions = batch
        x0 = model.to_latents(images)
        cond = model.drop_conditions(conditions, self.condition_dropout)
        x_t, noise, t = model.noised(x0, antithetic=self.antithetic_timesteps)
        x_t, noise, t, cond = shard(accelerator, x_t, noise, t, cond, uneven=True)
        errors = (net(x_t, t, model.encode(cond)).float() - noise.float()).square()
        loss = errors.flatten(1).sum(1).mean() if self.retain_reduction == "sum" else errors.mean()
        return loss * share_weight(accelerator, len(images))

    def mask(self, model: Model, data: UnlearnData, accelerator) -> ParamMask:
        """The saliency mask over the trained UNet parameters: loaded, or computed on D_f and saved."""
        if self.mask_path:
            return ParamMask.load(self.mask_path)

        def forgetting_loss(model, batch):
            images, conditions = batch
            x_t, noise, t = model.noised(model.to_latents(images), antithetic=self.antithetic_timesteps)
            uncond = model.encode(model.null_conditions(len(x_t)))
            eps = model.guided(x_t, t, model.encode(conditions), uncond, self.mask_guidance)
            return F.mse_loss(eps.float(), noise.float(), reduction="sum") / len(x_t)

        forget = seeded_order(data.forget) if self.mask_shuffle else data.forget
        batches = iter(make_loader(forget, self.batch_size, shuffle=False))
        with accelerator.autocast():
            mask = saliency_mask(model, forgetting_loss, batches, self.sparsity, self.max_grad_norm)
        broadcast_tensors(
            accelerator, mask.masks.values()
        )  # computed by every process: all take the main one's
        if accelerator.project_dir and accelerator.is_main_process:
            mask.save(Path(accelerator.project_dir) / "saliency_mask.safetensors")
        return mask


def _key(condition):
    """A hashable form of one condition (a prompt, or a class id that may come as a 0-d tensor)."""
    return condition if isinstance(condition, str) else int(condition)
