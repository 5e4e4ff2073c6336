"""Fidelity of DoCo and LAF to the authors' code (yongliang-wu/DoCo @ ebf6ff4, ShaofeiShen768/LAF @ bda3694).

Each parity test computes the reference's equations independently in plain torch (written from the reference's
code, not copied, and not by calling our function twice) and compares with ours on the same tiny inputs. The
other tests pin the behaviours that issue 16 found missing: DoCo's update order, the gradient its discriminator
step carries, its horizontal flip; LAF's representation layer, its per-batch representations under augmentation,
and the reference's random-forgetting protocol.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_diffusion import cat_task, tiny_sd_pipeline
from tiny_diffusion import cpu_accelerator as _accelerator
from tiny_diffusion import load_pipeline as _load
from torch import nn

from unlearn.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# DoCo
# ---------------------------------------------------------------------------------------------------------------


def _reference_cpg(g_adv, g_pres, lam):
    """`DoCo/gradient_clip.adjust_gradient`, per tensor: unit vectors with 1e-8 added to each norm, their dot
    product d, and g_adv -= lam * d * g_pres_unit when d < 0."""
    out = []
    for a, b in zip(g_adv, g_pres):
        b_unit = b / (torch.linalg.norm(b.flatten()) + 1e-8)
        a_unit = a / (torch.linalg.norm(a.flatten()) + 1e-8)
        d = torch.dot(a_unit.flatten(), b_unit.flatten())
        out.append(a - lam * d * b_unit if d < 0 else a.clone())
    return out


def test_doco_cpg_matches_the_reference_equation():
    from unlearn.methods.doco import cpg_reference

    torch.manual_seed(0)
    g_pres = [torch.randn(6, 4), torch.randn(5)]
    g_adv = [
        -0.8 * g_pres[0] + 0.3 * torch.randn(6, 4),
        torch.randn(5),
    ]
    if (g_adv[1] * g_pres[1]).sum() < 0:  # the second tensor does not conflict: it must stay as it is
        g_adv[1] = -g_adv[1]
    for lam in (1.0, 0.5):
        ours = cpg_reference(g_adv, g_pres, lam)
        ref = _reference_cpg(g_adv, g_pres, lam)
        assert not torch.equal(ours[0], g_adv[0])  # the conflicting tensor was corrected
        assert torch.equal(ours[1], g_adv[1])
        for o, r in zip(ours, ref):
            # float32 (the gradients' dtype); the reference adds 1e-8 to each norm, ours 1e-12 to their product
            assert torch.allclose(o, r, rtol=1e-5, atol=1e-7)


def test_doco_generator_gradient_matches_the_reference_flow():
    """The whole model update of the reference's CPG branch on a tiny network: backward the preservation loss,
    clip (accelerate's clip_grad_norm_), keep; backward the adversarial loss, clip; correct per tensor."""
    from unlearn.methods.doco import DoCo

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x_adv, x_pres = torch.randn(4, 5), torch.randn(4, 5)

    def losses(module):
        adv = F.binary_cross_entropy_with_logits(module(x_adv), torch.zeros(4, 3))
        pres = F.mse_loss(module(x_pres), torch.ones(4, 3))
        return adv, pres

    # the reference, with real .grad fields and torch's clip_grad_norm_
    ref_net = copy.deepcopy(net)
    adv, pres = losses(ref_net)
    pres.backward(retain_graph=True)
    torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 0.05)
    b = [p.grad.clone() for p in ref_net.parameters()]
    ref_net.zero_grad()
    adv.backward()
    torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 0.05)
    ref = _reference_cpg([p.grad.clone() for p in ref_net.parameters()], b, 1.0)

    adv, pres = losses(net)
    ours = DoCo(cpg="reference", max_grad_norm=0.05).generator_gradients(adv, pres, list(net.parameters()))
    for o, r in zip(ours, ref):
        # float32 throughout; 1e-6 covers the different epsilon placement and summation order
        assert torch.allclose(o, r, rtol=1e-5, atol=1e-6), (o - r).abs().max()


