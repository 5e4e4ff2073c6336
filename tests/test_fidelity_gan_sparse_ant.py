"""Reference parity for Adapt-then-Unlearn, ℓ1-sparse, OMP / IMP pruning and ANT's per-mode defaults.

Each parity test recomputes the quantity in plain torch from the authors' equations (the reference files and
lines are named in each test) on the same tiny inputs as ours, and states its tolerance. References:
- Adapt-then-Unlearn: atriguha/Adapt_Unlearn @ 163a354 (Unlearning/Unlearning_MNIST/train_different_losses.py,
  Negative_Adaptation/EWC_ADAPT_MNIST/model.py)
- ℓ1-sparse, OMP / IMP: OPTML-Group/Unlearn-Sparse @ 80ba55d (unlearn/FT.py, pruner/utils.py, main_imp.py)
- ANT: lileyang1210/ANT @ 78ce8f3 (Single/configs/ant_train.yaml, Multiple/examples/config.yaml)
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from accelerate import Accelerator
from torch import nn

from unlearn.methods.adapt_then_unlearn import (
    ewc_penalty,
    fisher_information,
    parameter_distance,
    repulsion,
)
from unlearn.methods.l1_sparse import L1Sparse, l1_weight_at
from unlearn.models.gan import build_gan
from unlearn.params import apply_mask
from unlearn.prune import imp, magnitude_mask, omp, sparsity

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gan(seed: int = 0):
    torch.manual_seed(seed)
    return build_gan("dcgan_digits", latent_dim=8, width=8)


def moved_copies(gan, k: int, scale: float = 0.05) -> list[dict[str, torch.Tensor]]:
    """K "adapted" weight sets: the generator's weights plus seeded noise."""
    generator = torch.Generator().manual_seed(123)
    return [
        {
            n: p.detach() + scale * torch.randn(p.shape, generator=generator)
            for n, p in gan.generator.named_parameters()
        }
        for _ in range(k)
    ]


# -- Adapt-then-Unlearn: the repulsion terms ----------------------------------------------------------------


def reference_val(params: dict, adapted: list[dict]) -> torch.Tensor:
    """`val` of calc_difference_param_new (train_different_losses.py:139-208): per named parameter, the
    nn.MSELoss of each adapted model's weight against θ, added over the models; then each entry /T, /2, *K
    (`value/2*len(ckpt_gens)`) and summed."""
    difference = {}
    for model in adapted:
        for name, weight in params.items():
            op = ((model[name] - weight) ** 2).mean()
            difference[name] = difference[name] + op if name in difference else op
    val = 0
    for name in difference:
        value = difference[name] / len(difference)
        val = val + value / 2 * len(adapted)
    return val


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    ("form", "loss_type"), [("inverse", "reci"), ("exponential", "exp"), ("negative", "l2")]
)
def test_repulsion_matches_the_reference_generator_loss(k, form, loss_type):
    gan = tiny_gan()
    params = dict(gan.generator.named_parameters())
    adapted = moved_copies(gan, k)
    gamma = 1.2
    ours = repulsion(parameter_distance(params, adapted, "mean"), form, gamma, exp_scale=100.0)
    ours_grad = torch.autograd.grad(ours, list(params.values()))
    # train_different_losses.py:324-345, val_factor = 1/gamma (no --scale_repel_loss); g_loss left out
    val, val_factor = reference_val(params, adapted), 1 / gamma
    reference = {
        "reci": lambda: 1 / (val * val_factor),
        "exp": lambda: 100 * torch.exp(-(val / val_factor)),
        "l2": lambda: -(val / val_factor),
    }[loss_type]()
    reference_grad = torch.autograd.grad(reference, list(params.values()))
    # float32 sums over ~10k weights in another order: a few ulps, well inside 1e-5 relative
    assert torch.allclose(ours, reference, rtol=1e-5, atol=0)
    for a, b in zip(ours_grad, reference_grad):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


