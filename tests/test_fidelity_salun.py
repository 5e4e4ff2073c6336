"""SalUn against its authors' code (OPTML-Group/Unlearn-Saliency @ a6e89fd): reference-parity tests.

Each parity test computes the reference's quantity independently, in plain torch from the reference's equations
(`Classification/generate_mask.py`, `Classification/unlearn/RL.py` + PR #33, `Classification/unlearn/RL_pro.py`,
`DDPM/runners/diffusion.py` generate_mask / saliency_unlearn, `DDPM/models/diffusion.py`), on the same tiny
inputs as ours, and compares. Tolerances are stated at each assert.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_diffusion import cpu_accelerator, load_pipeline, tiny_ddpm_pipeline
from torch.utils.data import TensorDataset

from unlearn.params import ParamMask

# -- helpers: tiny inputs and the reference's equations --------------------------------------------------------


def _classifier(seed: int = 0):
    from unlearn.models.classifier import build_classifier

    torch.manual_seed(seed)
    return build_classifier("digits_cnn", 10)


def _digits(n: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )


def _batches(dataset, order, batch_size):
    """The batches a loader over `dataset` in `order` yields (a DataLoader, so that the global RNG advances as
    it does when ours iterates its loader: identical inputs, identical noise)."""
    subset = torch.utils.data.Subset(dataset, order)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)


def _loader_order(n: int, seed: int) -> list[int]:
    """The reference's forget order: a DataLoader(shuffle=True) made right after torch.manual_seed(seed)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    order = [
        int(i) for batch in torch.utils.data.DataLoader(range(n), batch_size=n, shuffle=True) for i in batch
    ]
    torch.set_rng_state(state)
    return order


