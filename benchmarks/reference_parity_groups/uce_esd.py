"""UCE and ESD (rohitgandikota): the authors' UCE edit functions and ESD's CompVis DDIM sampler vs ours on a tiny
Stable-Diffusion pipeline (tests/tiny_diffusion.py).

UCE: `edit_model` of train-scripts/train_erase.py at 35e91e2 (the paper's code, called as its main does) and `UCE`
of trainscripts/uce_sd_erase.py (the newer script; its save_file is captured). ESD: train-esd.py's
`sample_model(..., till_T=t_enc)` is the CompVis DDIMSampler of ldm/models/diffusion/ddim.py at a2189e9, run on a
stub of ldm's LatentDiffusion around our UNet; the three ldm files are written to a temporary package (einops and
ldm.util, unused by the sampling path, are stubbed)."""

from __future__ import annotations

import copy
import os
import random
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from common import extract

UCE = "rohitgandikota+unified-concept-editing"
ESD = "rohitgandikota+erasing"
LDM = [
    "ldm/models/diffusion/ddim.py",
    "ldm/models/diffusion/sampling_util.py",
    "ldm/modules/diffusionmodules/util.py",
]
FILES = [(UCE, "train-scripts/train_erase.py", "35e91e2"), (UCE, "trainscripts/uce_sd_erase.py", None)]
FILES += [(ESD, path, "a2189e9") for path in LDM]

CASES = {
    "empty anchor": (
        ["a photo of the cat", "the cat", "cat"],
        ["", "", ""],
        ["a photo of the dog", "a tree"],
    ),
    "non-empty anchor": (
        ["a photo of the cat", "the cat", "cat"],
        ["a photo of the dog", "a dog", "the house painting"],
        ["a photo of the tree", "a house"],
    ),
}


def edit_distance(w0, ours, ref) -> float:
    """||ours - ref||_F / ||ref - W0||_F over all edited projections."""
    num = sum(((ours[n].double() - ref[n].double()) ** 2).sum() for n in w0) ** 0.5
    return float(num / sum(((ref[n].double() - w0[n].double()) ** 2).sum() for n in w0) ** 0.5)


def uce(refs, results, folder: Path):
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from tiny_diffusion import load_pipeline

    from unlearn.data import ConceptPrompts
    from unlearn.methods import get_method
    from unlearn.methods.closed_form import cross_attention

    base = {"torch": torch, "copy": copy}
    old_edit = extract(
        refs.source(UCE, "train-scripts/train_erase.py", "35e91e2"), ["edit_model"], namespace=base
    )
    new_ns = {**base, "time": time, "os": os, "device": "cpu", "torch_dtype": torch.float32}
    extract(refs.source(UCE, "trainscripts/uce_sd_erase.py"), ["UCE"], namespace=new_ns)

    def ours(forget, anchors, retain, **kw):
        model = load_pipeline(folder)
        prompts = ConceptPrompts(
            concept="cat", forget=list(forget), anchor=list(anchors), retain=list(retain)
        )
        w0 = {n: m.weight.detach().clone() for n, m in cross_attention(model).items()}
        get_method("uce", "diffusion")(**kw).unlearn(
            model, types.SimpleNamespace(prompts=prompts), Accelerator(cpu=True)
        )
        return w0, {n: m.weight.detach().clone() for n, m in cross_attention(model).items()}

    def reference_old(forget, anchors, retain, fp64=False):
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
        if fp64:  # the same code in float64 (its torch.eye follows the default dtype)
            pipe.to(torch.float64)
            torch.set_default_dtype(torch.float64)
        retain_texts = [""] + list(retain)  # train_erase.py:422
        try:  # :428 and :442 (--technique replace, --erase_scale 1 by default)
            old_edit["edit_model"](
                pipe,
                list(forget),
                list(anchors),
                retain_texts,
                lamb=0.5,
                erase_scale=1.0,
                preserve_scale=max(0.1, 1 / len(retain_texts)),
                technique="replace",
            )
        finally:
            torch.set_default_dtype(torch.float32)
        return {
            n: m.weight.detach().clone()
            for n, m in pipe.unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))
        }

    def reference_new(forget, anchors, retain):
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
        captured = {}
        new_ns["save_file"] = lambda state, path: captured.update(state)
        with (
            torch.no_grad()
        ):  # (pipe, edit, guide, preserve, erase_scale, preserve_scale, lamb, save_dir, exp_name)
            new_ns["UCE"](pipe, list(forget), list(anchors), list(retain), 1.0, 1.0, 0.5, "unused", "unused")
        return {k.removesuffix(".weight"): v.detach().clone() for k, v in captured.items()}

    for label, (forget, anchors, retain) in CASES.items():
        w0, mine = ours(forget, anchors, retain)  # our defaults
        old32, old64 = (
            reference_old(forget, anchors, retain),
            reference_old(forget, anchors, retain, fp64=True),
        )
        metric = "||ours - ref||_F / ||ref - W0||_F"
        results.check(
            f"UCE edit_model (train_erase.py@35e91e2, float32), {label}",
            metric,
            edit_distance(w0, mine, old32),
            5e-5,
        )
        results.check(
            f"UCE edit_model (train_erase.py@35e91e2, float64), {label}",
            metric,
            edit_distance(w0, mine, old64),
            5e-5,
        )
        # the newer script: one token per prompt (its last word), '' not preserved unless listed, preserve_scale 1
        w0, mine = ours(
            forget,
            anchors,
            retain,
            ridge=0.5,
            positions="last_word",
            preserve_unconditional=False,
            preserve_scale=1.0,
        )
        new = reference_new(forget, anchors, retain)
        results.check(
            f"UCE UCE() (uce_sd_erase.py, float32), {label}", metric, edit_distance(w0, mine, new), 1e-5
        )