def test_reference_distance_multiplies_by_the_number_of_adapted_models():
    """The old code averaged over the K models (d/K² of the reference's val for K = 2): this fails on it."""
    gan = tiny_gan()
    params = dict(gan.generator.named_parameters())
    one, two = moved_copies(gan, 2)
    both = parameter_distance(params, [one, two], "mean")
    # K = 2: (2/2T)·Σ_t Σ_k MSE = Σ_k (per-model val of K = 1)·2
    single = parameter_distance(params, [one], "mean") + parameter_distance(params, [two], "mean")
    assert torch.allclose(both, 2 * single, rtol=1e-6)  # same float32 terms, two summation orders


def test_paper_distance_is_the_squared_l2_norm_over_all_weights():
    gan = tiny_gan()
    params = dict(gan.generator.named_parameters())
    (target,) = moved_copies(gan, 1)
    flat = torch.cat([(params[n] - target[n]).flatten() for n in params])
    # float32: the same squares, summed per tensor first here; 1e-5 relative covers the reordering
    assert torch.allclose(parameter_distance(params, [target], "sum"), flat.pow(2).sum(), rtol=1e-5)


# -- Adapt-then-Unlearn: EWC ----------------------------------------------------------------------------------


def test_fisher_matches_the_reference_per_logit_gradients_of_one_batch():
    """estimate_fisher (EWC_ADAPT_MNIST/model.py:609-662): one batch of latents through G and D, autograd.grad
    of each sample's logit, squared, mean over samples. Our generator has batch norm, so G runs in eval mode
    (running statistics: each sample's output depends on it alone, as in StyleGAN2); the reference takes the
    parameters of `G.convs` only, ours every generator weight (a DCGAN has no mapping network)."""
    gan = tiny_gan(1)
    samples = 6
    torch.manual_seed(7)
    ours = fisher_information(gan, samples)
    torch.manual_seed(7)
    z = torch.randn(samples, gan.latent_dim)
    gan.generator.eval()
    logits = gan.discriminator(gan.generator(z)).flatten()
    params = list(gan.generator.parameters())
    grads = zip(*[torch.autograd.grad(logit, params, retain_graph=True) for logit in logits])
    reference = [(torch.stack(g) ** 2).mean(0) for g in grads]
    assert set(ours) == {n for n, _ in gan.generator.named_parameters()}
    for (name, _), expected in zip(gan.generator.named_parameters(), reference):
        # batch-of-6 vs batch-of-1 convolutions and the [0,1] round trip of generate/discriminate: ~1e-6
        assert torch.allclose(ours[name], expected, rtol=1e-4, atol=1e-10), name


