"""`sidflow toy train-teacher`: train a small text-to-image teacher in the SD1.5 layout from a text-image parquet.

VAE (32² → 4×16×16), a small CLIP text tower with a word-level tokenizer, and a UNet2DConditionModel trained
with the SD1.5 ε-prediction DDPM loss on the same scaled_linear schedule, 10% caption dropout to "" for CFG.
The result loads with `sidflow.teacher.load_teacher` like any SD1.5 teacher.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sidflow.config import param
from sidflow.method.vp import add_noise, at, vp_tables


@dataclass(frozen=True)
class ToyTeacherConfig:
    data: str = param("", "text-image parquet URI (columns `image`: PNG/JPEG bytes, `caption`)", required=True)
    output: str = param("", "directory the diffusers pipeline is written to", required=True)
    vae_steps: int = param(3000, "VAE training steps")
    unet_steps: int = param(30000, "UNet + text encoder training steps")
    minutes: float = param(8.0, "stop UNet training after this many minutes even if steps remain")
    batch: int = param(256, "images per step")
    lr: float = param(3e-4, "AdamW learning rate, cosine-decayed to 0 over unet_steps or minutes, whichever ends first")
    caption_dropout: float = param(0.1, "probability of training on the empty caption (enables CFG)")
    channels: str = param("32,64,128", "UNet block widths (the last block has no cross-attention)")
    layers_per_block: int = param(1, "resnet layers per UNet block")
    ema: float = param(0.999, "EMA decay of the UNet weights that are saved")
    compile: bool = param(False, "torch.compile the UNet step (GPU: fewer kernel launches, minutes of compile time)")
    seed: int = param(0, "random seed")


def _vae(sample_size: int):  # 32² RGB → 4×16×16
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=sample_size)


def _unet(latent_size: int, channels: tuple[int, ...], layers: int, cross_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=32)


def train_teacher(cfg: ToyTeacherConfig, device=None, log=print) -> dict:
    """Train VAE, text encoder and UNet on cfg.data; save the pipeline to cfg.output; return training metrics."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sidflow.toy.shapes import read_parquet, vocabulary
    from sidflow.toy.tiny import write_char_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    images, captions = read_parquet(cfg.data)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)  # [N, 3, H, W]
    n, size = len(x_all), x_all.shape[-1]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    g = torch.Generator(device).manual_seed(cfg.seed)
    start, metrics = time.time(), {"images": n}

    # VAE: reconstruction + a tiny KL, as SD's VAE is trained (no GAN term at this size).
    vae = _vae(size).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(cfg.vae_steps):
        x = x_all[torch.randint(n, (cfg.batch,), generator=g, device=device)]
        with autocast:
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample
        loss = nn.functional.mse_loss(recon.float(), x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == cfg.vae_steps - 1:
            log(f"vae {step}: {loss.item():.5f}")
    metrics["vae_loss"] = loss.item()
    vae.requires_grad_(False).eval()
    with torch.no_grad(), autocast:
        latents = torch.cat([vae.encode(x_all[i : i + 1024]).latent_dist.mean.float() for i in range(0, n, 1024)])
    scale = float(1 / latents.std())  # SD's scaling_factor: unit-variance latents
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    # Text tower with one token per caption word.
    tok_dir = Path(cfg.output) / "_tok"
    write_char_tokenizer(tok_dir, vocabulary())
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    cross_dim = 128
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_dim, intermediate_size=4 * cross_dim, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).to(device)
    uniq = sorted(set(captions)) + [""]
    ids = tokenizer(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ids.to(device)
    cap_index = torch.tensor([uniq.index(c) for c in captions], device=device)

    # UNet: ε-prediction on the SD1.5 schedule (method.md §1), captions dropped to "" with p = caption_dropout.
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, steps_offset=1)
    a, s = (v.to(device) for v in vp_tables(scheduler.alphas_cumprod))
    widths = tuple(int(c) for c in cfg.channels.split(","))
    unet = _unet(latents.shape[-1], widths, cfg.layers_per_block, cross_dim).to(device)
    ema = _unet(latents.shape[-1], widths, cfg.layers_per_block, cross_dim).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    model = torch.compile(unet) if cfg.compile else unet
    unet_start, step = time.time(), 0
    for step in range(cfg.unet_steps + 1):
        # Cosine decay over whichever budget ends first, so a run cut by `minutes` still anneals to 0.
        done = max(step / cfg.unet_steps, (time.time() - unet_start) / (cfg.minutes * 60))
        if done >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
        i = torch.randint(n, (cfg.batch,), generator=g, device=device)
        cap = torch.where(torch.rand(cfg.batch, generator=g, device=device) < cfg.caption_dropout,
                          len(uniq) - 1, cap_index[i])
        x0 = latents[i]
        t = torch.randint(0, 1000, (cfg.batch,), generator=g, device=device)
        eps = torch.randn(x0.shape, generator=g, device=device)
        x_t = add_noise(x0, eps, at(a, t, x0), at(s, t, x0))
        with autocast:
            emb = text_encoder(ids[cap])[0]
            loss = nn.functional.mse_loss(model(x_t, t, encoder_hidden_states=emb).sample.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - cfg.ema)
        if step % 1000 == 0:
            log(f"unet {step}: {loss.item():.4f} ({time.time() - unet_start:.0f} s)")
    metrics.update(unet_loss=loss.item(), unet_steps=step, minutes=(time.time() - start) / 60)

    pipe = StableDiffusionPipeline(unet=ema.cpu(), vae=vae.cpu(), text_encoder=text_encoder.cpu().eval(),
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(cfg.output)  # fp16 on disk keeps the bundled teacher a few MB
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    (Path(cfg.output) / "training.json").write_text(json.dumps({"config": cfg.__dict__, "metrics": metrics}, indent=2))
    return metrics


def sample_teacher(teacher, prompts: list[str], seeds: list[int], steps: int, kappa: float,
                   batch: int = 256) -> np.ndarray:
    """Return uint8 images [N, H, W, 3] from the teacher with DDIM (η = 0) and CFG on ε, image i from seed i."""
    from sidflow.evaluate.sampling import Sampler

    run = Sampler(teacher, steps, None, "ddim", kappa)
    return np.concatenate([run(prompts[i : i + batch], seeds[i : i + batch]) for i in range(0, len(prompts), batch)])