def _reference_ratio_mask(gradients: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """generate_mask.py's post-processing: |summed gradient|, global ranks of -|g| by argsort, rank < int(N·ratio)."""
    flat = -torch.cat([g.abs().flatten() for g in gradients.values()])
    ranks = torch.argsort(torch.argsort(flat))
    keep = ranks < int(len(flat) * ratio)
    out, start = {}, 0
    for name, g in gradients.items():
        out[name] = keep[start : start + g.numel()].view_as(g)
        start += g.numel()
    return out


def _mismatches(ours: ParamMask, reference: dict[str, torch.Tensor]) -> int:
    assert set(ours.masks) == set(reference)
    return sum(int((ours.masks[n].bool() != reference[n].bool()).sum()) for n in reference)


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    return tiny_ddpm_pipeline(tmp_path_factory.mktemp("fidelity-salun") / "ddpm", num_classes=3)


# -- the classifier's saliency mask --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity, ratio", [(0.5, 0.5), (0.8, 0.2)])
def test_classifier_mask_matches_generate_mask_py(one_thread, sparsity, ratio):
    """Ours at `sparsity` s equals the reference's with_{1-s}.pt: -CE gradients summed over the forget loader in
    its seeded shuffled order (batch 4 over 10 images, so the last batch weighs double and order matters), eval mode."""
    from unlearn.methods.salun import SalUn

    seed, forget = 2, _digits(10)
    model = _classifier()
    torch.manual_seed(seed)  # the run's seed, as the pipeline sets it
    ours = SalUn(batch_size=4, sparsity=sparsity).mask(
        model, SimpleNamespace(forget=forget), SimpleNamespace(project_dir=None)
    )

    reference = _classifier()
    reference.eval()
    summed = {n: torch.zeros_like(p) for n, p in reference.trainable.named_parameters()}
    for images, labels in _batches(forget, _loader_order(len(forget), seed), 4):
        reference.zero_grad()
        (-F.cross_entropy(reference(images), labels)).backward()
        for n, p in reference.trainable.named_parameters():
            summed[n] += p.grad
    # exact: the same float operations on the same batches; only an exact tie at the threshold could differ
    assert _mismatches(ours, _reference_ratio_mask(summed, ratio)) == 0
    assert abs(ours.density() - ratio) < 1e-3


def test_classifier_mask_order_is_the_seeded_loaders_and_changes_the_mask(one_thread):
    """The batching changes the mask (sums of batch means): the shuffled pass differs from the dataset-order pass."""
    from unlearn.methods.salun import SalUn, seeded_order

    forget = _digits(10)
    assert list(seeded_order(forget, 7).indices) == _loader_order(10, 7)
    model = _classifier()
    torch.manual_seed(7)
    shuffled = SalUn(batch_size=4).mask(
        model, SimpleNamespace(forget=forget), SimpleNamespace(project_dir=None)
    )
    in_order = SalUn(batch_size=4, mask_shuffle=False).mask(
        _classifier(), SimpleNamespace(forget=forget), SimpleNamespace(project_dir=None)
    )
    assert _mismatches(shuffled, in_order.masks) > 0


def test_classifier_mask_sees_the_training_augmentation(one_thread):
    """With augment: crop_flip the mask pass sees augmented batches, as the reference's (training-loader) pass."""
    from unlearn.methods.salun import SalUn
    from unlearn.train import random_crop_flip

    forget, acc = _digits(10), SimpleNamespace(project_dir=None)
    data = SimpleNamespace(forget=forget)
    model = _classifier()
    torch.manual_seed(3)
    ours = SalUn(batch_size=5, augment="crop_flip", mask_shuffle=False).mask(model, data, acc)

    reference = _classifier()
    reference.eval()
    summed = {n: torch.zeros_like(p) for n, p in reference.trainable.named_parameters()}
    torch.manual_seed(3)
    for images, labels in _batches(forget, list(range(10)), 5):
        reference.zero_grad()
        (-F.cross_entropy(reference(random_crop_flip(images)), labels)).backward()
        for n, p in reference.trainable.named_parameters():
            summed[n] += p.grad
    assert _mismatches(ours, _reference_ratio_mask(summed, 0.5)) == 0  # same draws, same float ops: exact
    plain = SalUn(batch_size=5, mask_shuffle=False).mask(_classifier(), data, acc)
    assert _mismatches(ours, plain.masks) > 0


# -- the RL step (Classification/unlearn/RL.py with PR #33's restore) -----------------------------------------


def test_rl_step_masks_the_gradient_and_pins_weights_against_decay_and_momentum(one_thread):
    """Two SGD steps (momentum 0.9, weight decay 5e-4) of our Trainer with a mask equal the reference's
    `grad *= mask; step; reset pinned entries to θ0 and zero their momentum`, computed here by hand."""
    from unlearn.train import Trainer

    model, images, labels = _classifier(), *_digits(6)[:]
    generator = torch.Generator().manual_seed(0)
    mask = ParamMask(
        {n: torch.rand(p.shape, generator=generator) < 0.5 for n, p in model.trainable.named_parameters()}
    )
    twin = _classifier()
    model.eval(), twin.eval()  # no dropout draws: the two forward passes see the same network
    start = {n: p.detach().clone() for n, p in twin.trainable.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    trainer = Trainer(model, optimizer, None, stage="rl", total=2, mask=mask)
    for _ in range(2):
        trainer.step(F.cross_entropy(model(images), labels))

    params = dict(twin.trainable.named_parameters())
    buffers = {n: torch.zeros_like(p) for n, p in params.items()}
    lr, momentum, decay = 0.1, 0.9, 5e-4
    for step in range(2):
        twin.zero_grad()
        F.cross_entropy(twin(images), labels).backward()
        with torch.no_grad():
            for n, p in params.items():
                keep = mask.masks[n].float()
                # RL.py: param.grad *= mask; SGD adds weight decay to the gradient
                d = p.grad * keep + decay * p
                buffers[n] = d if step == 0 else momentum * buffers[n] + d
                p -= lr * buffers[n]
                p.copy_(torch.where(keep.bool(), p, start[n]))  # PR #33: pinned entries back to θ0
                buffers[n] *= keep  # and their momentum cleared
    for n, p in model.trainable.named_parameters():
        keep = mask.masks[n]
        assert torch.equal(p.detach()[~keep], start[n][~keep]), n  # pinned: bit for bit
        # free entries: the same arithmetic in another order; 1e-6 covers float32 reassociation
        torch.testing.assert_close(p.detach(), params[n].detach(), atol=1e-6, rtol=1e-5)


# -- SalUn-soft (Classification/unlearn/RL_pro.py) ------------------------------------------------------------


def test_soft_step_matches_rl_proximal():
    """k and the soft threshold as RL_proximal computes them (CIFAR branch: k constant within an epoch)."""
    from unlearn.methods.salun import soft_k, soft_threshold_

    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(7, 5, generator=generator), torch.randn(11, generator=generator)]
    params = [i + 0.1 * torch.randn(i.shape, generator=generator) for i in init]
    n = sum(p.numel() for p in params)
    epochs, steps_per_epoch, mask_ratio = 3, 4, 0.5
    total = epochs * steps_per_epoch
    for step in (1, 4, 5, 12):
        epoch = (step - 1) // steps_per_epoch
        k = int(mask_ratio * ((total - (epoch * steps_per_epoch + 1)) / total * n))  # RL_pro.py's `ratio`
        assert soft_k(step, total, epochs, mask_ratio, n) == k
        flat, flat_init = torch.cat([p.flatten() for p in params]), torch.cat([i.flatten() for i in init])
        diff = flat - flat_init
        threshold = -torch.topk(-diff.abs(), k)[0][-1]
        expected = torch.where(
            diff > threshold, flat - threshold, torch.where(diff < -threshold, flat + threshold, flat_init)
        )
        got = [p.clone() for p in params]
        tau = soft_threshold_(got, init, k)
        assert float(tau) == float(threshold)
        # the same subtraction per entry: exact
        assert torch.equal(torch.cat([g.flatten() for g in got]), expected)


@pytest.mark.parametrize("anchor", ["epoch", "original"])
def test_soft_anchor_is_retaken_every_epoch_like_rl_proximal(one_thread, monkeypatch, anchor):
    """RL_proximal runs once per epoch and takes `init_params` when it starts: in epoch 2 the proximal anchor is
    the weights epoch 1 ended with (soft_anchor: epoch); `original` keeps the weights before unlearning."""
    from accelerate import Accelerator

    from unlearn.data import UnlearnData
    from unlearn.methods import salun

    calls = []
    real = salun.soft_threshold_

    def recording(params, init, k, free=None):
        tau = real(params, init, k, free)
        calls.append(([i.clone() for i in init], [p.detach().clone() for p in params]))
        return tau

    monkeypatch.setattr(salun, "soft_threshold_", recording)
    model = _classifier()
    original = [p.detach().clone() for p in model.trainable.parameters()]
    forget, retain = _digits(8, 1), _digits(16, 2)
    data = UnlearnData(forget, retain, retain, forget, 10)
    salun.SalUn(epochs=2, batch_size=8, soft=True, soft_anchor=anchor).unlearn(
        model, data, Accelerator(cpu=True)
    )
    steps_per_epoch = 3  # one forget batch, two retain batches
    assert len(calls) == 2 * steps_per_epoch
    end_of_epoch_1 = calls[steps_per_epoch - 1][1]
    for init, _ in calls[:steps_per_epoch]:
        assert all(torch.equal(i, o) for i, o in zip(init, original))
    for init, _ in calls[steps_per_epoch:]:
        wanted = end_of_epoch_1 if anchor == "epoch" else original
        assert all(torch.equal(i, w) for i, w in zip(init, wanted))
    assert not all(torch.equal(e, o) for e, o in zip(end_of_epoch_1, original))  # so the two cases differ


# -- SalUn on the class-conditional DDPM (DDPM/runners/diffusion.py) -------------------------------------------


def test_antithetic_timesteps_pair_t_with_T_minus_1_minus_t(ddpm_folder):
    model = load_pipeline(ddpm_folder)
    x0 = torch.zeros(5, 1, 8, 8)
    torch.manual_seed(0)
    _, noise, t = model.noised(x0, antithetic=True)
    torch.manual_seed(0)
    e = torch.randn_like(x0)  # the reference: e = randn_like(x), then t
    half = torch.randint(0, 100, (5 // 2 + 1,))
    assert torch.equal(noise, e)
    assert torch.equal(t, torch.cat([half, 100 - half - 1])[:5])


def test_mask_guidance_default_is_the_reference_cond_scale_2(ddpm_folder):
    """(1 + s) ε_c − s ε_∅ at the DDPM code's cond_scale s = 2 is our ε_u + w (ε_c − ε_u) at w = 3."""
    from unlearn.methods.salun import SalUnDiffusion

    model = load_pipeline(ddpm_folder)
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 90])
    with torch.no_grad():
        eps_c = model(x_t, t, model.encode([0, 1, 2]))
        eps_null = model(x_t, t, model.encode(model.null_conditions(3)))
        guided = model.guided(
            x_t,
            t,
            model.encode([0, 1, 2]),
            model.encode(model.null_conditions(3)),
            SalUnDiffusion().mask_guidance,
        )
    # one batched UNet call against two: float32 reassociation only
    torch.testing.assert_close(guided, 3.0 * eps_c - 2.0 * eps_null, atol=1e-5, rtol=1e-5)


def test_ddpm_mask_matches_generate_mask(ddpm_folder, tmp_path, one_thread):
    """The reference's generate_mask: eval mode, seeded shuffled forget loader, e then antithetic t, test-mode
    output (1 + 2) ε_c − 2 ε_∅, loss = per-image sum of (e − out)² averaged, clip each batch's full gradient to
    1, sum, |·|, global top half."""
    from unlearn.methods.salun import SalUnDiffusion

    seed, forget = (
        4,
        TensorDataset(
            torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([2] * 7)
        ),
    )
    model = load_pipeline(ddpm_folder)
    model.train_only("full")
    torch.manual_seed(seed)
    ours = SalUnDiffusion(batch_size=3).mask(model, SimpleNamespace(forget=forget), cpu_accelerator(tmp_path))

    reference = load_pipeline(ddpm_folder)
    unet = reference.unet.eval()
    summed = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
    alphas = reference.scheduler.alphas_cumprod
    torch.manual_seed(seed)
    for images, labels in _batches(forget, _loader_order(len(forget), seed), 3):
        x = images * 2 - 1
        n = len(x)
        e = torch.randn_like(x)
        t = torch.randint(0, 100, (n // 2 + 1,))
        t = torch.cat([t, 100 - t - 1])[:n]
        a = alphas[t].view(-1, 1, 1, 1)
        x = x * a.sqrt() + e * (1 - a).sqrt()
        output = (
            3.0 * unet(x, t, class_labels=labels).sample
            - 2.0 * unet(x, t, class_labels=torch.full_like(labels, 3)).sample
        )
        loss = (e - output).square().sum(dim=(1, 2, 3)).mean(dim=0)
        unet.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for name, p in unet.named_parameters():
            if p.grad is not None:
                summed[name] += p.grad
    wrong = _mismatches(ours, _reference_ratio_mask(summed, 0.5))
    # one batched CFG call against two: float32 reassociation may flip entries within ~1e-7 of the median
    assert wrong <= 0.001 * sum(g.numel() for g in summed.values()), wrong


def _ddpm_task(model):
    from unlearn.data import ConceptPrompts, UnlearnData

    generator = torch.Generator().manual_seed(5)
    forget = TensorDataset(torch.rand(4, 1, 8, 8, generator=generator), torch.tensor([1] * 4))
    retain = TensorDataset(torch.rand(4, 1, 8, 8, generator=generator), torch.tensor([0, 2, 0, 2]))
    prompts = ConceptPrompts(concept="1", forget=[1], anchor=[2], paraphrases=[], retain=[0, 2])
    return UnlearnData(forget, retain, retain, forget, 3, (1,), prompts)


def _reference_unlearning_loss(unet, alphas, forget, retain, alpha, drop=0.1):
    """saliency_unlearn's loss, in our draw order: forget: e, antithetic t, keep draws of the forget and pseudo
    passes; retain: keep draws, e, antithetic t. mode="train" drops a condition with probability cond_drop_prob."""

    def antithetic(n):
        t = torch.randint(0, 100, (n // 2 + 1,))
        return torch.cat([t, 100 - t - 1])[:n]

    def dropped(labels):
        return torch.where(torch.rand(len(labels)) < drop, torch.full_like(labels, 3), labels)

    x, c = forget
    x = x * 2 - 1
    e = torch.randn_like(x)
    t = antithetic(len(x))
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = x * a.sqrt() + e * (1 - a).sqrt()
    pseudo_c = torch.full_like(c, 2)  # (label_to_forget + 1) % K
    output = unet(x_t, t, class_labels=dropped(c)).sample
    pseudo = unet(x_t, t, class_labels=dropped(pseudo_c)).sample.detach()
    forget_loss = F.mse_loss(pseudo, output)  # criteria = nn.MSELoss(): a mean
    x, c = retain
    x = x * 2 - 1
    c = dropped(c)
    e = torch.randn_like(x)
    t = antithetic(len(x))
    a = alphas[t].view(-1, 1, 1, 1)
    out = unet(x * a.sqrt() + e * (1 - a).sqrt(), t, class_labels=c).sample
    remain_loss = (e - out).square().sum(dim=(1, 2, 3)).mean(dim=0)  # noise_estimation_loss_conditional
    return forget_loss + alpha * remain_loss


def test_ddpm_unlearning_loss_matches_saliency_unlearn(ddpm_folder, one_thread):
    from unlearn.methods.salun import SalUnDiffusion

    model = load_pipeline(ddpm_folder)
    data = _ddpm_task(model)
    method = SalUnDiffusion(retain_weight=1e-3)
    forget, retain = data.forget[:], data.retain[:]
    torch.manual_seed(11)
    ours = method.forget_loss(model, forget, {1: 2}) + method.retain_weight * method.retain_loss(
        model, retain
    )
    reference = load_pipeline(ddpm_folder)
    torch.manual_seed(11)
    theirs = _reference_unlearning_loss(
        reference.unet, reference.scheduler.alphas_cumprod, forget, retain, 1e-3
    )
    # the same draws and UNet calls: float32 rounding only
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_retain_loss_scale_is_the_per_image_sum(ddpm_folder):
    """retain_reduction sum = C·H·W × mean: the reference's α = 1e-3 is 0.064 on a pixel mean at 1×8×8."""
    from unlearn.methods.salun import SalUnDiffusion

    model = load_pipeline(ddpm_folder)
    batch = _ddpm_task(model).retain[:]
    torch.manual_seed(0)
    summed = SalUnDiffusion(condition_dropout=0.0).retain_loss(model, batch)
    torch.manual_seed(0)
    mean = SalUnDiffusion(condition_dropout=0.0, retain_reduction="mean").retain_loss(model, batch)
    torch.testing.assert_close(summed, 64 * mean, rtol=1e-5, atol=0)  # two float32 reductions of 256 terms


def test_condition_dropout_reaches_every_training_forward(ddpm_folder):
    """mode="train" drops conditions in the forget, the pseudo and the retain pass; at probability 1 all three
    see the null class, so the forget loss vanishes and the retain loss is the unconditional one."""
    from unlearn.methods.salun import SalUnDiffusion

    model = load_pipeline(ddpm_folder)
    data = _ddpm_task(model)
    method = SalUnDiffusion(condition_dropout=1.0)
    with torch.no_grad():
        assert float(method.forget_loss(model, data.forget[:], {1: 2})) == 0.0
        images, _ = data.retain[:]
        torch.manual_seed(0)
        dropped = method.retain_loss(model, data.retain[:])
        torch.manual_seed(0)
        torch.rand(4)  # the dropout draw the first call made
        unconditional = SalUnDiffusion(condition_dropout=0.0).retain_loss(
            model, (images, torch.full((4,), 3))
        )
    assert torch.equal(dropped, unconditional)


@pytest.mark.parametrize("clip_before_mask", [True, False])
def test_step_clips_the_full_gradient_then_masks(ddpm_folder, one_thread, clip_before_mask):
    """saliency_unlearn: backward, clip_grad_norm_(all parameters), grad *= mask, step (max norm 0.1 here, so
    that the clip acts on this tiny model). Our order before
    issue 16 (mask, then clip) is the switch's other value and gives another step. (SGD here rather than the
    reference's Adam: Adam's first step is invariant to the gradient's scale, so it would hide the order.)"""
    from unlearn.train import Trainer

    model, reference = load_pipeline(ddpm_folder), load_pipeline(ddpm_folder)
    generator = torch.Generator().manual_seed(0)
    mask = ParamMask(
        {n: torch.rand(p.shape, generator=generator) < 0.5 for n, p in model.unet.named_parameters()}
    )
    data = _ddpm_task(model)

    def loss(m):
        torch.manual_seed(3)
        return _reference_unlearning_loss(
            m.unet, m.scheduler.alphas_cumprod, data.forget[:], data.retain[:], 1e-3
        )

    optimizer = torch.optim.SGD(model.unet.parameters(), lr=0.1)
    trainer = Trainer(
        model,
        optimizer,
        None,
        stage="s",
        total=1,
        mask=mask,
        max_grad_norm=0.1,
        clip_before_mask=clip_before_mask,
    )
    trainer.step(loss(model))

    params = dict(reference.unet.named_parameters())
    loss(reference).backward()
    norm = torch.nn.utils.clip_grad_norm_(params.values(), 0.1)
    assert norm > 0.2  # the clip acts, on the masked gradient too (about norm / sqrt 2), so the order matters
    for n, p in params.items():
        p.grad *= mask.masks[n]
    torch.optim.SGD(params.values(), lr=0.1).step()
    # float32 rounding of the same arithmetic; the other order differs by the clip's scale factor (> 1e-3 here)
    same = all(
        torch.allclose(p.detach(), params[n].detach(), atol=1e-6, rtol=1e-5)
        for n, p in model.unet.named_parameters()
    )
    assert same == clip_before_mask


def test_pruned_entries_never_count_in_the_clip(one_thread):
    """A pruned model's pruned weights have no gradient under the reference's torch pruning, so they are zeroed
    before the full gradient is clipped, whatever the method's mask order."""
    from unlearn.train import Trainer

    model, twin = _classifier(), _classifier()
    generator = torch.Generator().manual_seed(1)
    pruning = {
        n: torch.rand(p.shape, generator=generator) < 0.5
        for n, p in model.trainable.named_parameters()
        if p.dim() > 1
    }
    model.pruning_mask = ParamMask(pruning)
    images, labels = _digits(6)[:]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Trainer(model, optimizer, None, stage="p", total=1, max_grad_norm=0.01).step(
        F.cross_entropy(model(images), labels)
    )

    params = dict(twin.trainable.named_parameters())
    with torch.no_grad():
        for n, keep in pruning.items():
            params[n].mul_(keep)
    F.cross_entropy(twin(images), labels).backward()
    for n, keep in pruning.items():
        params[n].grad *= keep  # torch.nn.utils.prune: the gradient of weight_orig is masked
    torch.nn.utils.clip_grad_norm_(params.values(), 0.01)
    torch.optim.SGD(params.values(), lr=0.1).step()
    for n, p in model.trainable.named_parameters():
        torch.testing.assert_close(p.detach(), params[n].detach(), atol=1e-7, rtol=1e-6)  # float32 rounding