def test_doco_adversarial_losses_match_bce_with_logits():
    """The reference's criterion is nn.BCEWithLogitsLoss() (mean) with anchor = 0, concept = 1 for the
    discriminator and concept = 0 for the model."""
    from unlearn.methods.doco import _bce

    torch.manual_seed(2)
    logits = torch.randn(3, 1, 2, 2)
    for label in (0.0, 1.0):
        manual = -(label * F.logsigmoid(logits) + (1 - label) * F.logsigmoid(-logits)).mean()
        assert torch.allclose(_bce(logits, label), manual, rtol=1e-6)  # float32 rounding only


class _StepTrainer:
    """Stands in for the Trainer in `discriminator_step`: backward only, the gradients stay to be read; one
    process (no accelerator to gather the batch across)."""

    accelerator = None

    def step(self, loss, optimizer=None, name="loss"):
        loss.backward()


def _discriminator_pair():
    from unlearn.methods.doco import PatchDiscriminator

    torch.manual_seed(3)
    disc = PatchDiscriminator(4, 16)
    x0_anchor = torch.randn(4, 4, 16, 16)
    x0_concept = torch.randn(4, 4, 16, 16, requires_grad=True)
    return disc, x0_anchor, x0_concept


def test_doco_discriminator_step_carries_the_models_adversarial_gradient_as_the_reference():
    """The reference (train.py:1239-1295) backwards the model's adversarial loss through D, zeroes only the
    UNet's optimizer, then adds loss_D's gradient and steps D: D's gradient holds both."""
    from unlearn.methods.doco import DoCo

    disc, x0_anchor, x0_concept = _discriminator_pair()
    ref_disc = copy.deepcopy(disc)
    bce = nn.BCEWithLogitsLoss()
    out = ref_disc(x0_concept).squeeze(1)
    bce(out, torch.zeros_like(out)).backward()  # the model's loss (its UNet grads would be zeroed later)
    real = ref_disc(x0_anchor).squeeze(1)
    fake = ref_disc(x0_concept.detach()).squeeze(1)
    (bce(fake, torch.ones_like(fake)) + bce(real, torch.zeros_like(real))).backward()
    ref = [p.grad.clone() for p in ref_disc.parameters()]

    DoCo().discriminator_step(_StepTrainer(), disc, None, x0_anchor, x0_concept, after_model_step=True)
    for p, r in zip(disc.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=1e-5, atol=1e-7)  # float32, different summation order

    # the textbook loss (the switch), and the warm-up (no model step): no adversarial term
    textbook = copy.deepcopy(disc)
    textbook.zero_grad()
    DoCo(disc_adversarial_term=False).discriminator_step(
        _StepTrainer(), textbook, None, x0_anchor, x0_concept, after_model_step=True
    )
    warm = copy.deepcopy(disc)
    warm.zero_grad()
    DoCo().discriminator_step(_StepTrainer(), warm, None, x0_anchor, x0_concept, after_model_step=False)
    plain = copy.deepcopy(disc)
    plain.zero_grad()
    r, f = plain(x0_anchor), plain(x0_concept.detach())
    (bce(r, torch.zeros_like(r)) + bce(f, torch.ones_like(f))).backward()
    for a, b, c in zip(textbook.parameters(), warm.parameters(), plain.parameters()):
        assert torch.allclose(a.grad, c.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(b.grad, c.grad, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a.grad, p.grad) for a, p in zip(textbook.parameters(), disc.parameters()))


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("doco-fidelity") / "sd")


def test_doco_predict_x0_is_the_reference_schedulers_formula(sd_pipeline):
    """The reference's patched `step_batch` returns (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), a_t = alphas_cumprod[t]."""
    model = _load(sd_pipeline)
    torch.manual_seed(4)
    x_t, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    a = model.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    expected = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(model.predict_x0(x_t, t, eps), expected, rtol=1e-6)  # float32 alphas


def _small_doco(**fields):
    from unlearn.methods.doco import DoCo

    base = dict(
        steps=2, warm_up=0, lr=1e-2, disc_lr=1e-2, batch_size=2, num_anchor_images=4, anchor_steps=2,
        anchor_guidance=2.0, log_every=1,
    )  # fmt: skip
    return DoCo(**{**base, **fields})


