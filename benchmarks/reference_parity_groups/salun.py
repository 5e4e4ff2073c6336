"""SalUn (OPTML-Group/Unlearn-Saliency): the saliency masks of the authors' Classification/generate_mask.py
`save_gradient_ratio` and DDPM/runners/diffusion.py `Diffusion.generate_mask` vs ours, on the digits world.

Stubs: `.cuda()` is the identity; the DDPM runner's `get_forget_dataset` is a loader over our forget set built as
theirs (shuffle=True right after seeding), `torch.load` returns the UNet's own weights, `data_transform` is the
config's `rescaled` 2x - 1, and `Conditional_Model` is our UNet behind their own `forward` /
`_forward_with_cond_scale` (exec'd from DDPM/models/diffusion.py)."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from types import SimpleNamespace

import torch
import torch.nn as nn
from common import extract, jaccard

REPO = "OPTML-Group+Unlearn-Saliency"
FILES = [
    (REPO, "Classification/generate_mask.py", None),
    (REPO, "DDPM/runners/diffusion.py", None),
    (REPO, "DDPM/models/diffusion.py", None),
]


def forget_three():
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset

    return forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])


def classification(refs, results, seed: int = 2, batch_size: int = 64):
    from unlearn.methods.salun import SalUn
    from unlearn.models import load_model

    data = forget_three()
    src = refs.source(REPO, "Classification/generate_mask.py")
    save_gradient_ratio = extract(src, ["save_gradient_ratio"], namespace={"torch": torch, "os": os})[
        "save_gradient_ratio"
    ]
    with tempfile.TemporaryDirectory() as out:
        model = load_model("world:digits", "digits_cnn", 10)
        args = SimpleNamespace(unlearn_lr=0.01, momentum=0.9, weight_decay=5e-4, save_dir=out)
        torch.manual_seed(
            seed
        )  # their replace_loader_dataset: setup_seed(seed), then DataLoader(shuffle=True)
        loader = torch.utils.data.DataLoader(data.forget, batch_size=batch_size, num_workers=0, shuffle=True)
        save_gradient_ratio({"forget": loader}, model, nn.CrossEntropyLoss(), args)
        for ratio, tolerance in ((0.1, 0), (0.2, 0), (0.5, 0), (0.8, 16), (0.9, 16)):
            reference = torch.load(os.path.join(out, f"with_{ratio}.pt"))
            reference = {k.removeprefix("network."): v for k, v in reference.items()}
            model = load_model("world:digits", "digits_cnn", 10)
            torch.manual_seed(seed)
            ours = SalUn(batch_size=batch_size, sparsity=round(1 - ratio, 6)).mask(
                model, data, SimpleNamespace(project_dir=None)
            )
            j, wrong, total = jaccard(ours.masks, reference)
            results.check(
                f"classification mask with_{ratio}.pt vs ours (sparsity {1 - ratio:.1f}), digits CNN, class 3",
                f"mismatches of {total} (Jaccard {j:.6f})",
                wrong,
                tolerance,
                jaccard=j,
                total=total,
            )


class StubConditionalModel(nn.Module):
    """Their Conditional_Model interface around our UNet: `_forward` drops conditions to the null class."""

    def __init__(self, unet, null_class: int, prob_mask_like, cond_drop_prob: float = 0.1):
        super().__init__()
        self.unet, self.null_class, self.cond_drop_prob = unet, null_class, cond_drop_prob
        self.prob_mask_like = prob_mask_like

    def _forward(self, x, t, c, cond_drop_prob=None):
        p = self.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
        if p > 0:
            keep = self.prob_mask_like((len(x),), 1 - p, device=x.device)
            c = torch.where(keep, c, torch.full_like(c, self.null_class))
        return self.unet(x, t.long(), class_labels=c).sample


def ddpm(refs, results, seed: int = 1234, batch_size: int = 128):
    from unlearn.methods.salun import SalUnDiffusion
    from unlearn.models.diffusion import load_diffusion
    from unlearn.worlds import prepare

    model_src = refs.source(REPO, "DDPM/models/diffusion.py")
    ns = extract(model_src, ["prob_mask_like"], namespace={"torch": torch})
    methods = extract(
        model_src, ["forward", "_forward_with_cond_scale"], cls="Conditional_Model", namespace=ns
    )
    Stub = type(
        "Stub", (StubConditionalModel,), {k: methods[k] for k in ("forward", "_forward_with_cond_scale")}
    )

    ddpm_path = prepare("digits", verbose=False, families=("ddpm",))["ddpm"]
    data = forget_three()
    model = load_diffusion(ddpm_path)
    weights = {f"module.unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}

    def get_forget_dataset(args, config, label):
        torch.manual_seed(seed)  # their train.py seeds once; the loader is the first thing that draws here
        return None, torch.utils.data.DataLoader(
            data.forget, batch_size=batch_size, shuffle=True, num_workers=0
        )

    namespace = {
        "torch": torch,
        "os": os,
        "logging": logging,
        "get_forget_dataset": get_forget_dataset,
        "Conditional_Model": lambda config: Stub(
            copy.deepcopy(model.unet), model.null_class, ns["prob_mask_like"]
        ),
        "get_optimizer": lambda config, params: torch.optim.Adam(params, lr=1e-4),
        "data_transform": lambda config, x: 2 * x - 1,
    }
    extract(
        refs.source(REPO, "DDPM/runners/diffusion.py"),
        ["generate_mask"],
        cls="Diffusion",
        namespace=namespace,
    )
    runner = SimpleNamespace(
        args=SimpleNamespace(label_to_forget=3, ckpt_folder="unused", cond_scale=2.0),
        config=SimpleNamespace(
            training=SimpleNamespace(gamma=1, lmbda=10), optim=SimpleNamespace(grad_clip=1.0)
        ),
        device="cpu",
        num_timesteps=model.num_train_timesteps,
        betas=model.scheduler.betas.float(),
    )
    cwd, load = os.getcwd(), torch.load
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)  # it writes results/cifar10/mask/<label>/with_*.pt under the working directory
        torch.load = lambda *a, **k: [weights]
        try:
            namespace["generate_mask"](runner)
        finally:
            torch.load = load
            os.chdir(cwd)
        reference = torch.load(os.path.join(work, "results/cifar10/mask/3/with_0.5.pt"))
    reference = {k.removeprefix("module.unet."): v for k, v in reference.items()}

    ours_model = load_diffusion(ddpm_path)
    ours_model.train_only("full")
    torch.manual_seed(seed)
    torch.empty(
        (), dtype=torch.int64
    ).random_()  # their shuffled loader draws two seeds before the noise; ours one
    accel = SimpleNamespace(
        project_dir=None, autocast=lambda: torch.autocast("cpu", enabled=False), is_main_process=True
    )
    ours = SalUnDiffusion(batch_size=batch_size).mask(ours_model, data, accel)
    j, wrong, total = jaccard(ours.masks, reference)
    results.check(
        "DDPM mask with_0.5.pt vs ours (cond_scale 2 = our mask_guidance 3, clip 1, same noise), digits DDPM, class 3",
        f"mismatches of {total} (Jaccard {j:.6f})",
        wrong,
        0,
        jaccard=j,
        total=total,
    )


def run(refs, results):
    classification(refs, results)
    ddpm(refs, results)
