"""Adapt-then-Unlearn (atriguha/Adapt_Unlearn) and Unlearn-Sparse (OPTML-Group/Unlearn-Sparse): the authors'
functions, extracted with `ast` (heavy imports stubbed), vs ours on tiny inputs.

Adapt-then-Unlearn: `calc_difference_param_new` (Unlearning/Unlearning_MNIST/train_different_losses.py; its
`from model import Generator` returns our generator's architecture) and the EWC methods `estimate_fisher`,
`consolidate`, `ewc_loss` of Negative_Adaptation/EWC_ADAPT_MNIST/model.py's Generator (on a stub whose `convs` is
our whole generator and whose latents are fixed). Unlearn-Sparse: pruner/utils.py `pruning_model` /
`extract_mask` (global L1 over the convolutions) and unlearn/FT.py `FT_iter(with_l1=True)` (utils stubbed)."""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import types

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from common import extract, max_diff
from torch import autograd
from torch.autograd import Variable

ATU, SPARSE = "atriguha+Adapt_Unlearn", "OPTML-Group+Unlearn-Sparse"
DISTANCE = "Unlearning/Unlearning_MNIST/train_different_losses.py"
EWC = "Negative_Adaptation/EWC_ADAPT_MNIST/model.py"
FILES = [
    (ATU, DISTANCE, None),
    (ATU, EWC, None),
    (SPARSE, "pruner/utils.py", None),
    (SPARSE, "unlearn/FT.py", None),
]
REL = "max |diff| / max |ref|"


def distance(refs, results):
    from unlearn.methods.adapt_then_unlearn import parameter_distance
    from unlearn.models.gan import build_gan

    torch.manual_seed(0)
    gan = build_gan("dcgan_digits", latent_dim=8, width=8)
    ns = extract(
        refs.source(ATU, DISTANCE),
        ["calc_difference_param_new"],
        namespace={"nn": nn, "torch": torch, "device": "cpu"},
    )
    stub = types.ModuleType("model")  # their `from model import Generator, Discriminator`
    stub.Generator, stub.Discriminator = (lambda *a, **k: copy.deepcopy(gan.generator)), None
    saved = sys.modules.get("model")
    sys.modules["model"] = stub
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in (1, 2, 3):  # K adapted generators, saved as their checkpoints ({"g_ema": state})
                adapted, paths = [], []
                g = torch.Generator().manual_seed(k)
                for i in range(k):
                    state = {
                        n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
                        for n, p in gan.generator.named_parameters()
                    }
                    torch.save({"g_ema": {**gan.generator.state_dict(), **state}}, f"{tmp}/k{k}_{i}.pt")
                    paths.append(f"{tmp}/k{k}_{i}.pt")
                    adapted.append(state)
                ref = ns["calc_difference_param_new"](paths, gan.generator)
                ours = parameter_distance(dict(gan.generator.named_parameters()), adapted, "mean")
                results.check(
                    f"Adapt-then-Unlearn distance (calc_difference_param_new), K={k}",
                    REL,
                    max_diff([ours], [ref])[1],
                    1e-6,
                )
                params = list(gan.generator.parameters())
                grads = zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params))
                results.check(
                    f"Adapt-then-Unlearn distance gradient, K={k}",
                    f"{REL}, worst tensor",
                    max(max_diff([a], [b])[1] for a, b in grads),
                    1e-6,
                )
    finally:
        sys.modules.pop("model")
        if saved is not None:
            sys.modules["model"] = saved


def fisher_ewc(refs, results):
    import unlearn.models.gan as gan_module
    from unlearn.methods.adapt_then_unlearn import ewc_penalty, fisher_information

    ns = extract(
        refs.source(ATU, EWC),
        ["estimate_fisher", "consolidate", "ewc_loss"],
        cls="Generator",
        namespace={"torch": torch, "autograd": autograd, "Variable": Variable},
    )
    torch.manual_seed(3)
    gan = gan_module.build_gan("dcgan_digits", latent_dim=8, width=8)
    gan.generator.eval()
    z = torch.randn(32, 8)

    class Stub(nn.Module):  # their StyleGAN2 Generator's stand-in: convs = our whole generator, z fixed
        estimate_fisher, consolidate, ewc_loss = ns["estimate_fisher"], ns["consolidate"], ns["ewc_loss"]

        def __init__(self, generator):
            super().__init__()
            self.convs, self.g, self.lamda = nn.ModuleList([generator]), generator, 5e8

        def mixing_noise(self, batch, latent_dim, prob, device):
            return z[:batch]

        def forward(self, latent):
            return self.g(latent), None

    stub = Stub(gan.generator)
    names, pdict, fisher_ref = stub.estimate_fisher(
        lambda x: gan.discriminator(x).view(-1, 1), {}, sample_size=32
    )
    original = gan_module.GAN.random_latents
    gan_module.GAN.random_latents = lambda self, n: z[:n]  # ours draws with random_latents: the same z
    try:
        fisher_ours = fisher_information(gan, 32)
    finally:
        gan_module.GAN.random_latents = original
    ours_name = {n: n.rsplit("__", 1)[0].replace("__", ".") for n in names}  # their buffer names -> ours
    results.check(
        f"Adapt-then-Unlearn Fisher (estimate_fisher, 32 samples, {len(names)} tensors)",
        f"{REL}, worst tensor",
        max(max_diff([fisher_ours[ours_name[n]]], [fisher_ref[n]])[1] for n in names),
        4e-6,
    )
    stub.consolidate(fisher_ref, names, pdict)
    anchor = {n: p.detach().clone() for n, p in gan.generator.named_parameters()}
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _, ewc_ref = stub.ewc_loss(names, pdict)
    ewc_ours = ewc_penalty(gan.generator, anchor, {ours_name[n]: fisher_ref[n] for n in names}, 5e8)
    results.check(
        "Adapt-then-Unlearn EWC penalty (consolidate + ewc_loss, lambda 5e8)",
        REL,
        max_diff([ewc_ours], [ewc_ref])[1],
        1e-6,
    )


