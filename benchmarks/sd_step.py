"""Training steps of the Stable Diffusion recipes on a UNet of SD v1.x's size: steps per second and peak memory.

    python benchmarks/sd_step.py [--size sd15|tiny] [--steps 5] [--device cuda] [--out FILE]

Builds an SD v1.4/v1.5-shaped pipeline from configs (UNet2DConditionModel 860 M parameters, CLIP ViT-L/14 text
encoder, the SD VAE; random weights, no download; the shipped digits tokenizer stands in for CLIP's), then runs
each SD recipe's method exactly as `unlearn erase` would (the recipe's precision, gradient checkpointing, frozen
parts cast to half, batch size, trained parameters) on a forget/retain set the model draws itself. Each
method runs once for 1 step and once for 1 + `--steps` steps; the difference divided by `--steps` is the time of
one training step (the mask pass, the frozen teacher copy and the data drawing cancel out); a closed-form
method (UCE) is timed once, its whole edit; ANT's saliency pass is cut to one gradient map and multi-concept
recipes to their first two concepts (neither changes the cost of a step). Prints a table and
writes `benchmarks/results/sd_step.json`. `--size tiny` runs the same code on a tiny pipeline (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RECIPES = (
    "salun_nudity.yaml",
    "esd_x_vangogh.yaml",
    "esd_u_nudity.yaml",
    "uce_artists.yaml",
    "doco_vangogh.yaml",
    "realera_celebrities.yaml",
    "ant_nudity.yaml",
    "ant_celebrities_100.yaml",
)
SD_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16,
    norm_num_groups=4,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(4, 8),
    latent_channels=4,
    norm_num_groups=2,
    sample_size=16,
)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


def build_pipeline(size: str):
    """A Stable-Diffusion-shaped `Diffusion` model with random weights, built from configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn.models.diffusion import Diffusion
    from unlearn.worlds.digits_text import load_digits_tokenizer

    tokenizer = load_digits_tokenizer()
    text = SD_TEXT if size == "sd15" else TINY_TEXT
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text,
        )
    )
    unet = UNet2DConditionModel(**(SD_UNET if size == "sd15" else TINY_UNET))
    vae = AutoencoderKL(**(SD_VAE if size == "sd15" else TINY_VAE))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return Diffusion(
        unet,
        scheduler,
        text_encoder,
        tokenizer,
        vae,
        StableDiffusionPipeline,
        {"safety_checker": None, "feature_extractor": None, "image_encoder": None},
    )


def time_recipe(recipe_path: Path, size: str, device: str, steps: int) -> dict:
    """One SD recipe's method on a fresh SD-shaped model: seconds per training step and peak memory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from unlearn.data import forget_generated_concept
    from unlearn.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    precision = recipe.train.mixed_precision if device == "cuda" else "no"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    model = build_pipeline(size)
    model.to(accelerator.device)
    if recipe.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if precision != "no":
        model.cast_frozen(torch.bfloat16 if precision == "bf16" else torch.float16)
    batch = recipe.method_args.get("batch_size", recipe.method_args.get("lora_batch_size", 1))
    # A step costs the same whatever the number of concepts: multi-concept recipes (100 celebrities) are timed on
    # their first two, so that ANT's one-LoRA-per-concept loop stays short.
    concept = recipe.data.concept[:2] if isinstance(recipe.data.concept, list) else recipe.data.concept
    with accelerator.autocast():
        data = forget_generated_concept(
            model, concept, recipe.data.forget_prompts, None, recipe.data.retain_prompts,
            recipe.data.anchor, num_images=batch, steps=2, guidance=recipe.eval.guidance,
        )  # fmt: skip
    before = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.unet.state_dict().items()}
    cls = type(recipe.build_method())
    fields = cls.__dataclass_fields__
    # The trained stage's step count: `steps`, or RealEra's LoRA stage after its closed-form edit. A
    # closed-form method (UCE) has none: its one "step" is the whole edit. DoCo's discriminator-only warm-up is
    # skipped so that every timed step updates the UNet too.
    step_field = next((f for f in ("steps", "lora_steps") if f in fields), None)
    counts = (1, 1 + steps) if step_field else (1,)
    seconds = {}
    for count in counts:
        args = {**recipe.method_args, **({step_field: count} if step_field else {})}
        args.update({"warm_up": 0} if "warm_up" in fields else {})
        if (
            "mask_iterations" in fields
        ):  # ANT's saliency pass (20 maps x 10 trajectories) cancels out: one map
            args.update(mask_iterations=1, mask_seeds=[0], mask_prompts=None)
        method = cls(**args)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        method.unlearn(model, data, accelerator)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[count] = time.perf_counter() - started
    step = (seconds[1 + steps] - seconds[1]) / steps if len(counts) == 2 else seconds[1]
    # what the method edited: UNet weights that differ from the start (a LoRA is merged by then, a mask holds)
    after = model.unet.state_dict()
    edited = sum(int((after[name].detach().cpu() != value).sum()) for name, value in before.items())
    return {
        "recipe": recipe_path.name,
        "method": recipe.method,
        "precision": precision,
        "batch_size": batch,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "edited_parameters": edited,
        "step_s": step,
        "steps_per_s": 1.0 / step if step > 0 else None,  # None: the steps drowned in timing noise
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--out", default="benchmarks/results/sd_step.json")
    args = parser.parse_args()
    folder = Path(__file__).resolve().parent.parent / "recipes" / "diffusion" / "sd"
    rows = [time_recipe(folder / name, args.size, args.device, args.steps) for name in args.recipes]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"SD-shaped pipeline ({args.size}), {args.steps} timed steps per recipe on {device_name}")
    print(
        f"{'recipe':24s} {'prec':5s} {'batch':>5s} {'UNet M':>7s} {'edited M':>8s} {'steps/s':>8s} {'peak GiB':>9s}"
    )
    for r in rows:
        print(
            f"{r['recipe']:24s} {r['precision']:5s} {r['batch_size']:5d} {r['unet_parameters'] / 1e6:7.1f} "
            f"{r['edited_parameters'] / 1e6:8.1f} {r['steps_per_s'] or float('nan'):8.3f} {r['peak_gib']:9.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": device_name, "size": args.size, "steps": args.steps, "rows": rows}, indent=2)
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
