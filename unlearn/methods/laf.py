"""Label-Agnostic Forgetting: A Supervision-Free Unlearning in Deep Models (Shen, Zhang, Zhao, Bialkowski,
Chen, Xu; ICLR 2024). `reference/methods.md` §3."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import AUGMENTATIONS, Trainer, make_loader
from .base import Method, hyperparameter

VAE_DATA = ("all", "retain")
REPRESENTATIONS = ("linear_output", "head_input")
DECODER_OUTPUTS = ("sigmoid", "linear")


class EmbeddingVAE(nn.Module):
    """The reference's MLP VAE over penultimate representations (`Model.py`, `CNN_VAE_Encoder/Decoder`).

    Encoder dim→128→32→(μ, log σ²) with ReLU, decoder latent→32→128→dim with ReLU and a sigmoid (reference) or
    linear output. The encoder always samples z = μ + σ·ε, in eval mode too, as the reference does.
    """

    def __init__(self, dim: int, latent_dims: int, decoder_output: str = "sigmoid"):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
        self.mu = nn.Linear(32, latent_dims)
        self.logvar = nn.Linear(32, latent_dims)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dims, 32), nn.ReLU(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, dim)
        )
        self.sigmoid = decoder_output == "sigmoid"

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, μ, log σ²) of a batch of representations."""
        hidden = self.encoder(e)
        mu, logvar = self.mu(hidden), self.logvar(hidden)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        out = self.decoder(z)
        return (torch.sigmoid(out) if self.sigmoid else out), mu, logvar


def vae_loss(recon: torch.Tensor, e: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_weight: float):
    """`Train.vae_loss_function`: (Σ (ê − e)² + kl_weight · KL(q(z|e) ‖ N(0, I))) / batch size.

    The reference writes KL = −½ Σ (log(σ² + 1e-8) + 1 − μ² − σ²); the 1e-8 is kept.
    """
    mse = (recon - e).pow(2).sum()
    kld = -0.5 * torch.sum(torch.log(logvar.exp() + 1e-8) + 1 - mu.pow(2) - logvar.exp())
    return (mse + kl_weight * kld) / e.shape[0]


