"""The distilled generator as a diffusers pipeline directory: export, load, and sample it.

The export is a StableDiffusionPipeline. A one-step generator's scheduler is an EulerDiscreteScheduler over the
teacher's betas truncated to t ≤ t_init with "trailing" spacing: with one inference step it starts from
σ(t_init)·z, feeds a·σ·z = s_{t_init}·z to the UNet at t = t_init and returns σ(z − ε̂) = x0, exactly the one-step
SiD generator (method.md §2), so `DiffusionPipeline.from_pretrained(dir)(prompt, num_inference_steps=1,
guidance_scale=1)` reproduces `sidflow generate`. A K-step generator re-noises with fresh noise between steps, which
no stock scheduler does: its export ships `multistep_scheduler.py` (loaded with trust_remote_code=True).
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from sidflow import storage
from sidflow.teacher import Teacher, load_teacher

INFO_FILE = "sidflow.json"


def _model_card(info: dict) -> str:
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(info["config"].items()))
    k = info["steps"]
    gan = "data" in info["config"]  # a finetune run: few-step SiD with the adversarial term on real pairs
    title = (f"{k}-step generator fine-tuned with sidflow (SiD with the adversarial term)" if gan else
             "One-step generator distilled with sidflow (SiD-LSG)" if k == 1 else
             f"{k}-step generator distilled with sidflow (SiD)")
    load = ('DiffusionPipeline.from_pretrained("<this directory>")' if k == 1 else
            'DiffusionPipeline.from_pretrained("<this directory>", trust_remote_code=True)')
    sampler = ("" if k == 1 else """
Its scheduler (`scheduler/multistep_scheduler.py`, loaded with `trust_remote_code=True`) samples as in training:
step j predicts x0 at t_j = floor(t_init·(K − j)/K) and re-noises it with fresh noise. Pass one
`torch.Generator` per image for images that depend on their own seed only, as `sidflow generate` draws them.
""")
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [sidflow, score-identity-distillation, {'one-step' if k == 1 else 'few-step'}]
---
# {title}

Teacher: `{info['teacher']}` (fingerprint `{info['teacher_fingerprint']}`).
Generator images seen: {info['nimg']} ({info['nimg'] / 1000:.3f} kimg); weights: {info['weights']}.

```python
from diffusers import DiffusionPipeline
pipe = {load}
image = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=1.0).images[0]
```
Guidance is distilled into the weights: always sample with `guidance_scale=1.0`.
{sampler}
## Training configuration
| parameter | value |
|---|---|
{rows}
"""


def generator_info(cfg, nimg: int, weights: str, metrics: dict) -> dict:
    """Return the sidflow.json of a generator trained under DistillConfig `cfg` for `nimg` images."""
    from sidflow.config import to_dict
    from sidflow.teacher import fingerprint

    return {"teacher": cfg.teacher, "teacher_fingerprint": fingerprint(cfg.teacher) or "unpublished", "nimg": nimg,
            "weights": weights, "steps": cfg.steps, "config": to_dict(cfg), "metrics": metrics}


def export_generator(unet: torch.nn.Module, teacher: Teacher, uri: str, info: dict) -> dict:
    """Publish the generator UNet with the teacher's VAE and text encoder as a pipeline at `uri`; return manifest."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    t_init = info["config"]["t_init"]
    betas = DDPMScheduler.from_config(teacher.scheduler_config).betas[: t_init + 1]
    if info["steps"] > 1:  # fresh noise at every step: no stock diffusers scheduler samples so
        from sidflow.multistep_scheduler import SiDMultistepScheduler

        scheduler = SiDMultistepScheduler(trained_betas=betas.tolist(), t_init=t_init, num_train_timesteps=t_init + 1)
    else:
        scheduler = EulerDiscreteScheduler(num_train_timesteps=t_init + 1, trained_betas=betas.tolist(),
                                           timestep_spacing="trailing", prediction_type="epsilon", steps_offset=1)
    if teacher.is_sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(unet=unet, vae=teacher.vae, text_encoder=teacher.text_encoder,
                                         text_encoder_2=teacher.text_encoder_2, tokenizer=teacher.tokenizer,
                                         tokenizer_2=teacher.tokenizer_2, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=teacher.null_zeros)
    else:
        pipe = StableDiffusionPipeline(unet=unet, vae=teacher.vae, text_encoder=teacher.text_encoder,
                                       tokenizer=teacher.tokenizer, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory(prefix="sidflow-export-") as tmp:
        pipe.save_pretrained(tmp)
        if info["steps"] > 1:
            _ship_scheduler(Path(tmp))
        (Path(tmp) / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        (Path(tmp) / "README.md").write_text(_model_card(info))
        return storage.publish_dir(tmp, uri)


def _ship_scheduler(root: Path) -> None:
    # The scheduler's source goes beside its config and model_index.json names that file, so diffusers loads it
    # from the directory (trust_remote_code=True) where sidflow is not installed.
    import shutil

    from sidflow import multistep_scheduler

    name = Path(multistep_scheduler.__file__).stem
    shutil.copyfile(multistep_scheduler.__file__, root / "scheduler" / f"{name}.py")
    index = json.loads((root / "model_index.json").read_text())
    index["scheduler"] = [name, multistep_scheduler.SiDMultistepScheduler.__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def describe(uri: str, card_path: str) -> dict:
    """Write the exported model's card to `card_path` (a KFP Model artifact's file) and return the metadata the
    artifact carries: the model's URI (the weights stay in the artifact store), its teacher and training length."""
    info = json.loads(storage.read_text(storage.join(uri, INFO_FILE)))
    Path(card_path).write_text(storage.read_text(storage.join(uri, "README.md")))
    return {"uri": uri, "teacher": info.get("teacher", ""), "teacher_fingerprint": info.get("teacher_fingerprint", ""),
            "kimg": info.get("nimg", 0) / 1000, "steps": info.get("steps", 1), "weights": info.get("weights", "")}


def load_generator(uri: str, device="cpu") -> tuple[Teacher, dict]:
    """Return (networks, info) of an exported generator; the schedule tables cover t ≤ t_init. A local directory is
    checked against its manifest first (a remote one is verified as it is fetched)."""
    if not storage.is_s3(uri):
        storage.verify_published(uri)
    gen = load_teacher(uri, device, generator=True)
    info = json.loads((Path(gen.path) / INFO_FILE).read_text())
    return gen, info


@torch.no_grad()
def sample(gen: Teacher, info: dict, prompts: list[str], seeds: list[int], batch: int = 8,
           steps: int | None = None) -> np.ndarray:
    """Return uint8 images [N, H, W, 3]; image i starts from z drawn with seed seeds[i] (method.md §2, §7.1).
    `steps`: sample with k steps at t_j = ⌊t_init (k − j)/k⌋, as the exported pipeline's num_inference_steps=k does;
    None = the K the generator was trained with."""
    from sidflow.evaluate.sampling import Sampler  # the one sampler: evaluate, generate and the benchmarks share it

    t_init = info["config"]["t_init"]
    if steps is not None and not 1 <= steps <= t_init:
        raise ValueError(f"steps={steps} must be between 1 and t_init={t_init} (the generator was trained with "
                         f"{info['config']['steps']})")
    run = Sampler(gen, steps or info["config"]["steps"], t_init)
    return np.concatenate([run(prompts[i : i + batch], seeds[i : i + batch]) for i in range(0, len(prompts), batch)])


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Return images [N, H, W, C] tiled row-major into one [rows·H, cols·W, C] image (cols ≈ √N by default)."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, im in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    return grid
