"""Tiny StableDiffusionPipeline-layout teachers built from small configs with fixed seeds.

Tests and the smoke benchmarks use these instead of hub downloads: same classes, same file layout
(unet/, text_encoder/, tokenizer/, scheduler/, vae/, model_index.json), a few hundred kB of weights.
"""

import json
import os
from pathlib import Path

import torch


# Byte-level alphabet of CLIP's BPE (GPT-2's bytes_to_unicode): every byte maps to one printable character.
def _byte_alphabet() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def write_char_tokenizer(path: str | os.PathLike, words: tuple[str, ...] = ()) -> None:
    """Write a CLIPTokenizer vocab (characters, plus whole `words` as merges) to `path`, loadable offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in words:  # merge each word left to right into one token, so known words are single tokens
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            right = ch + "</w>" if last else ch
            merges.append(f"{piece} {right}")
            piece = piece + right
            if piece not in tokens:
                tokens.append(piece)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in dict.fromkeys(merges)))


# Published architecture configs (no weights): SD1.5's UNet, CLIP ViT-L/14 text tower and VAE (method.md §1, §5).
SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu"),
}


# SDXL-base's published configs: UNet (≈ 2.6 B parameters), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers, and
# the SDXL VAE (method.md §6.4). The VAE is SD's architecture with SDXL's scale.
SDXL = {
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    "vae": {**SD15["vae"], "sample_size": 1024, "scaling_factor": 0.13025},
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu"),
    "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
}


def tiny_configs(sample_size: int = 16, cross_dim: int = 32) -> dict:
    """Return configs of a tiny SD-layout teacher: images sample_size², latents half that."""
    return {
        "unet": dict(sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                     attention_head_dim=8, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=8, sample_size=sample_size, scaling_factor=0.18215),
        "text": dict(hidden_size=cross_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77),
    }


def tiny_sdxl_configs(sample_size: int = 16) -> dict:
    """Return configs of a tiny SDXL-layout teacher: two text towers (16 + 24 wide), pooled 24, text_time UNet."""
    base = tiny_configs(sample_size, cross_dim=16)
    return {**base,
            "unet": {**base["unet"], "cross_attention_dim": 40, "addition_embed_type": "text_time",
                     "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24 + 6 * 8},
            "text_2": {**base["text"], "hidden_size": 24, "projection_dim": 24, "num_attention_heads": 4}}


def build_sd(path: str | os.PathLike, configs: dict, seed: int = 0, device: str = "cpu") -> str:
    """Build an SD1.5-layout pipeline (SDXL-layout when configs has "text_2") with random weights from `configs`
    and save it at `path`; return path."""
    path = Path(path)
    torch.manual_seed(seed)
    with torch.device(device):  # SD-sized random weights initialise in seconds on a GPU, minutes on a CPU
        return _build_sd(path, configs)


def _build_sd(path: Path, configs: dict) -> str:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    write_char_tokenizer(path / "_tok")
    tokenizer = CLIPTokenizer(str(path / "_tok" / "vocab.json"), str(path / "_tok" / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **configs["text"]))
    # SD1.5's schedule: scaled_linear 0.00085..0.012, T = 1000, ε-prediction, no x0 clipping (method.md §1).
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, steps_offset=1)
    if "text_2" in configs:  # SDXL: a second tower with a pooled projection; SDXL's schedule is SD's
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **configs["text_2"]))
        pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(path)
    for f in (path / "_tok").iterdir():
        f.unlink()
    (path / "_tok").rmdir()
    return str(path)


def build_tiny_sd(path: str | os.PathLike, seed: int = 0, sample_size: int = 16, cross_dim: int = 32) -> str:
    """Build and save a tiny SD1.5-layout pipeline at `path` (a few hundred kB of random weights); return path."""
    return build_sd(path, tiny_configs(sample_size, cross_dim), seed)