@pytest.mark.parametrize("order", ["generator_first", "discriminator_first"])
def test_doco_model_steps_against_the_previous_discriminator(
    sd_pipeline, tmp_path, one_thread, monkeypatch, order
):
    """generator_first (the reference, default): the first model step sees the discriminator as initialised;
    discriminator_first (our former order): it sees a discriminator that has already stepped."""
    from unlearn.methods import doco

    assert doco.DoCo().update_order == "generator_first"
    created, seen = [], []
    original_init = doco.PatchDiscriminator.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append((self, [p.detach().clone() for p in self.parameters()]))

    real = doco.DoCo.generator_gradients

    def spy(self, adv, pres, params, *rest):
        disc, start = created[0]
        seen.append(all(torch.equal(p, s) for p, s in zip(disc.parameters(), start)))
        return real(self, adv, pres, params, *rest)

    monkeypatch.setattr(doco.PatchDiscriminator, "__init__", recording_init)
    monkeypatch.setattr(doco.DoCo, "generator_gradients", spy)
    model = _load(sd_pipeline)
    _small_doco(steps=1, update_order=order).unlearn(
        model, cat_task(model, num_images=2), _accelerator(tmp_path)
    )
    assert seen == [order == "generator_first"]
    assert not all(torch.equal(p, s) for p, s in zip(created[0][0].parameters(), created[0][1]))  # D stepped


def test_doco_hflip_mirrors_half_the_drawn_images_and_is_on_by_default(
    sd_pipeline, tmp_path, one_thread, monkeypatch
):
    from unlearn.methods import doco

    torch.manual_seed(5)
    images = torch.rand(4000, 3, 4, 6)
    flipped = doco.random_hflip(images)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert (mirrored | kept).all()  # each image is itself or its left-right mirror, nothing else
    assert abs(mirrored.float().mean().item() - 0.5) < 0.03  # p = 0.5; 4000 draws: 0.03 is > 3.5 sigma

    assert doco.DoCo().hflip is True  # the README's commands pass --hflip
    calls = []
    real = doco.random_hflip
    monkeypatch.setattr(doco, "random_hflip", lambda x: calls.append(len(x)) or real(x))
    model = _load(sd_pipeline)
    _small_doco(steps=1).unlearn(model, cat_task(model, num_images=2), _accelerator(tmp_path / "on"))
    assert calls == [2, 2]  # the adversarial and the preservation batch
    calls.clear()
    _small_doco(steps=1, hflip=False).unlearn(
        model, cat_task(model, num_images=2), _accelerator(tmp_path / "off")
    )
    assert calls == []


def test_doco_refuses_an_unknown_update_order():
    with pytest.raises(ConfigError, match="update_order"):
        _small_doco(update_order="random")


# ---------------------------------------------------------------------------------------------------------------
# LAF
# ---------------------------------------------------------------------------------------------------------------


