"""DoCo (yongliang-wu/DoCo) and LAF (ShaofeiShen768/LAF): the authors' own functions vs ours on tiny inputs.

DoCo: DoCo/gradient_clip.py `adjust_gradient` (the CPG model update, with SGD(lr=1) so that the step is -grad) and
DoCo/gan.py `PatchGANDiscriminator` (imported from the file) against our DoCo.generator_gradients and
PatchDiscriminator, on a tiny cross-attention UNet. LAF: the losses of VUnlearning.py and Train.py (exec'd with
`.cuda()` the identity), its Model.py VAE (torchsummary stubbed) vs ours."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
from common import extract, max_diff
from torch import nn

DOCO, LAF = "yongliang-wu+DoCo", "ShaofeiShen768+LAF"
FILES = [(DOCO, "DoCo/gradient_clip.py", None), (DOCO, "DoCo/gan.py", None)]
FILES += [(LAF, "VUnlearning.py", None), (LAF, "Train.py", None), (LAF, "Model.py", None)]


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyUNet(nn.Module):
    """Cross-attention keys/values named like diffusers' (`attn2.to_k`, `attn2.to_v`) plus a frozen part."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.attn2 = nn.Module()
        self.attn2.to_k = nn.Linear(6, 4, bias=False)
        self.attn2.to_v = nn.Linear(6, 4, bias=False)

    def forward(self, x, cond):
        k, v = self.attn2.to_k(cond), self.attn2.to_v(cond)
        h = self.conv_in(x)
        q = h.flatten(2).transpose(1, 2)
        out = torch.softmax(q @ k.transpose(1, 2) / 2, -1) @ v
        return h + 3 * out.transpose(1, 2).reshape(x.shape)


def up(t):  # the tiny latent is 8x8; both discriminators see a 32x32 view (four blocks)
    return F.interpolate(t, size=32, mode="nearest")


def doco(refs, results):
    from unlearn.methods.doco import DoCo, PatchDiscriminator

    adjust_gradient = load_module(
        refs.path(DOCO, "DoCo/gradient_clip.py"), "doco_gradient_clip"
    ).adjust_gradient
    PatchGAN = load_module(refs.path(DOCO, "DoCo/gan.py"), "doco_gan").PatchGANDiscriminator
    torch.manual_seed(0)
    unet = TinyUNet()
    unet.conv_in.requires_grad_(False)
    x, cond_target, cond_prior = torch.randn(8, 4, 8, 8), torch.randn(8, 5, 6), torch.randn(8, 5, 6)
    noise_prior = torch.randn(8, 4, 8, 8)
    disc_ref = PatchGAN(4)
    backward = types.SimpleNamespace(backward=lambda loss, **kw: loss.backward(**kw), sync_gradients=True)

    def losses(model, disc):
        pred = model(x, cond_target)
        out = disc(up(pred)).squeeze(1)
        adv = nn.BCEWithLogitsLoss()(out, torch.zeros_like(out))
        return pred, adv, F.mse_loss(model(x, cond_prior), noise_prior)

    def reference_step(ref_unet, disc, lam, max_norm):
        params = [p for n, p in ref_unet.named_parameters() if "attn2" in n]
        before = [p.detach().clone() for p in params]
        pred, adv, prior = losses(ref_unet, disc)
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)  # noqa: E731
        adjust_gradient(ref_unet, torch.optim.SGD(params, lr=1.0), backward, clip, adv, prior, lambda_=lam)
        return pred, [b - p.detach() for b, p in zip(before, params)]

    for lam, max_norm in ((1.0, 1.0), (1.0, 0.01), (0.5, 1.0)):
        _, ref_step = reference_step(copy.deepcopy(unet), copy.deepcopy(disc_ref), lam, max_norm)
        ours_unet = copy.deepcopy(unet)
        _, adv, prior = losses(ours_unet, copy.deepcopy(disc_ref))
        ours = DoCo(cpg="reference", cpg_lambda=lam, max_grad_norm=max_norm).generator_gradients(
            adv, prior, [ours_unet.attn2.to_k.weight, ours_unet.attn2.to_v.weight]
        )
        results.check(
            f"DoCo CPG model update (adjust_gradient, lambda {lam}, max_grad_norm {max_norm})",
            "max |diff| / max |ref|",
            max_diff(ours, ref_step)[1],
            2e-6,
        )

    def ours_disc(state):
        disc = PatchDiscriminator(4, 32)
        disc.load_state_dict({k.replace("model.", "net.", 1): v for k, v in state.items()})
        return disc

    probe = torch.randn(8, 4, 32, 32)
    results.check(
        "DoCo PatchGAN logits (their weights loaded into ours)",
        "max |diff| / max |ref|",
        max_diff([ours_disc(disc_ref.state_dict())(probe)], [disc_ref(probe)])[1],
        2e-6,
    )

    # one full reference iteration: the model step with adjust_gradient, then loss_D backward and Adam
    # (as their loop: the generator's adversarial loss backpropagates into the discriminator's gradients too)
    disc_start = copy.deepcopy(disc_ref.state_dict())
    disc_ref = copy.deepcopy(disc_ref)
    opt_d = torch.optim.Adam(disc_ref.parameters(), lr=1e-4, betas=(0.5, 0.999))
    pred, _ = reference_step(copy.deepcopy(unet), disc_ref, 1.0, 1.0)
    x0_anchor = torch.randn(8, 4, 8, 8)
    bce = nn.BCEWithLogitsLoss()
    real_out, fake_out = disc_ref(up(x0_anchor)).squeeze(1), disc_ref(up(pred.detach())).squeeze(1)
    (bce(fake_out, torch.ones_like(fake_out)) + bce(real_out, torch.zeros_like(real_out))).backward()
    ref_grads = [p.grad.clone() for p in disc_ref.parameters()]
    opt_d.step()

    class StepTrainer:  # backward, keep the gradients, step
        def step(self, loss, optimizer=None, name="loss"):
            optimizer.zero_grad()
            loss.backward()
            self.grads = [p.grad.clone() for p in optimizer.param_groups[0]["params"]]
            optimizer.step()

    for term in (True,):  # (False, the textbook loss, is documented as differing from theirs)
        disc = ours_disc(disc_start)
        trainer = StepTrainer()
        DoCo(disc_adversarial_term=term).discriminator_step(
            trainer,
            disc,
            torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999)),
            up(x0_anchor),
            up(copy.deepcopy(unet)(x, cond_target)),
            after_model_step=True,
        )
        results.check(
            f"DoCo discriminator gradient, one reference iteration (disc_adversarial_term {term})",
            "max |diff| / max |ref|",
            max_diff(trainer.grads, ref_grads)[1],
            2e-6,
        )
        # Adam's first step is lr * g / (|g| + 1e-8): compare where |g| is well above that epsilon
        big = [g.abs() > 1e-5 for g in ref_grads]
        results.check(
            f"DoCo discriminator weights after Adam where |g| > 1e-5 (disc_adversarial_term {term})",
            "max |diff| / max |ref|",
            max_diff(
                [p.detach()[m] for p, m in zip(disc.parameters(), big)],
                [p.detach()[m] for p, m in zip(disc_ref.parameters(), big)],
            )[1],
            2e-6,
        )


