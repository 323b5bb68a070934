"""sidflow.teacher on the tiny SD1.5-layout teacher: schedule, text encoding, ε/x0 algebra, S3 loading, bad dirs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sidflow import storage
from sidflow.method.guidance import cfg, guided_eps
from sidflow.method.vp import add_noise, at, eps_from_x0, x0_from_eps
from sidflow.teacher import TeacherError, check_teacher_dir, fingerprint, load_teacher, materialize, score_net


def copy_teacher(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


@pytest.fixture
def teacher(tiny_teacher):
    """A freshly loaded tiny teacher (its own, empty prompt cache)."""
    return load_teacher(tiny_teacher)


# Schedule -------------------------------------------------------------------------------------------------------


def test_tables_match_ddpm_scheduler_and_method_md(teacher):
    from diffusers import DDPMScheduler

    # Independent reference 1: diffusers' own SD1.5 scheduler (scaled_linear 0.00085..0.012, T = 1000).
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    torch.testing.assert_close(teacher.alphas_cumprod.double(), ref.alphas_cumprod.double(), rtol=0, atol=1e-7)
    torch.testing.assert_close(teacher.a.double(), ref.alphas_cumprod.double().sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.s.double(), (1 - ref.alphas_cumprod.double()).sqrt(), rtol=0, atol=1e-6)
    # Independent reference 2: the closed form in numpy (betas linear in sqrt space).
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(teacher.a.numpy() ** 2, np.cumprod(1 - betas), rtol=0, atol=1e-6)
    assert teacher.a.shape == teacher.s.shape == (1000,)
    torch.testing.assert_close(teacher.a**2 + teacher.s**2, torch.ones(1000), rtol=0, atol=1e-6)
    # method.md §1 [calc]: ᾱ625 = 0.13777, a625 = 0.3712, s625 = 0.9286.
    assert float(teacher.a[625]) == pytest.approx(0.3712, abs=1e-4)
    assert float(teacher.s[625]) == pytest.approx(0.9286, abs=1e-4)
    assert float(teacher.alphas_cumprod[625]) == pytest.approx(0.13777, abs=1e-5)


def test_teacher_properties(teacher):
    assert teacher.vae_scale == pytest.approx(0.18215)  # build_tiny_sd's VAE scaling_factor (SD1.5's)
    assert teacher.latent_shape == (4, 8, 8)  # build_tiny_sd: 16² images, latents half that
    assert teacher.scheduler_config["prediction_type"] == "epsilon"
    assert not any(p.requires_grad for m in (teacher.unet, teacher.text_encoder, teacher.vae) for p in m.parameters())
    assert not teacher.unet.training and not teacher.text_encoder.training and not teacher.vae.training


def test_clip_sample_forced_off(tiny_teacher, tmp_path):
    path = copy_teacher(tiny_teacher, tmp_path / "t")
    edit_json(path / "scheduler" / "scheduler_config.json", clip_sample=True)
    assert check_teacher_dir(path)["clip_sample"] is True  # the file on disk really says true
    t = load_teacher(str(path))
    assert t.scheduler_config["clip_sample"] is False
    # x0 is never clipped into [-1, 1]: a far-out x_t gives a far-out x0 (method.md §8.3).
    x_t, eps, ts = torch.full((1, 4, 8, 8), 5.0), torch.zeros(1, 4, 8, 8), torch.tensor([625])
    assert float(t.x0(eps, x_t, ts).max()) == pytest.approx(5.0 / 0.3712, rel=1e-3)


def test_x0_matches_ddpm_step(teacher):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(teacher.scheduler_config)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ts = torch.tensor([20, 625, 979])
    mine = teacher.x0(eps, x_t, ts)
    for i, t in enumerate(ts.tolist()):
        ref = sched.step(eps[i : i + 1], t, x_t[i : i + 1]).pred_original_sample
        torch.testing.assert_close(mine[i : i + 1], ref, rtol=1e-5, atol=1e-5)


# Text encoding --------------------------------------------------------------------------------------------------


@pytest.fixture
def encoder_calls(teacher, monkeypatch):
    """Batch sizes of every text_encoder forward (an observer wrapped around the real forward)."""
    calls = []
    forward = teacher.text_encoder.forward

    def counting(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(teacher.text_encoder, "forward", counting)
    return calls


def test_encode_shape_and_values(teacher, encoder_calls, tiny_teacher):
    prompts = ["a cat", "a red dog", "a cat"]
    emb = teacher.encode(prompts)
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32  # D = build_tiny_sd's cross_dim
    assert encoder_calls == [2]  # one forward over the distinct prompts
    torch.testing.assert_close(emb[0], emb[2], rtol=0, atol=0)
    assert not torch.allclose(emb[0], emb[1])
    # Independent value: a second load's text encoder run directly on 77 padded tokens.
    other = load_teacher(tiny_teacher)
    ids = other.tokenizer(["a red dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = other.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(emb[1:2], direct, rtol=1e-5, atol=1e-5)


def test_encode_cache_hit_skips_encoder(teacher, encoder_calls):
    first = teacher.encode(["a cat", "a dog"])
    assert encoder_calls == [2]
    again = teacher.encode(["a dog", "a cat"])
    assert encoder_calls == [2]  # cache hit: no second forward
    torch.testing.assert_close(again, first.flip(0), rtol=0, atol=0)
    teacher.encode(["a dog", "a bird"])
    assert encoder_calls == [2, 1]  # only the new prompt is encoded


def test_encode_cache_evicts_least_recently_used(teacher, encoder_calls):
    teacher.cache_size = 2
    a = teacher.encode(["a"])
    teacher.encode(["b"])
    teacher.encode(["a"])  # hit: "a" becomes the most recent, so "b" is the one evicted next
    teacher.encode(["c"])
    assert encoder_calls == [1, 1, 1]
    assert len(teacher._cache) == 2
    torch.testing.assert_close(teacher.encode(["a"]), a, rtol=0, atol=0)
    assert encoder_calls == [1, 1, 1]  # "a" survived
    teacher.encode(["b"])
    assert encoder_calls == [1, 1, 1, 1]  # "b" had been evicted and is encoded again
    assert len(teacher._cache) == 2


def test_null_is_empty_prompt_not_zeros(teacher, tiny_teacher):
    null = teacher.null()
    assert null.shape == (1, 77, 32)
    assert null.abs().max() > 0.1  # the CLIP encoding of "", not a zero tensor (method.md §3)
    other = load_teacher(tiny_teacher)  # a separate cache: equality is not just the same cached tensor
    torch.testing.assert_close(null, other.encode([""]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(null, teacher.encode(["a cat"]))


# ε / x0 algebra and CFG -----------------------------------------------------------------------------------------


def test_x0_eps_roundtrip(teacher):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 4, 8, 8, generator=g)
    eps = torch.randn(16, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    a_t, s_t = at(teacher.a, t, x0), at(teacher.s, t, x0)
    assert a_t.shape == (16, 1, 1, 1)
    x_t = add_noise(x0, eps, a_t, s_t)
    torch.testing.assert_close(x_t, teacher.a[t].view(-1, 1, 1, 1) * x0 + teacher.s[t].view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(x0_from_eps(x_t, eps, a_t, s_t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher.x0(eps, x_t, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_from_x0(x_t, x0, a_t, s_t), eps, rtol=1e-5, atol=1e-5)


def test_x0_eps_roundtrip_float64_exact(teacher):
    # In float64 the identity holds to 1e-5 even at t = 999, where 1/a_t ≈ 14.6 amplifies rounding.
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(8, 4, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    t = torch.tensor([0, 1, 20, 500, 625, 979, 998, 999])
    a_t, s_t = at(teacher.a.double(), t, x0), at(teacher.s.double(), t, x0)
    x_t = add_noise(x0, eps, a_t, s_t)
    torch.testing.assert_close(x0_from_eps(x_t, eps, a_t, s_t), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_from_x0(x_t, x0, a_t, s_t), eps, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def shared_teacher(tiny_teacher):
    """One loaded teacher for the read-only UNet tests (a new module instance pays CPU warm-up on first forward)."""
    return load_teacher(tiny_teacher)


@pytest.fixture
def unet_inputs(shared_teacher):
    teacher = shared_teacher
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([625, 100])
    c = teacher.encode(["a cat", "a red dog"])
    return x_t, t, c, teacher.null()


@pytest.mark.parametrize("kappa", [0.0, 1.0, 1.5, 3.0])
def test_cfg_on_eps_equals_cfg_on_x0(shared_teacher, unet_inputs, kappa):
    teacher = shared_teacher
    x_t, t, c, null = unet_inputs
    net = score_net(teacher.unet)
    with torch.no_grad():
        eps_k = guided_eps(net, x_t, t, c, null, kappa=kappa)
        eps_c = teacher.unet(x_t, t, encoder_hidden_states=c).sample
        eps_n = teacher.unet(x_t, t, encoder_hidden_states=null.expand(2, -1, -1)).sample
    x0_c, x0_n = teacher.x0(eps_c, x_t, t), teacher.x0(eps_n, x_t, t)
    assert (x0_c - x0_n).abs().max() > 1e-3  # the prompt matters, so the identity below is not trivial
    # method.md §1: ε → x0 is affine for fixed x_t, so CFG on ε equals CFG on x0.
    torch.testing.assert_close(teacher.x0(eps_k, x_t, t), x0_n + kappa * (x0_c - x0_n), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.x0(cfg(eps_n, eps_c, kappa=kappa), x_t, t), x0_n + kappa * (x0_c - x0_n),
                               rtol=1e-4, atol=1e-4)


def test_guided_eps_kappa_one_and_zero_are_single_forwards(shared_teacher, unet_inputs):
    teacher = shared_teacher
    x_t, t, c, null = unet_inputs
    net = score_net(teacher.unet)
    with torch.no_grad():
        cond = teacher.unet(x_t, t, encoder_hidden_states=c).sample
        uncond = teacher.unet(x_t, t, encoder_hidden_states=torch.cat([null, null])).sample
        torch.testing.assert_close(guided_eps(net, x_t, t, c, null, kappa=1.0), cond, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(guided_eps(net, x_t, t, c, null, kappa=0.0), uncond, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond, uncond, atol=1e-4)


# Norms under autocast -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: torch.nn.GroupNorm(4, 8), lambda: torch.nn.LayerNorm(8),
                                  lambda: torch.nn.LayerNorm(8, elementwise_affine=False)])
def test_autocast_norms_compute_the_norm_in_bf16_and_train_the_fp32_weights(make):
    import copy

    from sidflow.teacher import autocast_norms

    g = torch.Generator().manual_seed(0)
    plain = make()
    for p in plain.parameters():  # trained-looking affine parameters, not the 1s and 0s of an init
        p.data = torch.randn(p.shape, generator=g)
    norm = copy.deepcopy(plain)
    assert autocast_norms(norm) == 1 and type(copy.deepcopy(norm)) is type(norm)
    assert norm.state_dict().keys() == plain.state_dict().keys()
    x = (3 * torch.randn(2, 8, 4, 4, generator=g) + 1).bfloat16()
    if isinstance(plain, torch.nn.LayerNorm):
        x = x.transpose(1, 3)  # [2, 4, 4, 8]: normalised over the last dim
    # Outside autocast it is the module it was (fp32 runs, the exported generator).
    assert torch.equal(norm(x.float()), plain(x.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.float()).dtype == torch.bfloat16  # an fp32 input too: what the next layer reads is bf16
        xg = x.clone().requires_grad_(True)
        y = norm(xg)
    assert y.dtype == torch.bfloat16
    ref = plain(x.float())  # the same normalisation in fp32: bf16 rounding apart, the same values
    torch.testing.assert_close(y.detach().float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    w = torch.randn(y.shape, generator=g)
    (y.float() * w).sum().backward()
    ref_in = x.float().requires_grad_(True)
    (plain(ref_in) * w).sum().backward()
    torch.testing.assert_close(xg.grad.float(), ref_in.grad, rtol=5e-2, atol=5e-2 * float(ref_in.grad.abs().max()))
    for mine, theirs in zip(norm.parameters(), plain.parameters()):  # the fp32 masters get their gradients
        assert mine.dtype == torch.float32 and mine.grad is not None and mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=5e-2, atol=5e-2 * float(theirs.grad.abs().max()))


def test_autocast_norms_leave_no_fp32_activation_in_the_unet(shared_teacher, unet_inputs):
    # CUDA autocast runs group_norm and layer_norm in fp32 and returns fp32 (PyTorch's AMP docs, autocast op
    # reference: "CUDA Ops that can autocast to float32"); CPU autocast does not, so this checks the swapped norms
    # themselves: every one hands bf16 on, whatever dtype reaches it, and the UNet computes what it did in fp32.
    import copy

    from sidflow.teacher import autocast_norms

    x_t, t, c, _ = unet_inputs
    unet = copy.deepcopy(shared_teacher.unet)
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert autocast_norms(unet) == len(norms) > 0
    dtypes = set()
    for m in norms:
        m.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = score_net(unet)(x_t, t, c)
        assert dtypes == {torch.bfloat16}
        want = score_net(shared_teacher.unet)(x_t, t, c)
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * float(want.abs().max()))


# S3 -------------------------------------------------------------------------------------------------------------


def state(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_load_from_s3_and_reuse_cache(tiny_teacher, s3_bucket, sidflow_cache):
    import boto3

    uri = s3_bucket + "/teachers/tiny"
    manifest = storage.publish_dir(tiny_teacher, uri)
    local = load_teacher(tiny_teacher)
    remote = load_teacher(uri)
    assert Path(remote.path).is_relative_to(sidflow_cache)
    assert not list(Path(remote.path).parent.glob(".fetch-*"))  # fetched beside, then renamed into place
    assert fingerprint(uri) == "sha256:" + storage.manifest_digest(manifest)
    want = state(local.unet)
    got = state(remote.unet)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    torch.testing.assert_close(remote.encode(["a cat"]), local.encode(["a cat"]), rtol=0, atol=0)

    # Delete every object but the manifest: a second load must come from the cache, with no fetch.
    bucket, prefix = s3_bucket.removeprefix("s3://"), "teachers/tiny/"
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert prefix + "manifest.json" in keys and len(keys) == len(manifest["files"]) + 1
    for key in keys:
        if key != prefix + "manifest.json":
            client.delete_object(Bucket=bucket, Key=key)
    assert storage.list_files(uri) == ["manifest.json"]
    again = load_teacher(uri)
    assert again.path == remote.path
    for k, v in state(again.unet).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def test_s3_teacher_without_manifest_is_refused(tiny_teacher, s3_bucket, sidflow_cache):
    uri = s3_bucket + "/teachers/bare"
    storage.upload_dir(tiny_teacher, uri)
    assert storage.list_files(uri)  # the files are there, the manifest is not
    with pytest.raises((TeacherError, FileNotFoundError), match="manifest") as err:
        load_teacher(uri)
    assert uri in str(err.value) and "\n" not in str(err.value)
    assert not sidflow_cache.exists() or not any(sidflow_cache.rglob("*.safetensors"))  # nothing fetched


def test_materialize_local_is_identity(tiny_teacher):
    assert materialize(tiny_teacher) == tiny_teacher
    assert materialize("file://" + tiny_teacher) == tiny_teacher
    assert fingerprint(tiny_teacher) is None  # never published: no manifest, no fingerprint


# Bad directories ------------------------------------------------------------------------------------------------


def _missing_dir(p: Path) -> Path:
    shutil.rmtree(p)
    return p


def _no_model_index(p: Path) -> Path:
    (p / "model_index.json").unlink()
    return p


def _no_vae(p: Path) -> Path:
    shutil.rmtree(p / "vae")
    return p


def _empty_vae(p: Path) -> Path:
    shutil.rmtree(p / "vae")
    (p / "vae").mkdir()
    return p


def _no_scheduler_config(p: Path) -> Path:
    (p / "scheduler" / "scheduler_config.json").rename(p / "scheduler" / "other.json")
    return p


def _v_prediction(p: Path) -> Path:
    edit_json(p / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    return p


def _sdxl_keys(p: Path) -> Path:
    edit_json(p / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    return p


def _sdxl_class(p: Path) -> Path:
    edit_json(p / "model_index.json", _class_name="StableDiffusionXLPipeline")
    return p


def _no_beta_schedule(p: Path) -> Path:
    edit_json(p / "scheduler" / "scheduler_config.json", beta_schedule=None, trained_betas=None)
    return p


def _zero_snr(p: Path) -> Path:
    edit_json(p / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True)
    return p


@pytest.mark.parametrize(
    "breaker, expected",
    [
        (_missing_dir, ["does not exist"]),
        (_no_model_index, ["model_index.json"]),
        (_no_vae, ["missing vae"]),
        (_empty_vae, ["missing vae"]),
        (_no_scheduler_config, ["scheduler_config.json"]),
        (_v_prediction, ["v_prediction"]),
        (_sdxl_keys, ["SDXL", "missing text_encoder_2, tokenizer_2"]),
        (_sdxl_class, ["SDXL", "missing text_encoder_2, tokenizer_2"]),
        (_no_beta_schedule, ["beta schedule"]),
        (_zero_snr, ["zero-terminal-SNR"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_teacher_dirs(tiny_teacher, tmp_path, breaker, expected):
    path = breaker(copy_teacher(tiny_teacher, tmp_path / "t"))
    with pytest.raises(TeacherError) as err:
        check_teacher_dir(path)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for part in expected:
        assert part in msg
    assert str(path) in msg
    assert "\n" not in msg
    with pytest.raises(TeacherError) as again:  # load_teacher refuses it the same way, before loading weights
        load_teacher(str(path))
    assert str(again.value) == msg


def test_good_teacher_dir_returns_scheduler_config(tiny_teacher):
    sched = check_teacher_dir(tiny_teacher)
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert sched["num_train_timesteps"] == 1000
