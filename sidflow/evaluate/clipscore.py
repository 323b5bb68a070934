"""CLIP score as GigaGAN's `compute_clip_score` computes it (evaluation.md §0, §3).

OpenCLIP ViT-g-14 with the `laion2b_s12b_b42k` weights, in fp32 (GigaGAN calls `.float()`); image = the 256-px
crop + Lanczos image, through GigaGAN's tensor round trip, then OpenCLIP's preprocess (bicubic 224, center crop,
CLIP mean/std); text = "A photo depicts " inserted at token level after the start token, cut to 77 tokens with the
last one forced to the end token; score = plain cosine similarity (not ×100), averaged over images.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from sidflow import storage
from sidflow.evaluate.resize import gigagan_clip_roundtrip

PREFIX = "A photo depicts "  # arXiv 2104.08718, as GigaGAN
PREFIX_TOKENS = slice(1, 4)  # GigaGAN takes tokenize(PREFIX)[:, 1:4]: "a", "photo", "depicts"

Precision = Literal["fp32", "tf32", "fp16", "bf16"]


@dataclass
class Scorer:
    """A per-image text-image score: `prepare` runs per image on the CPU, `score` batched on `device`."""

    fingerprint: str
    prepare: Callable[[np.ndarray], torch.Tensor]
    score: Callable[[torch.Tensor, list[str]], torch.Tensor]
    device: torch.device
    # torch's fp32 matmul precision while scoring. It is process-wide state, so the evaluation loop holds it for its
    # whole length (the scorer runs beside the generator there): "high" (TF32) reaches the fp32 VAE's attention too.
    matmul_precision: str = "highest"

    @torch.no_grad()
    def __call__(self, prepared: list[torch.Tensor], captions: list[str]) -> np.ndarray:
        """Return float64 scores [B] of prepared images and their captions."""
        return self.score(torch.stack(prepared).to(self.device), captions).double().cpu().numpy()


def prefixed_tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    """Return token ids [B, 77]: SOT, "a photo depicts", the caption's tokens, cut to 77 with EOT last if full.

    GigaGAN: tokens = tokenize(captions, truncate=True); insert tokenize(PREFIX)[:, 1:4] after SOT; keep 77; set
    the 77th to EOT where it is not padding. Captions near the limit differ from tokenizing PREFIX + caption.
    """
    tokens = tokenizer(captions)  # [B, 77] SOT … EOT 0 …, already cut to 77 with EOT last
    prefix = tokenizer([PREFIX])[:, PREFIX_TOKENS].expand(tokens.shape[0], -1)  # [B, 3]
    length = tokens.shape[1]
    out = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)[:, :length]  # [B, 77]
    last = out[:, -1]
    out[:, -1] = torch.where(last > 0, torch.full_like(last, tokenizer.eot_token_id), last)
    return out


@contextlib.contextmanager
def matmul_precision(value: str):
    """Hold torch's fp32 matmul precision at `value` ("highest", "high" = TF32) inside the block."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def openclip_scorer(model, preprocess, tokenizer, fingerprint: str, device, precision: Precision = "fp32") -> Scorer:
    """Return the GigaGAN CLIP score of an OpenCLIP model (cosine of image and prefixed-text embeddings)."""
    device = torch.device(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    if device.type == "cpu":
        dtype, precision = torch.float32, "fp32"  # half precision on the CPU is slow and no faster here
    model = model.to(device, dtype).eval()
    # tf32: fp32 weights, TF32 tensor-core matmuls (DMD2's test scripts enable TF32); fp32: PyTorch's default
    # "highest", as GigaGAN ran.
    precision_of_matmuls = "high" if precision == "tf32" else "highest"

    def prepare(image: np.ndarray) -> torch.Tensor:  # uint8 [256, 256, 3] → float [3, 224, 224]
        from PIL import Image

        return preprocess(Image.fromarray(gigagan_clip_roundtrip(image)))

    def score(x: torch.Tensor, captions: list[str]) -> torch.Tensor:
        with matmul_precision(precision_of_matmuls):
            image = model.encode_image(x.to(dtype)).float()  # [B, E]
            text = model.encode_text(prefixed_tokens(tokenizer, captions).to(device)).float()  # [B, E]
        return torch.nn.functional.cosine_similarity(image, text, dim=1)  # [B]

    return Scorer(f"{fingerprint} {precision}", prepare, score, device, precision_of_matmuls)


def _is_uri(value: str) -> bool:
    return storage.is_s3(value) or value.startswith(("file://", "/", ".")) or os.path.exists(value)


def check_openclip(model_name: str, weights: str) -> None:
    """Raise a one-line error if the OpenCLIP model or its weights cannot be found (nothing is loaded)."""
    import open_clip

    if _is_uri(model_name):
        if not storage.exists(storage.join(model_name, "open_clip_config.json")):
            raise FileNotFoundError(f"clip_model={model_name!r} has no open_clip_config.json: not an open_clip "
                                    "directory (a copy of laion/CLIP-ViT-g-14-laion2B-s12B-b42K is one)")
        return
    if model_name not in open_clip.list_models():
        raise ValueError(f"clip_model={model_name!r} is not an OpenCLIP architecture nor a directory URI")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if weights not in tags and not storage.exists(weights):
        raise FileNotFoundError(f"clip_weights={weights!r} is neither a pretrained tag of {model_name} ({tags}) nor "
                                "a checkpoint file")
    if weights in tags and _offline() and not _cached(model_name, weights):
        raise FileNotFoundError(f"clip_weights={weights!r} is a pretrained tag, not in the Hugging Face cache, and "
                                "HF_HUB_OFFLINE forbids its download: stage it once with `sidflow data stage-weights` "
                                "and pass the URI it prints")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached(model_name: str, tag: str) -> bool:
    # Where open_clip's download_pretrained looks: the hf_hub entry of the tag's config, its .safetensors first.
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "")
    if not hub:
        return False  # a URL-only tag: open_clip downloads it to its own cache, which an air-gapped pod lacks
    repo, filename = hub.rstrip("/").rsplit("/", 1) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def load_openclip(model_name: str, weights: str, device, precision: Precision = "fp32") -> Scorer:
    """Return the CLIP scorer of an OpenCLIP architecture + weights (tag or file URI), or of an open_clip directory.

    `model_name` is an architecture (`ViT-g-14`) or the URI of a directory in open_clip's layout
    (open_clip_config.json + open_clip_pytorch_model.bin, as the Hugging Face repo
    laion/CLIP-ViT-g-14-laion2B-s12B-b42K holds). `weights` is a pretrained tag, read from the Hugging Face cache
    (set HF_HUB_OFFLINE=1 to forbid downloads), or the URI of a checkpoint file.
    """
    import open_clip

    from sidflow.evaluate.local import local_dir, local_file

    check_openclip(model_name, weights)
    if _is_uri(model_name):
        name = "local-dir:" + local_dir(model_name, "clip_model (open_clip_config.json + weights)")
        pretrained, fingerprint = None, f"openclip:{model_name}"
    else:
        name = model_name
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        pretrained = weights if weights in tags else local_file(weights, "clip_weights")
        fingerprint = f"openclip:{model_name}:{weights}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as e:
        if "Failed to download" in str(e):
            raise FileNotFoundError(f"clip_weights={weights!r} is not in the Hugging Face cache and cannot be "
                                    "downloaded: pass the URI of open_clip_pytorch_model.bin instead") from None
        raise
    return openclip_scorer(model, preprocess, open_clip.get_tokenizer(name), fingerprint, device, precision)