def reconstruction_term(recon: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Σ_samples exp(ℓ / (ℓ + 1)) with ℓ = Σ_dims (ê − e)² per sample (`extractor_loss_functionnmse`)."""
    err = (recon - e).pow(2).sum(dim=1)
    return torch.exp(err / (err + 1)).sum()


def ue_loss(
    recon_r: torch.Tensor, e_r: torch.Tensor, recon_f: torch.Tensor, e_f: torch.Tensor
) -> torch.Tensor:
    """Extractor unlearning: L_UE = Σ_r exp(ℓ_s/(ℓ_s+1)) − Σ_f exp(ℓ_u/(ℓ_u+1)).

    `recon_r` is the all-data (or retain) VAE's reconstruction of the retain representations, `recon_f` the
    forget VAE's reconstruction of the forget representations. Minimising keeps D_r representations in the
    distribution the first VAE learned and drives D_f representations out of the one the forget VAE learned.
    """
    return reconstruction_term(recon_r, e_r) - reconstruction_term(recon_f, e_f)


def ra_loss(e_r: torch.Tensor, t_r: torch.Tensor, e_f: torch.Tensor, t_f: torch.Tensor, temp: float):
    """Representation alignment as the reference computes it (`extractor_loss_functioncosine`):

    L_RA = Σ_r log( exp(d_r) / Σ_f exp(d_f / temp) ), with d = 1 − cos(student, teacher) the cosine distance
    (CosineEmbeddingLoss, target +1). Minimising pulls retain representations onto the teacher's and pushes
    forget representations away from it. `temp` divides the forget term only.
    """
    d_r = 1 - F.cosine_similarity(e_r, t_r, dim=1)
    d_f = 1 - F.cosine_similarity(e_f, t_f, dim=1)
    return torch.sum(torch.log(torch.exp(d_r) / torch.sum(torch.exp(d_f / temp))))


@dataclass
class LAF(Method):
    """Label-Agnostic Forgetting: A Supervision-Free Unlearning in Deep Models (Shen et al., ICLR 2024).

    Unlearning without labels: only the inputs of D_f and D_r are read (the images; never a label), except by
    the optional repair step. The extractor g maps an image to its representation e = g(x): with
    `representation: linear_output` (default, the reference's) the output of the linear layer that feeds the
    head (`model.head`, the last linear layer with `num_classes` outputs), taken before its activation, as the
    reference reads its `fc1` (256-d, no activation); `representation_site` finds that layer and checks it. The
    digits CNN (`digits_cnn`: Linear 512→128, ReLU, head) and MLP have one; networks whose head reads pooled
    convolution features (`resnet18_cifar`, torchvision ResNets; the reference adds a 512→256 `fc1` to its
    ResNet-18 for this) or a normalised token (transformers) have none, and LAF then reads the head's input.
    `representation: head_input` always reads the head's input (post-activation on the digits CNN). On a
    network whose classifier is several stacked linear layers (the reference's own CNN: fc1 256-d, then fc2 =
    Linear 256→128 → Linear 128→10, no activation between) the rule takes the last one before the head (the
    128-d output), where the reference reads fc1; none of the built-in models is built that way.

    1. Embedding VAEs. Fit one `EmbeddingVAE` (latent `latent_dims`) on the original model's representations
       of D_f ∪ D_r (`vae_data: all`, the reference code) or of D_r only (`vae_data: retain`, what the paper's
       text says), and a second one on those of D_f. Each: Adam `vae_lr`, `vae_epochs` epochs, batch
       `vae_batch_size`, loss `vae_loss`. The reference recomputes the representations for every batch of
       every epoch, so with `augment` they come from freshly augmented images each time, as here; without
       augmentation they are computed once (the frozen model in eval mode gives the same values). Both VAEs
       are then frozen.
    2. For `epochs` epochs, over the batch pairs of zip(forget loader, retain loader) (so an epoch is
       min(|D_f|, |D_r|) / batch_size pairs, as in the reference), alternate two Adam optimizers over the
       extractor:
       a. extractor unlearning (lr `lr_ue`): minimise `ue_loss` (keep g(x_r) reconstructible by the first VAE,
          make g(x_f) badly reconstructed by the forget VAE);
       b. representation alignment (lr `lr_ra`): recompute the representations and minimise `ra_loss` against
          the frozen original model (the teacher): pull g(x_r) onto the teacher's, push g(x_f) away.
    3. LAF+R (only if `repair_epochs > 0`): fine-tune the head alone with cross-entropy on D_r's labels,
       Adam `repair_lr`, `repair_epochs` passes over D_r. With the default 0 the method is label-free.
    With `augment: crop_flip` every batch of steps 1-3 is augmented (one draw per batch pair serves both steps
    of 2, and the teacher sees the same images), as the reference's CIFAR-10 / SVHN loaders are; its MNIST /
    Fashion-MNIST loaders are not (`none`, the default).

    Choices where paper and reference code (`ShaofeiShen768/LAF` @ bda3694) differ, or the code is silent:

    - VAE data: the code fits the first VAE on the full training set (D_f included); the paper says D_r (a
      point the reviewers raised). Default `all` (the code, whose numbers the paper reports); or `retain`.
    - L_RA: the code's form (cosine *distance*, `temp` on the forget term only), not a contrastive reading
      of the paper's under-specified formula (similarity, a temperature on both terms), since the table's
      `temp` (5 / 20) was tuned for the code's form. L_UE is the code's: sums over the batch, not means.
    - Sigmoid decoder: the code's decoder ends in a sigmoid although embeddings are unbounded (fc1's output
      can be any real number), so the reconstruction error mostly measures scale and L_UE squeezes the
      retain representations into (0, 1). Default `linear` (the README's LAF notes give the measurements);
      `decoder_output: sigmoid` reproduces the code.
    - Eval mode: in the reference the student runs in eval mode (`vae_train` calls `eval()` on it and
      `extractor_unlearning` never calls `train()`), so batch norm uses and keeps the original running
      statistics; so does this loop, which also keeps single-class forget batches from rewriting them.
    - Head: neither LAF loss depends on the head, so the reference's optimizers over all parameters never move
      it (no gradient, no weight decay); here the head is frozen during step 2 and the optimizers hold the
      extractor only, which is the same update (and lets DDP see no unused parameters). Repair trains the
      head only.
    - The forward passes of a step run on the retain and forget images as one batch (eval mode: the same
      representations as two passes), and the teacher's representations come from the same batch.
    - Repair: the reference zips repair batches with the forget loader (again min(|D_f|, |D_r|) batches per
      epoch); here each repair epoch is one full pass over D_r, in eval mode like the reference. The reference
      repairs its whole `fc2` (two linear layers on the CNN); here the head, the last linear layer.
    - Augmentation: the reference's CIFAR-10 transform is Resize(224) + RandomResizedCrop(224) + flip for
      torchvision's 224-pixel ResNet-18; `crop_flip` is the 32-pixel CIFAR crop (padding 4) + flip of our
      other recipes.
    - Random-data forgetting: the reference forgets 40 % of each of the classes 5-9 (`Data.random_data`), a
      skewed share; our recipes use `data.forget_fraction` (a uniform random share of all classes), or
      `data.forget_fraction: {5: 0.4, 6: 0.4, 7: 0.4, 8: 0.4, 9: 0.4}` for the reference's protocol.
    - Evaluation: the paper's own attack (an XGBoost membership-inference classifier on sorted softmax
      vectors, `Train.train_attack_model` / `attack`; reference/methods.md §3.4) is not offered; our runs
      report the shared metrics and attacks instead.

    A pruned model's pruned weights stay exactly zero (the training step restores pinned weights after each
    step). Mixed precision and multi-process runs go through accelerate; gradient accumulation is not supported
    (two optimizers alternate per batch pair). Each stage checkpoints every `train.checkpoint_every` epochs,
    and an interrupted run resumes from its last checkpoint.
    Defaults suit the digits world (lr_ue 3e-4, lr_ra 1e-3 instead of the table's CNN rates 5e-5 / 1e-4, see
    the README); the CIFAR-10 recipe carries the paper's ResNet settings.
    """

    families = ("classifier",)
    accumulates = False  # two optimizers per batch pair
    epochs: int = hyperparameter(
        20, "epochs of step 2; one epoch = min(|D_f|, |D_r|) / batch_size batch pairs"
    )
    lr_ue: float = hyperparameter(
        3e-4, "Adam learning rate of extractor unlearning (the paper's CNN table: 5e-5)", gt=0
    )
    lr_ra: float = hyperparameter(
        1e-3, "Adam learning rate of representation alignment (the paper's CNN table: 1e-4)", gt=0
    )
    temp: float = hyperparameter(
        20.0, "temperature dividing the forget term of L_RA (the paper's table: 5 or 20)", gt=0
    )
    batch_size: int = hyperparameter(32, "examples per forget batch and per retain batch, in steps 2 and 3")
    latent_dims: int = hyperparameter(8, "latent size of the embedding VAEs", ge=1)
    vae_epochs: int = hyperparameter(10, "epochs of training each embedding VAE")
    vae_lr: float = hyperparameter(1e-3, "Adam learning rate of the embedding VAEs")
    vae_batch_size: int = hyperparameter(32, "embeddings per VAE batch")
    vae_kl_weight: float = hyperparameter(
        0.025, "weight of the KL term in the VAE loss (the reference's 0.025)"
    )
    vae_data: str = hyperparameter(
        "all", "data of the first VAE: all (D_f ∪ D_r, the reference code) or retain (D_r, the paper's text)"
    )
    decoder_output: str = hyperparameter(
        "linear", "VAE decoder output: linear (unbounded, ours) or sigmoid (the reference code)"
    )
    representation: str = hyperparameter(
        "linear_output",
        "linear_output: the output of the linear layer feeding the head, before its activation (the reference's "
        "fc1), where the network has one, else the head's input; head_input: the head's input (the former default)",
    )
    augment: str = hyperparameter(
        "none",
        "batch augmentation of every LAF stage: none (the reference's MNIST setting) or crop_flip (random crop + "
        "flip; the reference augments CIFAR-10, with representations recomputed per batch)",
    )
    repair_epochs: int = hyperparameter(
        0, "LAF+R: epochs of training the head on the retain labels; 0 = label-free LAF", ge=0
    )
    repair_lr: float = hyperparameter(1e-3, "Adam learning rate of the LAF+R head repair")

    def check(self) -> None:
        if self.vae_data not in VAE_DATA:
            raise ConfigError(f"unknown vae_data {self.vae_data!r}; known: {', '.join(VAE_DATA)}")
        if self.decoder_output not in DECODER_OUTPUTS:
            raise ConfigError(
                f"unknown decoder_output {self.decoder_output!r}; known: {', '.join(DECODER_OUTPUTS)}"
            )
        if self.representation not in REPRESENTATIONS:
            raise ConfigError(
                f"unknown representation {self.representation!r}; known: {', '.join(REPRESENTATIONS)}"
            )
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augment {self.augment!r}; known: {', '.join(AUGMENTATIONS)}")
        if self.temp <= 0:
            raise ConfigError(f"temp must be positive, got {self.temp}")
        if self.epochs < 0 or self.repair_epochs < 0:
            raise ConfigError("epochs and repair_epochs must not be negative")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        if accelerator.gradient_accumulation_steps > 1:
            raise ConfigError(
                "LAF alternates two optimizers per batch pair and does not support gradient accumulation; "
                "set train.gradient_accumulation_steps to 1"
            )
        if len(data.forget) == 0 or len(data.retain) == 0:
            raise ConfigError("LAF needs a non-empty forget set and a non-empty retain set")
        model.to(accelerator.device)
        teacher = model.frozen_copy()
        probe = next(iter(DataLoader(data.retain, batch_size=8)))[0].to(accelerator.device)
        name, output = representation_site(teacher, self.representation, probe)

        # 1. The two embedding VAEs, fit on the original model's representations.
        first = data.retain if self.vae_data == "retain" else ConcatDataset([data.forget, data.retain])
        teacher_site = dict(teacher.trainable.named_modules())[name]
        vae_all = self.fit_vae(teacher, teacher_site, output, first, accelerator, "vae_all")
        vae_forget = self.fit_vae(teacher, teacher_site, output, data.forget, accelerator, "vae_forget")

        # 2. Alternate extractor unlearning and representation alignment.
        site = dict(model.trainable.named_modules())[name]
        model = self.unlearn_extractor(
            model, teacher, (site, teacher_site, output), vae_all, vae_forget, data, accelerator
        )

        # 3. LAF+R: the only step that reads labels.
        if self.repair_epochs > 0:
            model = self.repair(model, data, accelerator)
        return model

    def fit_vae(self, teacher: Model, site: nn.Module, output: bool, dataset, accelerator, stage: str):
        """Train an `EmbeddingVAE` on the original model's representations of `dataset` (labels are dropped
        unread); frozen, in eval mode, on the device.

        Without augmentation the representations are computed once (the frozen teacher in eval mode gives the
        reference's per-batch recomputation the same values); with it they are recomputed for every batch of
        every epoch from freshly augmented images, as the reference's `vae_train` does."""
        augment = AUGMENTATIONS[self.augment]

        def represent(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), accelerator.autocast():
                return tap(teacher, site, output, images)

        if augment is None:
            chunks = [
                represent(images.to(accelerator.device)).cpu()
                for images, _ in DataLoader(dataset, batch_size=256, shuffle=False)
            ]
            source = TensorDataset(torch.cat(chunks))
            dim = chunks[0].shape[1]
        else:
            source = dataset
            dim = represent(next(iter(DataLoader(dataset, batch_size=1)))[0].to(accelerator.device)).shape[1]
        vae = EmbeddingVAE(dim, self.latent_dims, self.decoder_output)
        optimizer = torch.optim.Adam(vae.parameters(), lr=self.vae_lr)
        loader = make_loader(source, self.vae_batch_size)
        vae, optimizer, loader = accelerator.prepare(vae, optimizer, loader)
        trainer = Trainer(
            vae,
            optimizer,
            accelerator,
            stage=stage,
            total=self.vae_epochs,
            unit="epoch",
            state={"loader": loader},  # its pass count orders its batches
            settings={"method": self},
        )
        vae.train()
        for _ in trainer.loop():
            for batch in loader:
                e = batch[0] if augment is None else represent(augment(batch[0]))
                with accelerator.autocast():
                    recon, mu, logvar = vae(e)
                    loss = vae_loss(recon.float(), e.float(), mu.float(), logvar.float(), self.vae_kl_weight)
                trainer.step(loss)
        vae = accelerator.unwrap_model(vae)
        vae.eval()
        vae.requires_grad_(False)
        return vae

    def unlearn_extractor(self, model, teacher, sites, vae_all, vae_forget, data, accelerator):
        """Step 2: per batch pair, one extractor-unlearning step (opt1) and one alignment step (opt2).

        `sites` is (the student's representation module, the teacher's, whether its output or its input is
        the representation)."""
        site, teacher_site, output = sites
        head = model.head
        head.requires_grad_(False)  # neither loss depends on the head (see the class docstring)
        extractor = [p for p in model.parameters() if p.requires_grad]
        opt1 = torch.optim.Adam(extractor, lr=self.lr_ue)
        opt2 = torch.optim.Adam(extractor, lr=self.lr_ra)
        forget = make_loader(data.forget, self.batch_size)
        retain = make_loader(data.retain, self.batch_size)
        model, opt1, opt2, forget, retain = accelerator.prepare(model, opt1, opt2, forget, retain)
        trainer = Trainer(  # a pruned model's zeros stay zero
            model,
            opt1,
            accelerator,
            stage="laf",
            total=self.epochs,
            unit="epoch",
            # the VAEs are part of what this stage continues; the loaders' pass counts order their batches
            state={"alignment_optimizer": opt2, "forget": forget, "retain": retain},
            settings={"method": self, "vaes": [vae_all, vae_forget]},
        )
        augment = AUGMENTATIONS[self.augment]

        def represent(images: torch.Tensor) -> torch.Tensor:
            """The student's representation through the prepared model (so DDP and autocast see the forward)."""
            return tap(model, site, output, images)

        model.eval()  # the reference's student runs in eval mode: batch norm keeps the original statistics
        try:
            for _ in trainer.loop():
                for (x_f, _), (x_r, _) in zip(forget, retain):  # labels are never read
                    n_r = len(x_r)
                    both = torch.cat([x_r, x_f])
                    if augment is not None:  # one draw serves both steps, as the reference's loader batch
                        both = augment(both)

                    # a. Extractor unlearning.
                    e = represent(both)
                    e_r, e_f = e[:n_r], e[n_r:]
                    recon_r, _, _ = vae_all(e_r)
                    recon_f, _, _ = vae_forget(e_f)
                    trainer.step(ue_loss(recon_r, e_r, recon_f, e_f), name="ue")

                    # b. Representation alignment against the frozen original model.
                    e = represent(both)
                    with torch.no_grad(), accelerator.autocast():
                        t = tap(teacher, teacher_site, output, both)
                    trainer.step(ra_loss(e[:n_r], t[:n_r], e[n_r:], t[n_r:], self.temp), opt2, name="ra")
        finally:
            head.requires_grad_(True)
        return accelerator.unwrap_model(model)

    def repair(self, model, data: UnlearnData, accelerator):
        """Step 3 (LAF+R): train the head alone with cross-entropy on the retain labels, in eval mode."""
        head = {id(p) for p in model.head.parameters()}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
        for param in frozen:
            param.requires_grad_(False)
        optimizer = torch.optim.Adam(model.head.parameters(), lr=self.repair_lr)
        retain = make_loader(data.retain, self.batch_size)
        model, optimizer, retain = accelerator.prepare(model, optimizer, retain)
        trainer = Trainer(
            model,
            optimizer,
            accelerator,
            stage="laf_repair",
            total=self.repair_epochs,
            unit="epoch",
            state={"retain": retain},
            settings={"method": self},
        )
        augment = AUGMENTATIONS[self.augment]
        model.eval()
        try:
            for _ in trainer.loop():
                for images, labels in retain:
                    images = images if augment is None else augment(images)
                    trainer.step(F.cross_entropy(model(images), labels))
        finally:
            for param in frozen:
                param.requires_grad_(True)
        return accelerator.unwrap_model(model)


def tap(run: nn.Module, site: nn.Module, output: bool, images: torch.Tensor) -> torch.Tensor:
    """`run(images)` and return, flattened and in fp32, what `site` produced (`output`) or received."""
    seen: list[torch.Tensor] = []
    if output:
        # a clone: an in-place activation after the layer would otherwise rewrite the captured output
        hook = site.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    else:
        hook = site.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        run(images)
    finally:
        hook.remove()
    return seen[-1].flatten(1).float()


def representation_site(model: Model, representation: str, probe: torch.Tensor) -> tuple[str, bool]:
    """Where LAF reads the representation: (the module's name in `model.trainable`, whether its output).

    "linear_output": the output of the linear layer that feeds the head, before its activation (the
    reference's `fc1`), when the network has one: the last other `nn.Linear` with the head's input width whose
    output, as is or through a ReLU, is exactly the head's input on `probe` (checked, so a layer that only
    looks right, such as a transformer block's, is not taken). Otherwise, and for "head_input", the head's
    input (`model.features`).
    """
    network, head = model.trainable, model.head
    head_name = next(name for name, module in network.named_modules() if module is head)
    if representation == "head_input":
        return head_name, False
    linears = [
        (name, module)
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear) and module is not head and module.out_features == head.in_features
    ]
    if linears:
        name, layer = linears[-1]
        with torch.no_grad():
            out = tap(model, layer, True, probe)
            head_in = tap(model, head, False, probe)
        if torch.equal(head_in, out) or torch.equal(head_in, F.relu(out)):
            return name, True
    return head_name, False