def laf(refs, results):
    from unlearn.methods.laf import EmbeddingVAE, ra_loss, ue_loss, vae_loss

    ns = {"torch": torch, "nn": nn, "F": F}
    extract(
        refs.source(LAF, "VUnlearning.py"),
        ["extractor_loss_functionnmse", "extractor_loss_functioncosine"],
        namespace=ns,
    )
    extract(refs.source(LAF, "Train.py"), ["vae_loss_function"], namespace=ns)
    nmse, cosine = ns["extractor_loss_functionnmse"], ns["extractor_loss_functioncosine"]
    torch.manual_seed(1)
    s_e, s_t, s_out = torch.randn(32, 256), torch.randn(32, 256), torch.rand(32, 256)
    u_e, u_t, u_out = torch.randn(32, 256), torch.randn(32, 256), torch.rand(32, 256)
    mu, logvar = torch.randn(32, 8), torch.randn(32, 8)
    rel = "max |diff| / max |ref|"
    results.check(
        "LAF L_UE vs extractor_loss_functionnmse difference",
        rel,
        max_diff([ue_loss(s_out, s_e, u_out, u_e)], [nmse(s_out, s_e) - nmse(u_out, u_e)])[1],
        0,
    )
    for temp in (5.0, 20.0):
        results.check(
            f"LAF L_RA vs extractor_loss_functioncosine (temp {temp})",
            rel,
            max_diff([ra_loss(s_e, s_t, u_e, u_t, temp)], [cosine(s_e, s_t, u_e, u_t, temp)])[1],
            0,
        )
    results.check(
        "LAF VAE loss vs vae_loss_function",
        rel,
        max_diff(
            [vae_loss(s_out, s_e, mu, logvar, 0.025)],
            [ns["vae_loss_function"](s_out, s_e, mu, torch.exp(0.5 * logvar))],
        )[1],
        0,
    )

    sys.modules.setdefault("torchsummary", types.ModuleType("torchsummary"))
    model = load_module(refs.path(LAF, "Model.py"), "laf_model")
    ref_vae, ours_vae = model.VariationalAutoencoder("Digit", 8), EmbeddingVAE(256, 8, "sigmoid")
    e, d = ref_vae.encoder, ref_vae.decoder
    pairs = [
        (ours_vae.encoder[0], e.linear1),
        (ours_vae.encoder[2], e.linear2),
        (ours_vae.mu, e.linear3_1),
        (ours_vae.logvar, e.linear3_2),
        (ours_vae.decoder[0], d.linear1),
        (ours_vae.decoder[2], d.linear2),
        (ours_vae.decoder[4], d.linear3),
    ]
    for ours_layer, ref_layer in pairs:
        ours_layer.load_state_dict(ref_layer.state_dict())
    torch.manual_seed(2)
    out_ref, _, mu_ref, sigma_ref = ref_vae(s_e)
    torch.manual_seed(2)
    out_ours, mu_ours, logvar_ours = ours_vae(s_e)
    results.check(
        "LAF VAE forward (Model.VariationalAutoencoder weights, same noise)",
        rel,
        max_diff([out_ours, mu_ours, torch.exp(0.5 * logvar_ours)], [out_ref, mu_ref, sigma_ref])[1],
        1e-6,
    )
    # (not compared: on the reference's own CNN, fc1 then a two-layer fc2, our representation_site reads fc2[0]'s
    # output where theirs reads fc1's, a difference documented in unlearn/methods/laf.py)


def run(refs, results):
    doco(refs, results)
    laf(refs, results)
