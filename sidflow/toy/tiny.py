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


def build_sd(path: str | os.PathLike, configs: dict, seed: int = 0) -> str:
    """Build an SD1.5-layout pipeline with random weights from `configs` and save it at `path`; return path."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
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