def test_laf_vae_loss_matches_the_reference_formula():
    """`Train.vae_loss_function`: MSE(sum)/B + 0.025 * KLD/B with KLD = -1/2 sum(log(s^2 + 1e-8) + 1 - mu^2 - s^2),
    s = exp(logvar / 2) as `CNN_VAE_Encoder` returns it."""
    from unlearn.methods.laf import vae_loss

    torch.manual_seed(6)
    recon, e = torch.rand(5, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    sigma = torch.exp(0.5 * logvar)
    mse = ((recon - e) ** 2).sum() / 5
    kld = -0.5 * (torch.log(sigma**2 + 1e-8) + 1 - mu**2 - sigma**2).sum() / 5
    assert torch.allclose(vae_loss(recon, e, mu, logvar, 0.025), mse + 0.025 * kld, rtol=1e-12)  # float64


def test_laf_ue_loss_matches_the_reference_formula():
    """L_UE = sum_r exp(l_s / (l_s + 1)) - sum_f exp(l_u / (l_u + 1)), l = per-sample summed squared error
    (`extractor_loss_functionnmse` of the retain VAE minus that of the forget VAE)."""
    from unlearn.methods.laf import ue_loss

    torch.manual_seed(7)
    recon_r, e_r = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    recon_f, e_f = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    mse = nn.MSELoss(reduction="none")
    l_s, l_u = mse(recon_r, e_r).sum(1), mse(recon_f, e_f).sum(1)
    expected = torch.exp(l_s / (l_s + 1)).sum() - torch.exp(l_u / (l_u + 1)).sum()
    assert torch.allclose(ue_loss(recon_r, e_r, recon_f, e_f), expected, rtol=1e-12)  # float64


def test_laf_ra_loss_matches_the_reference_formula():
    """`extractor_loss_functioncosine`: COS = CosineEmbeddingLoss(target +1, reduction none) = 1 - cos, and
    L_RA = sum_r log(exp(COS_r) / sum_f exp(COS_f / temp)): the temperature divides the forget term only."""
    from unlearn.methods.laf import ra_loss

    torch.manual_seed(8)
    s_e, s_t = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    u_e, u_t = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    cos_loss = nn.CosineEmbeddingLoss(reduction="none")
    for temp in (5.0, 20.0):
        cos_r = cos_loss(s_e, s_t, torch.ones(6, dtype=torch.float64))
        cos_f = cos_loss(u_e, u_t, torch.ones(4, dtype=torch.float64))
        expected = torch.sum(torch.log(torch.exp(cos_r) / torch.sum(torch.exp(cos_f / temp))))
        # 1e-7: CosineEmbeddingLoss clamps the norms with an epsilon of its own (1e-12 squared)
        assert torch.allclose(ra_loss(s_e, s_t, u_e, u_t, temp), expected, rtol=1e-7)


def _digits_cnn():
    from unlearn.models.classifier import build_classifier

    torch.manual_seed(9)
    model = build_classifier("digits_cnn", 10)
    model.eval()
    return model


def test_laf_reads_the_linear_output_before_its_activation_as_the_reference_fc1():
    """The reference's CNN returns `fc1`'s output (256-d, no activation) as the embedding; the digits CNN's
    matching layer is its last body Linear (before the ReLU). ResNets have none: the head's input."""
    from unlearn.methods.laf import LAF, representation_site, tap
    from unlearn.models.classifier import build_classifier

    assert LAF().representation == "linear_output"
    model = _digits_cnn()
    images = torch.rand(16, 1, 8, 8)
    name, output = representation_site(model, "linear_output", images)
    assert output and isinstance(dict(model.network.named_modules())[name], nn.Linear)
    with torch.no_grad():
        ours = tap(model, dict(model.network.named_modules())[name], output, images)
        body = model.network.body
        by_hand = body[:-1](model.prepare(images))  # everything up to and including the Linear, not the ReLU
    assert torch.equal(ours, by_hand)
    assert (ours < 0).any()  # pre-activation: the head's input (post-ReLU) never is negative

    name, output = representation_site(model, "head_input", images)
    assert not output and dict(model.network.named_modules())[name] is model.head
    resnet = build_classifier("resnet18_cifar", 10)
    resnet.eval()
    name, output = representation_site(resnet, "linear_output", torch.rand(2, 3, 32, 32))
    assert not output and dict(resnet.network.named_modules())[name] is resnet.head


def _tiny_task(per_class: int = 6):
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset

    train = load_dataset("digits", "train")
    keep = torch.cat([(train.labels == c).nonzero().flatten()[:per_class] for c in range(10)])
    test = load_dataset("digits", "test")
    return forget_classes(train.subset(keep), test.subset(torch.arange(20)), [3])


def test_laf_trains_on_the_pre_activation_representation(one_thread, monkeypatch):
    from accelerate import Accelerator

    from unlearn.methods import laf

    inputs = []
    real = laf.EmbeddingVAE.forward
    monkeypatch.setattr(
        laf.EmbeddingVAE, "forward", lambda self, e: inputs.append(e.detach()) or real(self, e)
    )
    laf.LAF(epochs=1, vae_epochs=1).unlearn(_digits_cnn(), _tiny_task(), Accelerator(cpu=True))
    assert inputs and all(e.shape[1] == 128 for e in inputs)
    assert any((e < 0).any() for e in inputs)  # the old head input (after a ReLU) was never negative


def test_laf_with_augmentation_recomputes_the_vae_representations_every_batch(one_thread, monkeypatch):
    """The reference's `vae_train` runs the frozen model on every (augmented) batch of every epoch; so does ours
    with `augment`, and the extractor steps and the repair see augmented batches too."""
    from accelerate import Accelerator

    from unlearn.methods import laf

    assert laf.LAF().augment == "none"  # the reference's MNIST / Fashion-MNIST loaders do not augment
    sizes = []
    monkeypatch.setattr(
        laf, "AUGMENTATIONS", {"none": None, "crop_flip": lambda x: sizes.append(len(x)) or x.flip(-1)}
    )
    task = _tiny_task()  # 6 forget, 54 retain images
    laf.LAF(
        epochs=1, vae_epochs=2, vae_batch_size=16, batch_size=4, repair_epochs=1, augment="crop_flip"
    ).unlearn(_digits_cnn(), task, Accelerator(cpu=True))
    vae_all = 2 * [16, 16, 16, 12]  # 60 images, 2 epochs
    vae_forget = 2 * [6]
    extractor = [8, 6]  # zip(forget 4 + 2, retain ...): two batch pairs, one draw each
    repair = 13 * [4] + [2]  # one pass over the 54 retain images
    assert sizes == vae_all + vae_forget + extractor + repair
    with pytest.raises(ConfigError, match="augment"):
        laf.LAF(augment="jitter")


def test_laf_without_augmentation_computes_the_representations_once_with_the_same_values(
    one_thread, monkeypatch
):
    """The frozen model in eval mode gives the reference's per-batch recomputation the same values, so `none`
    computes them once: the VAE sees exactly the original model's fc1-style output of every example, once per
    epoch."""
    from accelerate import Accelerator

    from unlearn.methods import laf

    model = _digits_cnn()
    task = _tiny_task()
    images = torch.stack([task.forget[i][0] for i in range(len(task.forget))])
    name, output = laf.representation_site(model, "linear_output", images)
    site = dict(model.network.named_modules())[name]
    seen = []
    real = laf.EmbeddingVAE.forward
    monkeypatch.setattr(laf.EmbeddingVAE, "forward", lambda self, e: seen.append(e.detach()) or real(self, e))
    laf.LAF(vae_epochs=1, vae_batch_size=4).fit_vae(
        model, site, output, task.forget, Accelerator(cpu=True), "v"
    )
    with torch.no_grad():
        expected = laf.tap(model, site, output, images)
    got = torch.cat(seen)
    rows = [torch.nonzero((expected == row).all(1)).flatten().tolist() for row in got]
    assert all(len(r) == 1 for r in rows) and sorted(r[0] for r in rows) == list(range(len(images)))
    assert not site._forward_hooks and not model.head._forward_pre_hooks  # no hook is left behind


def test_forget_fraction_per_class_shares_is_the_reference_random_protocol():
    """`Data.random_data`: int(0.4 * class size) random examples of each of the classes 5-9, none elsewhere."""
    from unlearn.data import forget_fraction
    from unlearn.datasets import load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    shares = {c: 0.4 for c in range(5, 10)}
    task = forget_fraction(train, test, shares, seed=0)
    counts = torch.bincount(task.forget.labels, minlength=10)
    sizes = torch.bincount(train.labels, minlength=10)
    assert counts.tolist() == [0] * 5 + [int(0.4 * int(sizes[c])) for c in range(5, 10)]
    assert len(task.retain) == len(train) - int(counts.sum())
    assert len(task.test) == len(test) and task.forget_classes == ()
    again = forget_fraction(train, test, shares, seed=0)
    assert torch.equal(again.forget.labels, task.forget.labels)
    assert torch.equal(again.forget.images, task.forget.images)
    with pytest.raises(ConfigError, match="class ids"):
        forget_fraction(train, test, {11: 0.4})
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        forget_fraction(train, test, {5: 1.4})


def test_recipe_accepts_per_class_forget_shares():
    from unlearn.pipeline import default_output
    from unlearn.recipe import load_recipe

    recipe = load_recipe(
        "recipes/classifier/digits/laf.yaml",
        ["data.forget_class=null", "data.forget_fraction={5: 0.4, 6: 0.4, 7: 0.4, 8: 0.4, 9: 0.4}"],
    )
    assert recipe.data.forget_fraction == {5: 0.4, 6: 0.4, 7: 0.4, 8: 0.4, 9: 0.4}
    assert "random-5x40" in str(default_output(recipe))
