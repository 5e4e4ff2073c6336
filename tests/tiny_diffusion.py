"""Tiny diffusion pipelines built from configs, the way diffusers' own tests build them (no download)."""

from __future__ import annotations

import json
from pathlib import Path

# A word-level CLIP vocabulary: every word below is one token, so prompts differ token by token.
WORDS = ["a", "photo", "of", "the", "cat", "dog", "tree", "house", "painting", "style", "nude", "person"]


# The digits world's model configs at tiny size (the same code paths, milliseconds per step).
TINY_DDPM = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "num_class_embeds": 11,
}
TINY_T2I = {
    **{
        k: v
        for k, v in TINY_DDPM.items()
        if k not in ("num_class_embeds", "down_block_types", "up_block_types")
    },
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 16,
}
TINY_TEXT = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}


def write_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer (vocab.json + merges.txt) whose every word in WORDS is one BPE token, built the way the
    digits world builds its shipped tokenizer."""
    from transformers import CLIPTokenizer

    from unlearn.worlds.digits_text import tokenizer_vocab_and_merges

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab_and_merges(tuple(WORDS))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_sd_pipeline(folder: Path, vae: bool = True, cross_attention_dim: int = 8):
    """A Stable-Diffusion pipeline of ~40k parameters saved to `folder` (diffusers' dummy components)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tokenizer(folder.parent / f"{folder.name}-tokenizer"))
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4 if vae else 1,
        out_channels=4 if vae else 1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    autoencoder = None
    if vae:
        torch.manual_seed(0)
        autoencoder = AutoencoderKL(
            block_out_channels=[4, 8],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=2,
        )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            hidden_size=cross_attention_dim,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    return folder


def tiny_ddpm_pipeline(folder: Path, num_classes: int = 3):
    """A class-conditional DDPM (UNet2DModel, `num_classes` + 1 null class) at 8x8 saved to `folder`."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(str(folder))
    return folder


def ddpm_and_t2i_pipelines(root: Path) -> dict[str, Path]:
    """A tiny class-conditional DDPM of the ten digits and a tiny text-to-image pipeline in pixel space (no VAE):
    what the multi-process tests erase from."""
    return {
        "ddpm": tiny_ddpm_pipeline(root / "ddpm", num_classes=10),
        "t2i": tiny_sd_pipeline(root / "t2i", vae=False),
    }


def load_pipeline(path):
    """The `Diffusion` adapter over a pipeline folder."""
    from unlearn.models.diffusion import load_diffusion

    return load_diffusion(path)


def stock_pipeline(folder):
    """A pipeline folder as diffusers itself loads it (`StableDiffusionPipeline`), progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cpu_accelerator(tmp_path, mixed_precision: str = "no"):
    """A CPU accelerator whose project folder (where methods save masks, LoRAs, train.jsonl) is `tmp_path`."""
    from accelerate import Accelerator

    return Accelerator(cpu=True, project_dir=str(tmp_path), mixed_precision=mixed_precision)


def cat_task(model, num_images: int = 4, retain=("a photo of the dog",), anchor: str | None = "a dog"):
    """Erase "cat" from a tiny SD pipeline: two forget prompts, one paraphrase, images the model draws itself."""
    from unlearn.data import forget_generated_concept

    return forget_generated_concept(
        model,
        "cat",
        ["a photo of the cat", "the cat"],
        ["a painting of a cat"],
        list(retain),
        anchor,
        num_images=num_images,
        steps=2,
    )


def reference_text_states(model, prompts, dtype=None):
    """Text-encoder states (N, L, d) of `prompts` and each prompt's `attention_mask.sum() - 2` (UCE's index of
    the last word token, `train-scripts/train_erase.py`), computed as the references do, for parity tests that
    must not go through `unlearn.methods.closed_form`."""
    import torch

    tokens = model.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        states = model.text_encoder(tokens.input_ids)[0]
    return (states.float() if dtype is None else states.to(dtype)), (
        tokens.attention_mask.sum(1) - 2
    ).tolist()
