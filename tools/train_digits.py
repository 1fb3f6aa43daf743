"""Train a bundled model on scikit-learn's digits: `digits` (a class-conditional DDPM, diffusers UNet2DModel) or
`digits-dit` (a class-conditional DiT with adaLN-Zero, diffusers DiTTransformer2DModel).

    python -m dilatequant.tools.train_digits --out DIR [--arch digits|digits-dit] [--steps 12000] [--device cuda]

Seeded; runs on CUDA (bf16 autocast) or CPU. Writes DIR/config.json + diffusion_pytorch_model.safetensors
(EMA weights, fp16), DIR/scheduler/scheduler_config.json and DIR/training.json (recipe and what was reached).
`--max-minutes` only guards a time-limited machine: training.json records the steps actually taken, and
`--steps` with that number reproduces the run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dilatequant.core.digits_data import IMAGE_SIZE, NUM_CLASSES, load_digits_images

# Attention at 16x16 and 8x8 (and the 8x8 mid block) so Conv, Gemm, MatMul and Softmax paths all exist.
UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,
    "norm_num_groups": 16,
    "num_class_embeds": NUM_CLASSES,
}
# DiT-S-like blocks at width 256 (4 heads of 64): every Linear width (256, 1024) splits into groups of 32, 64 and
# 128 for Q-DiT's search; patch 2 gives 256 tokens; 8 blocks keep the fp16 weights near 20 MB and CPU sampling
# affordable. It predicts eps only (no learned variance).
DIT_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "num_layers": 8,
    "num_embeds_ada_norm": NUM_CLASSES,
}
# --arch -> (diffusers class, its config)
ARCHITECTURES = {"digits": ("UNet2DModel", UNET_CONFIG), "digits-dit": ("DiTTransformer2DModel", DIT_CONFIG)}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "timestep_spacing": "trailing",
}


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, steps: int, batch: int, lr: float, ema_decay: float, seed: int, device: str, max_minutes: float,
          arch: str = "digits") -> dict:  # fmt: skip
    import diffusers
    from diffusers import DDPMScheduler

    from dilatequant.core.families import family_of_class

    class_name, config = ARCHITECTURES[arch]
    call = family_of_class(class_name).call

    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    images, labels = (t.to(device) for t in load_digits_images())
    model = getattr(diffusers, class_name)(**config).to(device).train()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    start, losses, step = time.monotonic(), [], 0
    for step in (bar := tqdm(range(steps), desc=f"train {arch}", mininterval=5)):
        if (time.monotonic() - start) / 60 > max_minutes:
            break
        idx = torch.randint(0, len(labels), (batch,), device=device, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device, generator=generator)
        noise = torch.randn(images[idx].shape, device=device, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * images[idx] + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, 500, steps)
        with autocast:
            prediction = call(model, noisy, t, labels[idx])
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update_parameters(model)
        if step % 50 == 0:
            losses.append(loss.item())
        if step % 500 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    else:
        step = steps
    seconds = time.monotonic() - start
    final = ema.module.to("cpu", torch.float16).eval()
    write_model(out, final, scheduler, {
        "arch": arch, "class_name": class_name, "model_config": config, "scheduler_config": SCHEDULER_CONFIG, "steps_requested": steps,
        "steps_taken": step, "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": seed, "device": device_name(device),
        "seconds": round(seconds, 1), "loss_last_1000_steps": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "torch": torch.__version__,
    })
    return {"steps_taken": step, "seconds": seconds}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def write_model(out: Path, model, scheduler, record: dict) -> None:
    """Write into a temporary sibling and rename, so an interrupted run leaves no half-written model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="digits", show_default=True)
@click.option("--steps", default=12000, show_default=True)
@click.option("--batch", default=256, show_default=True)
@click.option("--lr", default=4e-4, show_default=True)
@click.option("--ema-decay", default=0.999, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--max-minutes", default=float("inf"), help="Stop early (and record it) on a time-limited machine.")
def main(out: Path, arch: str, steps: int, batch: int, lr: float, ema_decay: float, seed: int, device: str, max_minutes: float) -> None:
    result = train(out, steps, batch, lr, ema_decay, seed, device, max_minutes, arch)
    click.echo(f"trained {result['steps_taken']} steps in {result['seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
