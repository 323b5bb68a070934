"""Images for an evaluation: an exported generator's own sampler, or a teacher with N-step DDIM / DPM-Solver + CFG.

Image i starts from z drawn on the CPU with seed i, as `sidflow generate` and the toy teacher sampler draw it, so
an image does not depend on its batch, its shard or the GPU count. The UNet runs under autocast in `unet_dtype`;
the VAE decodes in `vae_dtype`, by default the precision it needs (`vae_auto_dtype`), through torch.compile on a GPU:
decode is most of an evaluation's GPU time, and compiled it runs 1.7x (fp32) to 2x (fp16) faster
(benchmarks/results/vae_decode_h100.json: 4–6% of the pixels move by one level, from the fused kernels' rounding).
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sidflow import storage

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TeacherSampler = Literal["ddim", "dpm_solver"]


def vae_auto_dtype(nets) -> str:
    """Return the precision a teacher's VAE decodes in on a GPU: fp16, as SD pipelines and SiD-LSG's own generation
    decode SD1.5/2.1 images, except fp32 for an SDXL VAE that asks for it (`force_upcast`: it overflows in fp16;
    the fp16-fix VAE sets it false)."""
    return "fp32" if nets.is_sdxl and nets.vae.config.get("force_upcast", True) else "fp16"


def teacher_scheduler(scheduler_config: dict, sampler: TeacherSampler, steps: int):
    """Return a diffusers scheduler set to `steps`: DDIM (η = 0, the toy benchmarks' teacher rows) or DPM-Solver++."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":  # η = 0, trailing spacing, no x0 clipping
        sched = DDIMScheduler.from_config({**scheduler_config, "clip_sample": False, "set_alpha_to_one": False,
                                           "timestep_spacing": "trailing"})
    else:  # diffusers' default DPM-Solver++(2M) on the teacher's own schedule, as SD pipelines swap it in
        sched = DPMSolverMultistepScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return sched


@dataclass
class Sampler:
    """Turns captions and seeds into uint8 images [B, H, W, 3] on the CPU."""

    nets: object  # sidflow.teacher.Teacher: an exported generator loads as one too
    steps: int  # generator steps K, or teacher sampler steps
    t_init: int | None  # generator start time; None for a teacher
    teacher_sampler: TeacherSampler | None = None
    kappa: float = 1.0  # CFG scale of the teacher sampler
    unet_dtype: str = "fp32"
    vae_dtype: str = "fp32"
    decode_batch: int | None = None  # set by compile_decode: shorter batches are padded to it

    @property
    def device(self) -> torch.device:
        return next(self.nets.unet.parameters()).device

    def noise(self, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Return z [B, C, h, w], row i drawn on the CPU from seed seeds[i], and each row's generator, which then
        draws that row's fresh noise of steps k > 0 (as a diffusers pipeline given one generator per image does)."""
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([torch.randn(self.nets.latent_shape, generator=g) for g in gens]).to(self.device), gens

    @torch.no_grad()
    def latents(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        """Return float32 latents [B, C, h, w] for the captions."""
        from sidflow.method.guidance import guided_eps
        from sidflow.method.sid import generate
        from sidflow.method.vp import VP
        from sidflow.teacher import score_net

        nets, device = self.nets, self.device
        (z, gens), c = self.noise(seeds), nets.encode(captions).to(device)  # [B, C, h, w], [B, 77, D]
        net = score_net(nets.unet)  # ε̂ in fp32
        with torch.autocast(device.type, DTYPES[self.unet_dtype], enabled=self.unet_dtype != "fp32"):
            if self.t_init is not None:  # the generator (method.md §2); step k > 0 re-noises from the row's seed
                return generate(net, z, c, VP(nets.a, nets.s).to(device), t_init=self.t_init, K=self.steps,
                                generator=gens).float()
            sched = teacher_scheduler(nets.scheduler_config, self.teacher_sampler, self.steps)  # fresh state
            null, x = nets.null().to(device), z * sched.init_noise_sigma
            for t in sched.timesteps:
                tt = torch.full((len(x),), int(t), device=device)
                x = sched.step(guided_eps(net, x, tt, c, null, kappa=self.kappa), t, x).prev_sample
            return x.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Return uint8 images [B, H, W, 3] of latents, decoded in vae_dtype."""
        vae, n = self.nets.vae, len(latents)
        if self.decode_batch and n < self.decode_batch:  # one compiled graph: pad the short last batch, no recompile
            latents = torch.cat([latents, latents[-1:].expand(self.decode_batch - n, *latents.shape[1:])])
        with torch.autocast(latents.device.type, enabled=False):
            images = vae.decode((latents / self.nets.vae_scale).to(vae.dtype)).sample[:n].float()  # [B, 3, H, W]
        return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def __call__(self, captions: list[str], seeds: list[int]) -> np.ndarray:
        return self.decode(self.latents(captions, seeds))


def set_precision(sampler: Sampler, unet_dtype: str, vae_dtype: str) -> None:
    """Cast the sampler's UNet and VAE weights in place (UNet NHWC on the GPU) and record the dtypes."""
    sampler.unet_dtype, sampler.vae_dtype = unet_dtype, vae_dtype
    nets = sampler.nets
    nets.unet.to(DTYPES[unet_dtype])
    nets.vae.to(DTYPES[vae_dtype])
    if sampler.device.type == "cuda":  # NHWC convolutions run on the tensor cores without layout transposes
        nets.unet.to(memory_format=torch.channels_last)
        # The VAE stays NCHW: its 512² GroupNorm layers dominate; compiled, NHWC gains nothing (80.1 img/s either
        # way in fp32, benchmarks/results/vae_decode_h100.json), and eager it is slower (`eval_throughput.py
        # --vae-sweep`).


def compile_decode(sampler: Sampler, batch: int) -> None:
    """torch.compile the sampler's VAE decode for batches of `batch` (shorter ones are padded to it).

    The first call compiles (16–29 s on an H100 for the SD VAE at 512², eval_throughput_h100*.json); a row's image
    does not depend on the padding, since the decoder treats every image of a batch alone.
    """
    vae = sampler.nets.vae
    vae.decode = torch.compile(vae.decode)
    sampler.decode_batch = batch


def model_fingerprint(uri: str) -> str:
    """sha256 over the model directory's files: its manifest's digest, or one built by hashing a local directory."""
    manifest = storage.read_manifest(uri) or storage.build_manifest(storage.local_path(uri))
    return "sha256:" + storage.manifest_digest(manifest)
