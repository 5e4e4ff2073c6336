"""The GAN family: a generator and a discriminator behind one interface.

Images enter and leave as float tensors in [0, 1], shape (N, C, H, W); inside, the built-in networks work in
[-1, 1] (the generator ends in tanh). Latents are standard normal vectors of `latent_dim` entries.

Primitives (what the GAN unlearning methods need, reference/methods.md §4):

- `latents(n, seed)` and `sample(n, seed)`: image i of a draw depends only on (seed, i), so the same seed gives
  the same latents before and after unlearning (sample grids and scores compare like with like);
- `generate(z)` (with gradients) and `discriminate(images)` (the discriminator's logit);
- `generator_loss(fake)`, `discriminator_loss(real, fake)`: the non-saturating logistic GAN losses;
- `r1_penalty(real)`: (γ/2)·E‖∇_x D(x)‖² on real images (Mescheder et al. 2018), as StyleGAN2 uses it.

Built-in architectures (`ARCHITECTURES`): `dcgan_digits`, a small DCGAN-style pair for 1×8×8 images (the digits
world), and `dcgan`, a configurable DCGAN for 32×32 or 64×64 (any power-of-two size from 16). Any
generator / discriminator modules work through the Python API (`GAN(generator, discriminator, latent_dim=...)`;
`load_gan(folder, generator=..., discriminator=...)` loads weights into them).

A saved GAN is a folder: `gan_config.json` (architecture, sizes) and `generator.safetensors` /
`discriminator.safetensors`. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    atomic_path,
    float_dtypes,
    load_into,
    load_state_dict,
    read_json_file,
    refuse_special_files,
    save_state_dict,
    saved_as,
)
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..progress import progress
from ..spread import map_batches
from .base import Model

CONFIG_NAME = "gan_config.json"
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
LATENT_BLOCK = 256


# --------------------------------------------------------------------------------------------------------
# Built-in architectures


class DigitsGenerator(nn.Module):
    """DCGAN-style generator for 8×8 images: linear to 2×2, two ×2 transposed convolutions, a 3×3 output conv."""

    def __init__(self, latent_dim: int = 32, channels: int = 1, width: int = 64):
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent_dim, 2 * width * 2 * 2)
        self.body = nn.Sequential(
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1),  # 4×4
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # 8×8
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), 2 * self.width, 2, 2))


class DigitsDiscriminator(nn.Module):
    """DCGAN-style discriminator for 8×8 images: two strided convolutions and a linear logit. No batch norm
    (the R1 penalty regularizes it, and per-sample gradients for the EWC Fisher stay per sample)."""

    def __init__(self, channels: int = 1, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),  # 4×4
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1),  # 2×2
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 2 * 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).flatten()


class DCGANGenerator(nn.Module):
    """DCGAN generator for `image_size` (a power of two ≥ 16): linear to 4×4, ×2 transposed conv blocks with
    batch norm, halving the width each time from `width · image_size / 8` down to `width`."""

    def __init__(self, latent_dim: int = 128, channels: int = 3, width: int = 64, image_size: int = 32):
        super().__init__()
        levels = _levels(image_size)
        top = width * 2 ** (levels - 1)
        self.top = top
        self.project = nn.Sequential(nn.Linear(latent_dim, top * 16), nn.BatchNorm1d(top * 16), nn.ReLU())
        blocks, current = [], top
        for _ in range(levels - 1):
            blocks += [
                nn.ConvTranspose2d(current, current // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(current // 2),
                nn.ReLU(),
            ]
            current //= 2
        blocks += [nn.ConvTranspose2d(current, channels, 4, stride=2, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), self.top, 4, 4))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator mirroring `DCGANGenerator`: strided 4×4 convolutions with leaky ReLU (no batch norm,
    so R1 and per-sample gradients stay well defined) down to 4×4, then a linear logit."""

    def __init__(self, channels: int = 3, width: int = 64, image_size: int = 32):
        super().__init__()
        levels = _levels(image_size)
        layers, current = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], width
        for _ in range(levels - 1):
            layers += [nn.Conv2d(current, current * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            current *= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(current * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).flatten()


def _levels(image_size: int) -> int:
    """Number of ×2 upsamplings from 4×4 to `image_size`."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ConfigError(f"the dcgan architecture needs a power-of-two image_size >= 16, got {image_size}")
    return (image_size // 4).bit_length() - 1


def _build_digits(config: dict) -> tuple[nn.Module, nn.Module]:
    return (
        DigitsGenerator(config["latent_dim"], config["channels"], config["width"]),
        DigitsDiscriminator(config["channels"], config["width"]),
    )


def _build_dcgan(config: dict) -> tuple[nn.Module, nn.Module]:
    return (
        DCGANGenerator(config["latent_dim"], config["channels"], config["width"], config["image_size"]),
        DCGANDiscriminator(config["channels"], config["width"], config["image_size"]),
    )


# name -> (builder(config) -> (generator, discriminator), default config)
ARCHITECTURES = {
    "dcgan_digits": (_build_digits, {"latent_dim": 32, "channels": 1, "width": 64, "image_size": 8}),
    "dcgan": (_build_dcgan, {"latent_dim": 128, "channels": 3, "width": 64, "image_size": 32}),
}


# --------------------------------------------------------------------------------------------------------
# The adapter


class GAN(Model):
    """A generator and its discriminator. Only the generator is `trainable` (what unlearning edits and what
    is evaluated); methods that train the discriminator too (Adapt-then-Unlearn, as the reference code does)
    reach it as `discriminator`.

    Args:
        generator: maps latents (N, latent_dim) to images in [-1, 1], shape (N, C, H, W).
        discriminator: maps images in [-1, 1] to one logit per image (N,) or (N, 1).
        latent_dim: size of the standard normal latent.
        config: the architecture's description, written to `gan_config.json` (`{"arch": name, ...}` for a
            built-in architecture; `{"arch": "custom", ...}` for modules brought through the Python API).
    """

    family = "gan"

    def __init__(
        self, generator: nn.Module, discriminator: nn.Module, latent_dim: int, config: dict | None = None
    ):
        super().__init__()
        if latent_dim < 1:
            raise ConfigError(f"latent_dim must be at least 1, got {latent_dim}")
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = int(latent_dim)
        self.config = {"arch": "custom", "latent_dim": int(latent_dim), **dict(config or {})}
        # The dtype of each tensor as loaded, per part ("generator"/"discriminator" -> name -> dtype): the
        # networks train in fp32, `save` writes each tensor back in the dtype it came in.
        self.input_dtypes: dict[str, dict[str, torch.dtype]] = {}

    @property
    def trainable(self) -> nn.Module:
        return self.generator

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    # -- sampling ------------------------------------------------------------------------------------------

    def latents(self, n: int, seed: int = 0) -> torch.Tensor:
        """n standard normal latents, drawn on the CPU (then moved) in fixed blocks of `LATENT_BLOCK`, block b
        from a generator seeded with (seed, b): latent i depends only on (seed, i), not on n or the device
        (torch draws a tensor of another size from a different stream)."""
        blocks = []
        for block in range(-(-n // LATENT_BLOCK)):
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + block)
            blocks.append(torch.randn(LATENT_BLOCK, self.latent_dim, generator=generator))
        z = torch.cat(blocks)[:n] if blocks else torch.zeros(0, self.latent_dim)
        return z.to(self.device)

    def random_latents(self, n: int) -> torch.Tensor:
        """n latents from the global RNG (training batches)."""
        return torch.randn(n, self.latent_dim, device=self.device)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] for latents `z`, with gradients (the generator in its current mode)."""
        return (self.generator(z).float() + 1.0) / 2.0

    def discriminate(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logit (N,) for images in [0, 1]."""
        return self.discriminator(images * 2.0 - 1.0).reshape(len(images), -1)[:, 0].float()

    @torch.no_grad()
    def sample(
        self, n: int, seed: int = 0, batch_size: int = 1024, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """n images in [0, 1] (fp32) on the CPU, deterministic per seed, with the generator in eval mode, under
        autocast to `dtype` when given (bf16 on a GPU); inside `unlearn.spread.spread_over`, the batches are
        spread over the processes of a launch."""
        was_training = self.generator.training
        self.generator.eval()
        z = self.latents(n, seed)
        bar = progress(desc="generating", total=n, unit="img")

        def batch(items: slice) -> torch.Tensor:
            bar.update(len(z[items]))
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                return self.generate(z[items]).float().cpu()

        images = map_batches(n, batch_size, batch)  # spread over the processes in scoring
        bar.close()
        self.generator.train(was_training)
        return torch.cat(images) if images else torch.zeros(0)

    # -- losses --------------------------------------------------------------------------------------------

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """Non-saturating generator loss: E softplus(−D(G(z))) on generated images in [0, 1]."""
        return F.softplus(-self.discriminate(fake)).mean()

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Logistic discriminator loss: E softplus(D(fake)) + E softplus(−D(real)); `fake` is detached."""
        return (
            F.softplus(self.discriminate(fake.detach())).mean() + F.softplus(-self.discriminate(real)).mean()
        )

    def r1_penalty(self, real: torch.Tensor, gamma: float = 10.0) -> torch.Tensor:
        """R1 regularization (γ/2)·E‖∇_x D(x)‖² on real images x in [0, 1] (gradient w.r.t. D's [-1, 1] input)."""
        x = (real.detach() * 2.0 - 1.0).requires_grad_(True)
        logits = self.discriminator(x).reshape(len(x), -1)[:, 0]
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        return 0.5 * gamma * grad.pow(2).flatten(1).sum(1).mean()

    def loss(self, batch) -> torch.Tensor:
        """The ordinary training loss of what unlearning edits: the non-saturating generator loss on as many
        fresh samples as the batch has images (the batch's images are not used: the generator sees no data)."""
        n = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        return self.generator_loss(self.generate(self.random_latents(n)))

    # -- Model ---------------------------------------------------------------------------------------------

    def reinitialize(self) -> None:
        """Fresh weights for generator and discriminator from the global torch RNG."""
        for part in (self.generator, self.discriminator):
            for module in part.modules():
                if module is not part and hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def save(self, path: str | Path) -> None:
        """Write `gan_config.json`, `generator.safetensors` and `discriminator.safetensors` into the folder
        `path`, atomically, each tensor in the dtype it was loaded in."""
        with atomic_path(Path(path)) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_NAME).write_text(json.dumps({"family": "gan", **self.config}, indent=2) + "\n")
            for name, module, file in (
                ("generator", self.generator, GENERATOR_FILE),
                ("discriminator", self.discriminator, DISCRIMINATOR_FILE),
            ):
                with saved_as(module, self.input_dtypes.get(name, {})):
                    save_state_dict(module.state_dict(), tmp / file)


def build_gan(arch: str = "dcgan_digits", **config) -> GAN:
    """A GAN of a built-in architecture with fresh weights (from the global torch RNG).

    Args:
        arch: a name in `ARCHITECTURES`.
        **config: overrides of the architecture's defaults (latent_dim, channels, width, image_size).
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown GAN architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    builder, defaults = ARCHITECTURES[arch]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} of GAN architecture {arch!r}; known: {', '.join(defaults)}"
        )
    full = {**defaults, **config}
    for key, value in full.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"GAN config {key} must be a positive integer, got {value!r}")
    if arch == "dcgan_digits" and full["image_size"] != 8:
        raise ConfigError("the dcgan_digits architecture makes 8x8 images; use dcgan for 16x16 and larger")
    generator, discriminator = builder(full)
    return GAN(generator, discriminator, full["latent_dim"], {"arch": arch, **full})


def load_gan(
    path: str | Path, generator: nn.Module | None = None, discriminator: nn.Module | None = None
) -> GAN:
    """Load a GAN folder written by `GAN.save`.

    Args:
        path: the folder (gan_config.json, generator.safetensors, discriminator.safetensors).
        generator, discriminator: modules to load the weights into (a custom architecture); by default the
            built-in architecture named in the config is built.

    Raises:
        CheckpointNotFoundError: the folder does not exist.
        CheckpointError: it is not a GAN folder, its config is unreadable, or the weights do not fit.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"GAN checkpoint {str(path)!r} does not exist")
    config_file = path / CONFIG_NAME
    if not path.is_dir() or not config_file.exists():
        raise CheckpointError(f"{str(path)!r} is not a GAN folder (it has no {CONFIG_NAME})")
    refuse_special_files(path)
    config = read_json_file(config_file, "GAN config")
    if not isinstance(config, dict) or config.get("family", "gan") != "gan" or "latent_dim" not in config:
        raise CheckpointError(
            f"{str(config_file)!r} does not describe a GAN (family gan, latent_dim); give a folder written "
            "by GAN.save"
        )
    config.pop("family", None)
    arch = config.get("arch", "custom")
    if not isinstance(arch, str):
        raise CheckpointError(
            f"{str(config_file)!r}: arch must be an architecture name (a string), got {arch!r}; fix it or "
            "re-save the GAN"
        )
    if (generator is None) != (discriminator is None):
        raise ConfigError("give both a generator and a discriminator module, or neither")
    if generator is not None:
        latent_dim = config["latent_dim"]
        if not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 1:
            raise CheckpointError(
                f"{str(config_file)!r}: latent_dim must be a positive integer, got {latent_dim!r}"
            )
        model = GAN(generator, discriminator, latent_dim, config)
    elif arch in ARCHITECTURES:
        settings = {k: v for k, v in config.items() if k != "arch"}
        try:
            model = build_gan(arch, **settings)
        except ConfigError as err:
            raise CheckpointError(f"{str(config_file)!r}: {err}; fix it or re-save the GAN") from err
    else:
        raise CheckpointError(
            f"GAN folder {str(path)!r} holds a {arch!r} architecture; pass its generator and discriminator "
            "modules (load_gan(path, generator=..., discriminator=...))"
        )
    for name, module, file in (
        ("generator", model.generator, GENERATOR_FILE),
        ("discriminator", model.discriminator, DISCRIMINATOR_FILE),
    ):
        state = load_state_dict(path / file)
        load_into(module, state, str(path / file))
        model.input_dtypes[name] = float_dtypes(state)
    model.source = {"path": str(path)}
    return model.eval()