def load_ddim_sampler(refs, into: Path):
    for rel in LDM:
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        (into / rel).write_text(refs.source(ESD, rel, "a2189e9"))
    for package in (
        "ldm",
        "ldm/models",
        "ldm/models/diffusion",
        "ldm/modules",
        "ldm/modules/diffusionmodules",
    ):
        (into / package / "__init__.py").touch()
    (into / "ldm/util.py").write_text("instantiate_from_config = None\n")  # stub: only the import is needed
    sys.modules.setdefault(
        "einops", types.SimpleNamespace(rearrange=None, repeat=None)
    )  # unused when sampling
    sys.path.insert(0, str(into))
    try:
        from ldm.models.diffusion.ddim import DDIMSampler
    finally:
        sys.path.remove(str(into))
    DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)  # theirs forces cuda
    return DDIMSampler


def esd(refs, results, folder: Path, steps: int = 50, guidance: float = 3.0):
    from diffusers import DDIMScheduler
    from tiny_diffusion import load_pipeline

    from unlearn.methods.esd import ESD as OurESD

    with tempfile.TemporaryDirectory() as tmp:
        DDIMSampler = load_ddim_sampler(refs, Path(tmp))
    model = load_pipeline(folder)
    model.scheduler = DDIMScheduler.from_config(
        model.scheduler.config, steps_offset=1
    )  # SD v1.4's = CompVis spacing

    class CompVisStub:  # what DDIMSampler reads of an ldm LatentDiffusion
        num_timesteps, parameterization, device = 1000, "eps", torch.device("cpu")
        alphas_cumprod, betas = model.scheduler.alphas_cumprod, model.scheduler.betas
        alphas_cumprod_prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])

        def apply_model(self, x, t, c):
            return model.unet(x, t, encoder_hidden_states=c).sample

    worst, in_range = 0.0, True
    with torch.no_grad():
        cond, uncond = model.encode(["a photo of the cat"]), model.encode([""])
        sampler = model.sampler(steps)
        for k in (0, 1, 2, 3, 10, 25, 48, 49):
            torch.manual_seed(k)
            noise = torch.randn(model.latent_shape(1))
            theirs, _ = DDIMSampler(CompVisStub()).sample(
                S=steps,
                conditioning=cond,
                batch_size=1,
                shape=list(noise.shape[1:]),
                verbose=False,
                x_T=noise.clone(),
                unconditional_guidance_scale=guidance,
                unconditional_conditioning=uncond,
                eta=0.0,
                verbose_iter=False,
                t_start=-1,
                log_every_t=100,
                till_T=k,
            )
            torch.manual_seed(k)
            ours, t = OurESD(ddim_steps=steps, start_guidance=guidance).noisy_point(
                model, cond, uncond, sampler, k, random.Random(k)
            )
            worst = max(worst, float((ours - theirs).norm() / theirs.norm()))
            # train-esd.py: t_enc_ddpm ~ randint(round(k / S * 1000), round((k + 1) / S * 1000))
            in_range &= round(k / steps * 1000) <= t < round((k + 1) / steps * 1000)
    results.check(
        f"ESD x_t at t_enc in 0..49 vs CompVis DDIMSampler (ddim.py@a2189e9), {steps} steps, guidance {guidance}",
        "max ||x_ours - x_ref|| / ||x_ref||",
        worst,
        2e-6,
    )
    results.check(
        "ESD DDPM timestep of each t_enc within train-esd.py's range",
        "timesteps out of range",
        0 if in_range else 1,
        0,
    )


def run(refs, results):
    from tiny_diffusion import tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_sd_pipeline(Path(tmp) / "sd")
        uce(refs, results, folder)
        esd(refs, results, folder)