def test_ewc_penalty_matches_the_reference_formula():
    """ewc_loss (EWC_ADAPT_MNIST/model.py:683-719): (lamda/2)·Σ_params (fisher·(p − mean)²).sum()."""
    gan = tiny_gan(2)
    anchor = {n: p.detach().clone() for n, p in gan.generator.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    fisher = {n: torch.rand(p.shape, generator=generator) for n, p in anchor.items()}
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    lamda = 5e8
    losses = [(fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in gan.generator.named_parameters()]
    reference = (lamda / 2) * sum(losses)
    ours = ewc_penalty(gan.generator, anchor, fisher, lamda)
    assert torch.allclose(ours, reference, rtol=1e-6)  # the same float32 terms in the same order


# -- ℓ1-sparse -----------------------------------------------------------------------------------------------


def reference_alpha(epoch: int, unlearn_epochs: int, no_l1_epochs: int, alpha: float) -> float:
    """FT_iter's current_alpha, CIFAR branch (unlearn/FT.py:92-100)."""
    if epoch < unlearn_epochs - no_l1_epochs:
        return alpha * (1 - epoch / (unlearn_epochs - no_l1_epochs))
    elif unlearn_epochs - no_l1_epochs == 0:
        return alpha
    return 0


@pytest.mark.parametrize(("epochs", "no_l1"), [(10, 0), (10, 4), (5, 5), (1, 0), (7, 6)])
def test_l1_schedule_matches_the_reference_per_epoch(epochs, no_l1):
    got = [l1_weight_at(t, epochs, 3e-4, no_l1, "decay") for t in range(epochs)]
    want = [reference_alpha(t, epochs, no_l1, 3e-4) for t in range(epochs)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)  # the same float expression: equal to rounding


def test_l1_sparse_training_matches_the_reference_loop():
    """Three epochs of one batch: FT_iter(with_l1=True) in the reference's optimizer (impl.py: SGD lr,
    momentum, weight decay; MultiStepLR 91/136 never fires), loss CE + current_alpha·‖cat(params)‖₁ (FT.py:14-18,
    the norm over every parameter), recomputed by hand and compared to L1Sparse.unlearn."""
    from unlearn.data import forget_classes
    from unlearn.datasets import ImageTensorDataset
    from unlearn.models.classifier import build_classifier

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=generator)
    labels = torch.arange(40) % 4
    data = forget_classes(ImageTensorDataset(images, labels, 4), ImageTensorDataset(images, labels, 4), [3])
    torch.manual_seed(0)
    model = build_classifier("digits_cnn", 4)
    start = copy.deepcopy(model)
    epochs, lr, alpha = 3, 0.05, 0.01
    method = L1Sparse(epochs=epochs, lr=lr, batch_size=64, l1_weight=alpha)
    ours = method.unlearn(model, data, Accelerator(cpu=True))

    reference = start.train()
    params = list(reference.trainable.parameters())
    optimizer = torch.optim.SGD(params, lr, momentum=0.9, weight_decay=5e-4)
    x, y = data.retain.images.float(), data.retain.labels
    for epoch in range(epochs):
        current_alpha = reference_alpha(epoch, epochs, 0, alpha)
        loss = F.cross_entropy(reference(x), y)
        loss = loss + current_alpha * torch.linalg.norm(torch.cat([p.view(-1) for p in params]), ord=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for (name, a), b in zip(ours.trainable.state_dict().items(), reference.trainable.state_dict().values()):
        # one shuffled batch vs the stored order: the batch mean sums in another order (~1e-7 per step)
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name


# -- OMP / IMP masks -----------------------------------------------------------------------------------------


def tiny_resnetish() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def reference_prune(net: nn.Module, rate: float) -> None:
    """pruner/utils.py:pruning_model: torch's global L1 unstructured pruning over every nn.Conv2d weight."""
    chosen = [(m, "weight") for m in net.modules() if isinstance(m, nn.Conv2d)]
    torch_prune.global_unstructured(chosen, pruning_method=torch_prune.L1Unstructured, amount=rate)


def reference_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight_mask.bool() for n, m in net.named_modules() if hasattr(m, "weight_mask")}


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.95])
def test_omp_mask_matches_torch_global_unstructured_over_conv_weights(rate):
    torch.manual_seed(0)
    net = tiny_resnetish()
    twin = copy.deepcopy(net)
    reference_prune(twin, rate)
    expected = reference_masks(twin)
    mask = omp(net, rate)  # our `sparsity` is the reference's --rate: the share pruned
    assert (
        set(mask.masks) == set(expected) == {"0.weight", "3.weight"}
    )  # conv weights only: no BN, bias, linear
    for name in expected:
        assert torch.equal(mask.masks[name], expected[name]), name  # random weights: no ties, exact
    # equation: the round(rate·n) smallest |w| over all conv weights together are zero
    weights = torch.cat([twin[0].weight_orig.flatten(), twin[3].weight_orig.flatten()]).abs()
    threshold = weights.sort().values[round(rate * len(weights)) - 1]
    for name, module in (("0.weight", net[0]), ("3.weight", net[3])):
        original = getattr(twin, name.split(".")[0]).weight_orig
        assert torch.equal(mask.masks[name], original.abs() > threshold)
        assert torch.equal(module.weight == 0, ~mask.masks[name])
    # the reference's check_sparsity prints the *remaining* share, 100·(1 − rate)
    assert sparsity(net, mask) == pytest.approx(rate, abs=1 / len(weights))