def pruning(refs, results):
    from unlearn.models.classifier import build_classifier
    from unlearn.prune import omp

    ns = extract(
        refs.source(SPARSE, "pruner/utils.py"),
        ["pruning_model", "extract_mask"],
        namespace={"nn": nn, "prune": prune, "torch": torch, "copy": copy},
    )
    for rate in (0.2, 0.5, 0.95):
        torch.manual_seed(0)
        ours_net = build_classifier("resnet18_cifar", 10).trainable
        ref_net = copy.deepcopy(ours_net)
        ns["pruning_model"](ref_net, rate)
        ref_masks = ns["extract_mask"](ref_net.state_dict())
        ours = omp(ours_net, rate).masks
        wrong = sum(int((ours[k.removesuffix("_mask")] != v.bool()).sum()) for k, v in ref_masks.items())
        total = sum(v.numel() for v in ref_masks.values())
        results.check(
            f"Unlearn-Sparse OMP masks (pruning_model), ResNet-18 CIFAR, rate {rate}",
            f"differing entries of {total} ({len(ref_masks)} conv masks, ours {len(ours)})",
            wrong + abs(len(ref_masks) - len(ours)),
            0,
        )


def ft_l1(refs, results, epochs: int = 3):
    from accelerate import Accelerator

    from unlearn.data import forget_classes
    from unlearn.datasets import ImageTensorDataset
    from unlearn.methods.l1_sparse import L1Sparse
    from unlearn.models.classifier import build_classifier

    utils = types.ModuleType("utils")
    utils.AverageMeter = type("AverageMeter", (), {"update": lambda self, *a: None, "avg": 0.0})
    utils.accuracy = lambda out, target: [torch.tensor(0.0)]
    utils.warmup_lr = lambda *a, **k: None
    ns = extract(
        refs.source(SPARSE, "unlearn/FT.py"),
        ["l1_regularization", "FT_iter"],
        namespace={"torch": torch, "time": time, "utils": utils},
    )
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 4
    data = forget_classes(ImageTensorDataset(images, labels, 4), ImageTensorDataset(images, labels, 4), [3])
    torch.manual_seed(0)
    model = build_classifier("digits_cnn", 4)
    ref = copy.deepcopy(model).train()
    ours = L1Sparse(epochs=epochs, lr=0.05, batch_size=64, l1_weight=0.01).unlearn(
        model, data, Accelerator(cpu=True)
    )
    opt = torch.optim.SGD(ref.trainable.parameters(), 0.05, momentum=0.9, weight_decay=5e-4)
    args = types.SimpleNamespace(
        imagenet_arch=False, warmup=0, unlearn_epochs=epochs, no_l1_epochs=0, alpha=0.01, print_freq=10**9
    )
    loader = [(data.retain.images.float(), data.retain.labels)]  # one batch of the 30 retained images
    for epoch in range(epochs):
        ns["FT_iter"]({"retain": loader}, ref, nn.CrossEntropyLoss(), opt, epoch, args, with_l1=True)
    pairs = [
        (a, b)
        for a, b in zip(ours.trainable.state_dict().values(), ref.trainable.state_dict().values())
        if a.is_floating_point()
    ]
    results.check(
        f"Unlearn-Sparse FT_iter(with_l1=True) weights after {epochs} epochs",
        f"{REL}, worst tensor",
        max(max_diff([a], [b])[1] for a, b in pairs),
        2e-6,
    )


def run(refs, results):
    distance(refs, results)
    fisher_ewc(refs, results)
    pruning(refs, results)
    ft_l1(refs, results)
