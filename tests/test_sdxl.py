"""Tier 2: SDXL teachers (two text towers, pooled and time-id conditioning) on a tiny SDXL model (method.md §6.4)."""

import numpy as np
import pytest
import torch

from sidflow.teacher import load_teacher, score_net
from sidflow.toy.tiny import build_sd, tiny_sdxl_configs


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("sdxl") / "teacher", tiny_sdxl_configs())


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_teacher):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_teacher)


def test_packed_conditioning_is_what_the_sdxl_pipeline_feeds_its_unet(sdxl_teacher, sdxl_pipe):
    teacher = load_teacher(sdxl_teacher)
    assert teacher.is_sdxl and teacher.null_zeros and teacher.image_size == 16
    prompts = ["a red cat on a mat", "two dogs"]
    c = teacher.encode(prompts)
    assert c.shape == (2, 78, 40)
    with torch.no_grad():
        ctx, neg, pooled, neg_pooled = sdxl_pipe.encode_prompt(prompts, device="cpu",
                                                               do_classifier_free_guidance=True)
    time_ids = sdxl_pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                           text_encoder_projection_dim=24)
    torch.testing.assert_close(c[:, :77], ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(c[:, 77, :24], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(c[:, 77, 24:30], time_ids.expand(2, -1))
    assert not c[:, 77, 30:].any()
    # ∅: the pipeline zeroes the negative prompt (force_zeros_for_empty_prompt) but keeps its time ids.
    null = teacher.null()
    assert not neg.any() and not neg_pooled.any() and not null[:, :77].any() and not null[:, 77, :24].any()
    torch.testing.assert_close(null[0, 77, 24:30], time_ids[0])
    # The UNet sees exactly the pipeline's inputs.
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([700, 30])
    with torch.no_grad():
        ours = score_net(teacher.unet)(x, t, c)
        theirs = teacher.unet(x, t, encoder_hidden_states=ctx,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_null_prompt_can_be_the_empty_string(sdxl_teacher):
    null = load_teacher(sdxl_teacher, null="empty").null()
    assert null[:, :77].abs().max() > 0.1  # the encoding of "", not zeros (the SiD code's choice, method.md §6.4)
    with pytest.raises(ValueError, match="null='none' is not one of"):
        load_teacher(sdxl_teacher, null="none")


def test_distill_sdxl_exports_a_pipeline_diffusers_samples_the_same(sdxl_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    from sidflow.generator import load_generator, sample
    from sidflow.stages.distill import DistillConfig, run

    (tmp_path / "p.txt").write_text("a red cat\na blue dog\nthe sun\n")
    result = run(DistillConfig(teacher=sdxl_teacher, prompts=str(tmp_path / "p.txt"), output=str(tmp_path / "run"),
                               batch=2, micro_batch=1, kimg=0.004, checkpoint_kimg=0.004, precision="fp32",
                               lr_g=1e-4, lr_fake=1e-4, ema_halflife_kimg=0.002, kappa=1.5))
    assert result.iterations == 2 and np.isfinite(result.metrics["loss_g"])
    gen, info = load_generator(result.model_uri)
    assert gen.is_sdxl
    ours = sample(gen, info, ["a red cat"], [7]).astype(np.float32) / 255
    pipe = DiffusionPipeline.from_pretrained(result.model_uri)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    z = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(7))[None]
    theirs = pipe("a red cat", num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="np").images
    assert np.abs(ours - theirs).max() <= 2 / 255