def test_second_pruning_round_matches_torch_on_an_already_pruned_model():
    """IMP round 2 (main_imp.py:239-254): pruning_model again on the masked model prunes `rate` of the
    surviving conv weights (torch's PruningContainer), after the weights changed (retraining)."""
    torch.manual_seed(0)
    net = tiny_resnetish()
    twin = copy.deepcopy(net)
    first = magnitude_mask(net, 0.2)
    reference_prune(twin, 0.2)
    noise = {n: 0.05 * torch.randn_like(p) for n, p in net.named_parameters()}
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(noise[name])
        for name, p in twin.named_parameters():  # the twin's weights are weight_orig (masked at forward)
            p.add_(noise[name.replace("_orig", "")])
    apply_mask(net, first)
    second = magnitude_mask(net, 0.2, previous=first)
    with torch.no_grad():
        twin.eval()(torch.zeros(1, 3, 4, 4))  # torch recomputes weight = weight_orig · mask at a forward
    reference_prune(twin, 0.2)
    expected = reference_masks(twin)
    for name in expected:
        assert torch.equal(second.masks[name], expected[name]), name
    assert abs((1 - second.density()) - 0.36) < 0.01


def test_imp_rewinds_the_whole_network_and_keeps_the_pruned_entries_zero():
    """main_imp.py:249-254: the mask is taken on the trained weights, then model.load_state_dict(rewind)
    (every entry, batch-norm statistics included) and the mask re-applied: conv weights = rewind · mask."""
    torch.manual_seed(0)
    rewind_net = tiny_resnetish()
    rewind_net[1].running_mean.fill_(0.3)
    rewind = copy.deepcopy(rewind_net.state_dict())
    trained = tiny_resnetish()  # other weights: the "trained" model
    expected = magnitude_mask(trained, 0.5)
    mask = imp(trained, None, rounds=1, rewind_state=rewind, rate=0.5, train_fn=lambda model, mask, r: None)
    for name in expected.masks:
        assert torch.equal(mask.masks[name], expected.masks[name])  # ranked on the trained weights
    state = trained.state_dict()
    for name, value in rewind.items():
        want = value * mask.masks[name] if name in mask.masks else value
        assert torch.equal(state[name], want), name


# -- ANT: the defaults of each mode --------------------------------------------------------------------------


def test_ant_defaults_are_each_modes_reference_config():
    from unlearn.methods.ant import ANT

    def settings(method):
        names = (
            "steps",
            "lr",
            "batch_size",
            "split_step",
            "ddim_steps",
            "start_guidance",
            "negative_guidance",
        )
        return {name: getattr(method, name) for name in (*names, "early_weight", "uncond_weight")}

    # Single/configs/ant_train.yaml: iterations, lr, batch 1, before_step, ddim_steps, start/negative guidance,
    # alpha1 (early), alpha2 (unconditional)
    assert settings(ANT(mode="saliency")) == dict(
        steps=250, lr=5e-4, batch_size=1, split_step=7, ddim_steps=50, start_guidance=3.0,
        negative_guidance=1.0, early_weight=1.0, uncond_weight=0.5,
    )  # fmt: skip
    # Multiple/examples/config.yaml + prompts.yaml (batch 2, guidance_scale 1.0 = η), train_ant.py (CFG 7.5
    # hard-coded); alpha_2 weighs the early stage, alpha_1 the unconditional terms
    multi = ANT(mode="lora")
    assert settings(multi) == dict(
        steps=10, lr=5e-4, batch_size=2, split_step=4, ddim_steps=50, start_guidance=7.5,
        negative_guidance=1.0, early_weight=0.5, uncond_weight=2.5,
    )  # fmt: skip
    assert (multi.lora_rank, multi.lora_alpha, multi.fuse_scale) == (64, 1.0, 4.3)
    # an explicit value wins; auto decides when it sees the concepts
    assert ANT(mode="lora", early_weight=1.0).early_weight == 1.0
    auto = ANT()
    assert auto.steps is None
    assert dataclasses.replace(auto, mode="lora").uncond_weight == 2.5
    assert dataclasses.replace(auto, mode="saliency").uncond_weight == 0.5
