"""Adapt-then-Unlearn: Exploiting Parameter Space Semantics for Unlearning in Generative Adversarial Networks
(Tiwary, Guha, Panda, Prathosh; TMLR 2025, arXiv 2309.14054)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import UnlearnData
from ..errors import CheckpointNotFoundError, ConfigError, DataError
from ..models.base import Model
from ..train import Trainer, discriminator_step, endless, generator_loss_on_shards, parallel_generator
from .base import Method, hyperparameter

REPULSIONS = ("inverse", "negative", "exponential", "none")
DISTANCES = ("mean", "sum")
ADAPTED_FILE = "adapted_generator_{k}.safetensors"


@dataclass
class AdaptThenUnlearn(Method):
    """Adapt-then-Unlearn (Tiwary et al., TMLR 2025): erase a class or feature from a GAN without its data.

    Only the GAN (generator and discriminator) and a feedback classifier are needed; no training image is seen.

    1. Feedback. Draw samples from the original generator; the feedback classifier flags those that carry the
       unwanted class or feature (`feedback`: a classifier folder or a "module:function" factory; flagged = argmax is the forget class, or with `feedback_threshold` set, the
       forget class's logit exceeds it, the reference's rule for multi-label CelebA attributes; a callable
       that returns a bool per image is taken as the flags). Negatives = flagged samples (`negatives` of
       them), positives = unflagged ones (from `positives` draws); with `positive_max_prob` set, only those
       whose erased-class probability is below it (borderline samples are neither).
    2. Stage 1, negative adaptation. Fisher information of the original generator's weights from the
       discriminator: F_i = mean over `fisher_samples` latents of (∂D(G(z))/∂θ_i)² (per-sample gradients; the
       discriminator's logit plays the log-likelihood, as in the reference's `estimate_fisher`). Then a copy of
       the GAN is fine-tuned adversarially on the negatives for `adapt_steps` steps: its discriminator learns
       negatives (real) against its generator's samples (with R1), its generator minimizes the non-saturating
       loss plus EWC (λ/2)·Σ_i F_i (θ_i − θ*_i)², λ = `ewc_lambda`. The adapted generator weights θ_N are
       computed once, kept in memory and saved to the run folder (`adapted_generator_<k>.safetensors`); with
       `adapted_path` (that folder, or one such file) they are loaded instead of recomputed.
       `adapted_models` > 1 adapts several copies (different random streams), as the reference's MNIST setup.
    3. Stage 2, unlearning. The ORIGINAL GAN trains adversarially on the positives for `steps` steps (its
       discriminator: positives real vs generated, with R1; its generator: non-saturating loss) plus γ·L_rep,
       the repulsion from the adapted weights, with d = the squared distance to θ_N:
       - `inverse` (IL2, the reference's `reci`): L_rep = 1 / d
       - `negative` (NL2, `l2`): L_rep = −d
       - `exponential` (EL2, `exp`): L_rep = `exp_scale`·exp(−d) (the reference's factor is 100), with γ inside
         the exponent as the reference has it: `exp_scale`·exp(−γ·d); the other forms are γ·L_rep.
       - `none`: no repulsion, the baseline that measures what the repulsion adds (same positives, same loop).

    Choices against the paper and the reference code (`atriguha/Adapt_Unlearn`, reference/methods.md §4.6):

    - Distance d (`distance`, default "sum"): "sum" is the paper's ‖θ − θ_N‖²₂ over all weights (averaged
      over the K adapted models); "mean" is the reference code's `val` exactly (`calc_difference_param_new`
      in `Unlearning/Unlearning_MNIST/train_different_losses.py`): the mean over parameter tensors of the
      per-tensor mean squared difference summed over the K adapted models, halved and multiplied by K
      (`value/2*len(ckpt_gens)`, an operator-precedence slip kept as the reference computes it; for K = 1
      the mean over tensors of the per-tensor MSE, halved). The default is the paper's because the code's
      normalization weighs a 1-entry bias like a 100k-entry conv weight; γ is tied to the distance's scale
      (the reference's γ values go with "mean", e.g. the CIFAR recipe).
    - The reference re-reads every adapted checkpoint from disk at every step and, in its CelebA script, calls
      `calc_difference_param_new` with the wrong arguments; θ_N is computed once and held here.
    - The reference applies EWC to StyleGAN2's `G.convs` only; our generators have no mapping network, so EWC
      covers every generator weight. Its λ = 5e8 is tuned to StyleGAN2's Fisher scale; ours is a field.
    - The repulsion is applied as a decoupled gradient step θ ← θ − lr·∇(γ·L_rep) after every Adam step of the
      adversarial loss (`decoupled: true`, as AdamW decouples weight decay), not added to the loss Adam
      normalizes (`decoupled: false`, the reference). Its gradient is proportional to θ − θ_N, so the
      decoupled step moves the weights along the adapted direction; inside Adam every weight moves by about
      lr whatever its share of θ − θ_N (the README's GAN section gives the measurements on the digits GAN).
    - Positives (`positive_max_prob`, default None: the paper's "not flagged"): optionally only samples whose
      probability of the erased class is below a bound, so that the discriminator is not shown borderline
      samples as real (the digits recipes use 0.0001; measurements in the README).
    - Repulsion covers every generator weight (as the reference's named-parameter loop does).
    - Both the generator and the discriminator train in both stages, as in the reference; path-length
      regularization and style mixing are StyleGAN2 specifics and are left out. R1 is lazy (every
      `r1_every` discriminator steps, scaled by it), as in StyleGAN2.
    - The unlearned generator is the exponential moving average of stage 2's generator weights
      (`ema_decay`; None keeps the last weights), as the reference saves StyleGAN2's `g_ema`. The adapted
      weights θ_N are stage 1's last generator weights.
    - The discriminator's learning rate may differ from the generator's (`disc_lr`, default: the same): it
      must learn that the erased class is no longer "real", which a discriminator that accepted it for a
      whole training run unlearns slowly at the generator's rate.
    - The discriminator starts from the original one in both stages (the reference loads the pretrained
      checkpoint with its optimizer state; fresh Adam moments here).

    Parity with the reference's `calc_difference_param_new` (the `mean` distance and the three repulsion
    losses), `estimate_fisher` and `ewc_loss` is tested in tests/test_fidelity_gan_sparse_ant.py.

    Several processes (`multi_process`, `accelerate launch --num_processes N`), with the result of one process for
    the same global batch: the feedback samples, the Fisher information and the repulsion are computed alike in
    every process (the same seeded draws, no communication). In both stages every process draws each step's real
    batch and latents for the whole batch alike. The discriminator step runs on the whole global batch in every
    process (no DDP: batch statistics, if a discriminator has any, are the whole batch's, and real batches need
    not split evenly), and its gradients are averaged over the processes so that the copies stay equal where
    kernels are not deterministic. The generator step runs the generator under DDP (`unlearn.train.data_parallel`)
    on this process's share of the latents (`unlearn.train.shard`); the discriminator judges the gathered batch
    alike in every process, and the gradient it sends back reaches each share (`generator_loss_on_shards`). A
    generator with batch statistics (BatchNorm, as the `dcgan` architecture's) would see its share's statistics
    there: it runs on the whole batch in every process instead (still under DDP, which keeps the copies equal),
    which gives the one-process result but splits no work. What passes between the processes: the generated
    images, the discriminator's gradients and DDP's; the anchors θ* and θ_N are plain tensors, one set per
    process, and nothing frozen is wrapped. Mixed precision runs both networks under autocast (bf16 is checked
    against one process on CPUs; fp16 goes through the prepared optimizers' loss scaling); gradient
    accumulation is refused (`accumulates`: a discriminator and a generator step per step).

    Reference defaults (MNIST, README): stage 1 2,000 iterations, λ 5e8, 32 Fisher samples, batch 16; stage 2
    3,000 iterations on positives from 5,000 draws, batch 16, lr 0.002, NL2 with γ 1.2. Our defaults suit the
    digits world (fewer steps at batch 64, the world's Adam settings, EL2 with γ 0.05 and a factor 1,000 for
    the paper's distance ‖θ − θ_N‖², which is about 5 after stage 1 there); γ depends on the distance's scale,
    so a new model needs its own (the recipes for each form hold tuned values).
    """

    families = ("gan",)
    multi_process = True
    accumulates = False  # a discriminator and a generator step per step
    # Feedback
    feedback: str | None = hyperparameter(
        None,
        "the feedback classifier (required): a classifier folder or 'module:function', e.g. "
        "unlearn.worlds.digits:load_digits_classifier",
    )
    feedback_threshold: float | None = hyperparameter(
        None,
        "flag a sample when the erased class's logit exceeds this (multi-label attributes); null: argmax",
    )
    positive_max_prob: float | None = hyperparameter(
        None,
        "keep as positives only samples whose erased-class probability is below this; null: all unflagged",
        gt=0,
        le=1,
    )
    negatives: int = hyperparameter(400, "flagged samples stage 1 adapts to", ge=1)
    positives: int = hyperparameter(5000, "samples drawn for stage 2's positives (reference 5,000)", ge=1)
    max_draws: int = hyperparameter(100000, "most samples drawn while looking for the negatives", ge=1)
    # Stage 1: negative adaptation with EWC
    adapt_steps: int = hyperparameter(
        300, "stage 1 steps of adversarial fine-tuning on the negatives (reference 2,000)", ge=0
    )
    adapt_lr: float = hyperparameter(2e-4, "stage 1 Adam learning rate")
    ewc_lambda: float = hyperparameter(
        1.0e3,
        "EWC weight λ in stage 1, (λ/2)·Σ F_i (θ_i − θ*_i)² (reference 5e8, on StyleGAN2's Fisher scale)",
        ge=0,
    )
    fisher_samples: int = hyperparameter(
        32, "latents averaged for the Fisher information (reference 32)", ge=1
    )
    adapted_models: int = hyperparameter(
        1, "adapted copies θ_N, each from its own random stream; the repulsion averages them", ge=1
    )
    adapted_path: str | None = hyperparameter(
        None, "load θ_N from this run folder or adapted_generator_<k>.safetensors instead of running stage 1"
    )
    # Stage 2: unlearning with repulsion
    steps: int = hyperparameter(1500, "stage 2 steps on the positives (reference 3,000)")
    lr: float = hyperparameter(
        2e-4, "stage 2 Adam learning rate of the generator, and of the decoupled repulsion step"
    )
    disc_lr: float | None = hyperparameter(
        None, "the discriminator's Adam learning rate in both stages; null = the stage's generator rate"
    )
    batch_size: int = hyperparameter(64, "samples per step in both stages (reference 16)")
    repulsion: str = hyperparameter(
        "exponential",
        "repulsion from θ_N: inverse (γ/d), negative (−γ·d), exponential (c·exp(−γ·d)) or none",
    )
    gamma: float = hyperparameter(
        0.05, "repulsion weight γ; its scale depends on the distance d (reference 1.2 for negative)", ge=0
    )
    exp_scale: float = hyperparameter(1000.0, "factor c of the exponential repulsion (reference 100)", gt=0)
    distance: str = hyperparameter(
        "sum",
        "d: sum (the paper's ‖θ − θ_N‖² over all weights) or mean (the reference code's val, exactly, incl. its "
        "factor K for K adapted models)",
    )
    decoupled: bool = hyperparameter(
        True,
        "apply the repulsion as its own gradient step after each Adam step; false: inside the loss (reference)",
    )
    # Both stages
    beta1: float = hyperparameter(0.5, "Adam β1 of both networks", ge=0, lt=1)
    beta2: float = hyperparameter(0.99, "Adam β2 of both networks", ge=0, lt=1)
    r1_gamma: float = hyperparameter(
        1.0, "weight of the discriminator's R1 gradient penalty; 0 turns it off", ge=0
    )
    r1_every: int = hyperparameter(
        4, "lazy R1: apply it every this many discriminator steps, scaled by it", ge=1
    )
    ema_decay: float | None = hyperparameter(
        0.99,
        "decay of the generator's weight average kept as stage 2's result; null: the last weights",
        ge=0,
        lt=1,
    )
    max_grad_norm: float | None = hyperparameter(
        None, "clip the generator's gradient to this L2 norm; null: no clipping"
    )

    def check(self) -> None:
        if self.repulsion not in REPULSIONS:
            raise ConfigError(f"unknown repulsion {self.repulsion!r}; known: {', '.join(REPULSIONS)}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"unknown distance {self.distance!r}; known: {', '.join(DISTANCES)}")
        for name in ("negatives", "positives", "max_draws", "adapted_models", "fisher_samples", "r1_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"adapt_then_unlearn {name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.adapt_steps < 0 or self.batch_size < 1:
            raise ConfigError("adapt_then_unlearn steps and adapt_steps must be >= 0, batch_size >= 1")

    # -- the algorithm ---------------------------------------------------------------------------------------

    def check_recipe(self, recipe, conditioning: str | None) -> None:
        super().check_recipe(recipe, conditioning)
        if self.feedback is None:
            raise ConfigError(
                "adapt_then_unlearn needs method.feedback, the classifier that flags the erased class: a classifier "
                "folder or 'module:function' (the digits world's: unlearn.worlds.digits:load_digits_classifier)"
            )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        label = forget_label(data)
        flag = self.feedback_flags(label, model.device)
        project = Path(accelerator.project_dir) if accelerator.project_dir else None
        if self.repulsion != "none":
            adapted = self.adapted(model, flag, accelerator, project)
        else:
            adapted = []
        positives = collect(model, lambda x: flag(x) != 0, False, self.positives, self.positives)
        if len(positives) == 0:
            raise DataError(
                f"the feedback classifier flags all {self.positives} samples: no positives to keep"
            )
        if self.decoupled:  # a gradient step of its own after every Adam step
            coupled, after = None, lambda: self.repulsion_step(model, adapted)
        else:  # inside the loss that Adam minimizes (the reference)
            coupled, after = lambda: self.repulsion_loss(model, adapted), None
        return self.adversarial(model, positives, accelerator, self.steps, self.lr, "unlearn", coupled, after)

    def feedback_flags(self, label: int, device):
        """A function images -> bool flags (carries the unwanted class / feature) from the feedback classifier."""
        from ..metrics.generation import load_judge

        if self.feedback is None:
            raise ConfigError(
                "adapt_then_unlearn needs method.feedback, the classifier that flags the erased class: a classifier "
                "folder or 'module:function' (the digits world's: unlearn.worlds.digits:load_digits_classifier)"
            )
        judge = load_judge(self.feedback)
        if isinstance(judge, torch.nn.Module):
            judge = judge.to(device).eval()
        return lambda images: _flags(judge, images, label, self.feedback_threshold, self.positive_max_prob)

    def adapted(self, model, flag, accelerator, project: Path | None) -> list[dict[str, torch.Tensor]]:
        """Stage 1: the adapted generator weights θ_N (K of them), loaded from `adapted_path` or computed."""
        if self.adapted_path:
            return load_adapted(self.adapted_path, model)
        negatives = collect(model, lambda x: flag(x) == 1, True, self.negatives, self.max_draws)
        if len(negatives) == 0:
            raise DataError(
                f"the feedback classifier flags none of {self.max_draws} samples: the generator does not "
                "produce what should be erased"
            )
        fisher = fisher_information(model, self.fisher_samples)
        anchor = {n: p.detach().clone() for n, p in model.generator.named_parameters()}
        results = []
        for k in range(self.adapted_models):
            twin = copy.deepcopy(model).train().requires_grad_(True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed() + 1 + k)

                def ewc(twin=twin) -> torch.Tensor:
                    return ewc_penalty(twin.generator, anchor, fisher, self.ewc_lambda)

                twin = self.adversarial(
                    twin,
                    negatives,
                    accelerator,
                    self.adapt_steps,
                    self.adapt_lr,
                    f"adapt{k}",
                    ewc,
                )
            weights = {n: p.detach().clone() for n, p in twin.generator.named_parameters()}
            results.append(weights)
            if project is not None and accelerator.is_main_process:
                from ..checkpoints import save_state_dict

                save_state_dict(weights, project / ADAPTED_FILE.format(k=k))
        return results

    def adversarial(
        self, model, reals: torch.Tensor, accelerator, steps: int, lr: float, stage: str, extra, after=None
    ):
        """`steps` alternating steps: the discriminator on `reals` vs generated (with lazy R1), then the
        generator on the non-saturating loss + `extra()` (EWC in stage 1, the coupled repulsion in stage 2);
        `after()` runs after every generator step (the decoupled repulsion step)."""
        if accelerator.gradient_accumulation_steps > 1:
            raise ConfigError(
                "adapt_then_unlearn steps a discriminator and a generator per step; set "
                "train.gradient_accumulation_steps to 1"
            )
        model.requires_grad_(True)
        # the generator's trained pass: under DDP on several processes
        net = parallel_generator(model, accelerator)
        betas = (self.beta1, self.beta2)
        gen_opt = accelerator.prepare(torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas))
        dis_lr = self.disc_lr if self.disc_lr is not None else lr
        dis_opt = accelerator.prepare(
            torch.optim.Adam(model.discriminator.parameters(), lr=dis_lr, betas=betas)
        )
        batches = endless(torch.utils.data.TensorDataset(reals), self.batch_size)
        ema = None
        if self.ema_decay and stage == "unlearn":
            ema = [p.detach().clone() for p in model.generator.parameters()]

        def update_ema() -> None:
            with torch.no_grad():
                for average, param in zip(ema, model.generator.parameters()):
                    average.lerp_(param.detach(), 1.0 - self.ema_decay)

        trainer = Trainer(
            model,
            gen_opt,
            accelerator,
            stage=stage,
            total=steps,
            max_grad_norm=self.max_grad_norm,
            state={"discriminator_optimizer": dis_opt, "reals": batches, "ema": ema},
            settings={"method": self},
        )
        model.train()
        for step in trainer.loop():
            (real,) = next(batches)
            real = real.to(model.device)
            # the discriminator step: the whole global batch in every process (see "Several processes")
            with accelerator.autocast():
                with torch.no_grad():  # (its loss detaches the fakes)
                    fake = model.generate(model.random_latents(len(real)))
                d_loss = model.discriminator_loss(real, fake)
                if self.r1_gamma and step % self.r1_every == 0:
                    d_loss = d_loss + self.r1_every * model.r1_penalty(real, self.r1_gamma)
            discriminator_step(trainer, d_loss, dis_opt, model.discriminator)
            # the generator step: the global batch's latents, the generator on this process's share
            with accelerator.autocast():
                z = model.random_latents(self.batch_size)
                g_loss = generator_loss_on_shards(model, net, z, accelerator)
                loss = g_loss if extra is None else g_loss + extra()
            trainer.step(loss, name="generator")
            if after is not None:
                after()
            if ema is not None:
                update_ema()
        model.eval()
        if net is not model.generator:  # (it trained in place) drop the autocast wrapper prepare() gave it
            accelerator.unwrap_model(net, keep_fp32_wrapper=False)
        if ema is not None and steps:
            with torch.no_grad():
                for average, param in zip(ema, model.generator.parameters()):
                    param.copy_(average)
        model.discriminator.zero_grad(set_to_none=True)
        return model

    def repulsion_step(self, model, adapted: list[dict[str, torch.Tensor]]) -> None:
        """The decoupled repulsion: θ ← θ − lr·∇_θ(γ·L_rep), outside Adam (as AdamW decouples weight decay)."""
        if self.repulsion == "none" or not adapted:
            return
        params = dict(model.generator.named_parameters())
        with torch.enable_grad():
            loss = self.repulsion_loss(model, adapted)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(params.values(), grads):
                if grad is not None:
                    param.sub_(self.lr * grad)

    def repulsion_loss(self, model, adapted: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """γ·L_rep (or `exp_scale`·exp(−γ·d)) of the generator's weights from the adapted weights."""
        if self.repulsion == "none" or not adapted:
            return torch.zeros((), device=model.device)
        d = parameter_distance(dict(model.generator.named_parameters()), adapted, self.distance)
        return repulsion(d, self.repulsion, self.gamma, self.exp_scale)


# ------------------------------------------------------------------------------------------------------------
# The parts, as functions (tests check each)


def forget_label(data: UnlearnData) -> int:
    """The feedback classifier's label of what is erased."""
    if data.prompts is not None and data.prompts.concept_label is not None:
        return int(data.prompts.concept_label)
    if len(data.forget_classes) != 1:
        raise DataError("adapt_then_unlearn erases one class or feature at a time: give one forget_class")
    return int(data.forget_classes[0])


def _flags(
    judge, images: torch.Tensor, label: int, threshold: float | None, positive_max_prob: float | None = None
) -> torch.Tensor:
    """Per image: 1 = flagged (a negative), 0 = a positive, -1 = neither (unflagged, but the erased class's
    probability is at least `positive_max_prob`)."""
    from ..metrics.generation import _module_device, owner_module

    with torch.no_grad():
        out = judge(images.to(_module_device(owner_module(judge))))
    out = out.logits if hasattr(out, "logits") else out
    if out.dtype == torch.bool:
        return out.flatten().long().cpu()
    if out.ndim != 2 or not 0 <= label < out.shape[1]:
        raise DataError(
            f"forget class {label} is out of range for a feedback classifier with output shape {tuple(out.shape)}"
        )
    flagged = out.argmax(1) == label if threshold is None else out[:, label] > threshold
    flags = flagged.long()
    if positive_max_prob is not None:
        unsure = torch.softmax(out.float(), dim=1)[:, label] >= positive_max_prob
        flags[unsure & ~flagged] = -1
    return flags.cpu()


@torch.no_grad()
def collect(model, flag, want: bool, count: int, max_draws: int, chunk: int = 1000) -> torch.Tensor:
    """Up to `count` generated images (CPU, [0, 1]) whose flag is `want`, from at most `max_draws` draws of
    the generator in eval mode (latents from the global RNG)."""
    kept, drawn = [], 0
    was_training = model.generator.training
    model.generator.eval()
    while drawn < max_draws and sum(len(k) for k in kept) < count:
        n = min(chunk, max_draws - drawn)
        images = model.generate(model.random_latents(n)).cpu()
        kept.append(images[flag(images) == want])
        drawn += n
    model.generator.train(was_training)
    return torch.cat(kept)[:count]


def fisher_information(model, samples: int) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the generator's weights: mean over `samples` latents of (∂D(G(z))/∂θ)², one
    backward pass per latent (the discriminator's logit as the log-likelihood, as the reference code does).
    The generator runs in eval mode: batch norm uses its running statistics, so each gradient is one sample's
    (and a batch of one is allowed). The reference (`EWC_ADAPT_MNIST/model.py:estimate_fisher`) pushes the 32
    latents through G and D as one batch and takes each logit's gradient: the same numbers here, since
    neither network mixes samples (its StyleGAN2 discriminator's minibatch-stddev layer does)."""
    params = dict(model.generator.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    model.requires_grad_(True)
    was_training = model.generator.training
    model.generator.eval()
    z = model.random_latents(samples)
    for i in range(samples):
        logit = model.discriminate(model.generate(z[i : i + 1])).sum()
        grads = torch.autograd.grad(logit, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2 / samples
    model.generator.train(was_training)
    return fisher


def ewc_penalty(generator, anchor: dict, fisher: dict, lam: float) -> torch.Tensor:
    """EWC: (λ/2)·Σ_i F_i (θ_i − θ*_i)² over the generator's weights."""
    total = None
    for name, param in generator.named_parameters():
        term = (fisher[name] * (param - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    return 0.5 * lam * total


def parameter_distance(params: dict, adapted: list[dict], distance: str = "sum") -> torch.Tensor:
    """Squared distance d between the weights `params` and the K adapted weights `adapted`.

    "sum": the paper's ‖θ − θ_N‖²₂ over all weights, averaged over the K adapted models. "mean": the
    reference code's `val` (`calc_difference_param_new`), exactly: per parameter tensor, the sum over the K
    adapted models of the tensor's mean squared difference, divided by the number T of tensors, then by 2 and
    *multiplied* by K (`value/2*len(ckpt_gens)`, an operator-precedence slip), summed over the tensors:
    d = (K/2T)·Σ_t Σ_k mean((θ_t − θ_k,t)²); for K = 1, ½ · the mean over tensors of the per-tensor MSE.
    """
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}; known: {', '.join(DISTANCES)}")
    total = None
    for target in adapted:
        if distance == "sum":
            d = sum(((params[n] - t.to(params[n].device)) ** 2).sum() for n, t in target.items())
        else:
            d = sum(((params[n] - t.to(params[n].device)) ** 2).mean() for n, t in target.items())
        total = d if total is None else total + d
    k = len(adapted)
    if distance == "sum":
        return total / k
    return total / len(adapted[0]) / 2 * k


def repulsion(d: torch.Tensor, form: str, gamma: float, exp_scale: float = 100.0) -> torch.Tensor:
    """The repulsion term of stage 2 for a squared distance d (minimized: it falls as d grows)."""
    if form == "inverse":
        return gamma / d.clamp_min(1e-12)
    if form == "negative":
        return -gamma * d
    if form == "exponential":
        return exp_scale * torch.exp(-gamma * d)
    if form == "none":
        return torch.zeros_like(d)
    raise ConfigError(f"unknown repulsion {form!r}; known: {', '.join(REPULSIONS)}")


def load_adapted(path: str | Path, model) -> list[dict[str, torch.Tensor]]:
    """Adapted generator weights from a file, or from every `adapted_generator_<k>.safetensors` of a folder."""
    from ..checkpoints import load_into, load_state_dict

    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"adapted weights {str(path)!r} do not exist")
    files = sorted(path.glob("adapted_generator_*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CheckpointNotFoundError(f"{str(path)!r} holds no adapted_generator_<k>.safetensors")
    results = []
    for file in files:
        state = load_state_dict(file)
        probe = copy.deepcopy(model.generator)
        load_into(probe, state, str(file))  # refuses weights of another architecture
        results.append({n: p.detach().to(model.device) for n, p in probe.named_parameters()})
    return results


__all__ = [
    "AdaptThenUnlearn",
    "collect",
    "ewc_penalty",
    "fisher_information",
    "parameter_distance",
    "repulsion",
]
