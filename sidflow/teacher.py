"""Load a diffusers text-to-image teacher and expose what SiD needs from it (method.md §1, §3).

A teacher is a StableDiffusionPipeline-layout directory (unet/, text_encoder/, tokenizer/, scheduler/, vae/,
model_index.json), local or at a storage URI. The schedule is rebuilt as DDPM with `clip_sample` off, since a
bare DDPM config defaults to clipping x0 into [-1, 1], which is wrong for latents (method.md §8.9).
"""

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sidflow import storage
from sidflow.method.guidance import ScoreNet
from sidflow.method.vp import at, vp_tables, x0_from_eps

INFO_FILE = "sidflow-teacher.json"  # {"source", "fingerprint"} of a hub teacher, published inside the directory
SD_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
SDXL_MARKERS = ("text_encoder_2", "tokenizer_2")


class TeacherError(ValueError):
    """A teacher directory that sidflow cannot use; the message is one line naming the problem."""


def check_teacher_dir(path: str | os.PathLike) -> dict:
    """Return the teacher's scheduler config after checking layout and model type; raise TeacherError if unusable."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"teacher directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise TeacherError(f"teacher {path} has no model_index.json: not a diffusers pipeline directory")
    index = json.loads((path / "model_index.json").read_text())
    if any(m in index for m in SDXL_MARKERS) or "XL" in index.get("_class_name", ""):
        raise TeacherError(f"teacher {path} is an SDXL pipeline (two text encoders): SDXL is not yet supported")
    missing = [p for p in SD_PARTS if not (path / p).is_dir() or not any((path / p).iterdir())]
    if missing:
        raise TeacherError(f"teacher {path} is missing {', '.join(missing)}")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise TeacherError(f"teacher {path} has no scheduler/scheduler_config.json")
    sched = json.loads(sched_file.read_text())
    prediction = sched.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise TeacherError(f"teacher {path} predicts {prediction!r}; sidflow distills ε-prediction DDPM teachers only")
    if "beta_schedule" not in sched and sched.get("trained_betas") is None:
        raise TeacherError(f"teacher {path} scheduler {sched.get('_class_name')} has no DDPM beta schedule")
    if sched.get("rescale_betas_zero_snr"):
        raise TeacherError(f"teacher {path} uses a zero-terminal-SNR schedule; sidflow supports the plain VP schedule")
    return sched


def fingerprint(uri: str) -> str | None:
    """Return the fingerprint of the teacher published at `uri` (hub commit or content digest), None if absent."""
    manifest = storage.read_manifest(uri)
    if manifest is None:
        return None
    if any(f["path"] == INFO_FILE for f in manifest["files"]):
        return json.loads(storage.read_text(storage.join(uri, INFO_FILE)))["fingerprint"]
    return "sha256:" + storage.manifest_digest(manifest)


def materialize(uri: str, cache_dir: str | None = None) -> str:
    """Return a local directory holding the published teacher at `uri` (fetched and verified if remote)."""
    if not storage.is_s3(uri):
        return storage.local_path(uri)
    manifest = storage.read_manifest(uri)
    if manifest is None:
        raise TeacherError(f"teacher {uri} has no manifest.json: publish it with `sidflow download-teacher`")
    root = Path(cache_dir) if cache_dir else storage.cache_root()
    return storage.fetch_dir_once(uri, root / "teachers" / storage.manifest_digest(manifest)[:16])


@dataclass
class Teacher:
    """The frozen teacher: networks, the VP tables (a_t, s_t), the null embedding and a prompt-embedding cache."""

    path: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    scheduler_config: dict
    alphas_cumprod: Tensor
    a: Tensor  # [T] a_t = sqrt(alpha_bar_t)
    s: Tensor  # [T] s_t = sqrt(1 - alpha_bar_t)
    cache_size: int = 4096
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def vae_scale(self) -> float:
        """The VAE latent scaling factor (0.18215 for SD1.5, 0.13025 for SDXL)."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of the UNet's latents."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Return CLIP last-hidden-state embeddings [B, 77, D] (method.md §2), cached per prompt on the CPU."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            ids = self.tokenizer(todo, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            device = next(self.text_encoder.parameters()).device
            emb = self.text_encoder(ids.to(device))[0].float().cpu()
            for p, e in zip(todo, emb):
                self._cache[p] = e
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def null(self) -> Tensor:
        """Return the embedding of the empty prompt `""` [1, 77, D] (not a zero tensor, method.md §3)."""
        return self.encode([""])

    def x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Return the x0 prediction for ε̂ at (x_t, t), no clipping. method.md §1."""
        return x0_from_eps(x_t, eps, at(self.a, t, x_t), at(self.s, t, x_t))


def score_net(unet: torch.nn.Module) -> ScoreNet:
    """Return net(x_t, t, c) -> ε̂ in fp32 for a UNet2DConditionModel (SD1.5/2.1 conditioning)."""

    def net(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return unet(x_t, t, encoder_hidden_states=c.to(x_t.device)).sample.float()

    return net


def load_teacher(uri: str, device: str | torch.device = "cpu", cache_dir: str | None = None) -> Teacher:
    """Load the teacher at `uri` (local path, file:// or s3://) in fp32, frozen, on `device`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = materialize(uri, cache_dir)
    sched_cfg = check_teacher_dir(path)
    scheduler = DDPMScheduler.from_config({**sched_cfg, "clip_sample": False})
    fp32 = {"torch_dtype": torch.float32}  # fp16-saved weights too: training keeps fp32 master copies
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **fp32).to(device)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **fp32).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **fp32).to(device)
    for m in (unet, text_encoder, vae):
        m.requires_grad_(False).eval()
    a, s = vp_tables(scheduler.alphas_cumprod)
    return Teacher(path=path, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                   scheduler_config=dict(scheduler.config), alphas_cumprod=scheduler.alphas_cumprod, a=a, s=s)
