"""The evaluate stage: protocol pieces against clean-fid / GigaGAN, the stage end to end on tiny models, sharding.

Nothing is downloaded: the Inception stand-in is a small TorchScript file with clean-fid's `layers` entry point, the
CLIP model a one-layer OpenCLIP architecture in open_clip's directory layout, the generator the tiny teacher.
"""

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidflow import storage
from sidflow.config import to_args
from sidflow.evaluate import protocol
from sidflow.evaluate.fid import feature_stats, frechet_distance
from sidflow.evaluate.resize import clean_resize, gigagan_clip_roundtrip, protocol_resize
from sidflow.stages.evaluate import EvaluateConfig, run, validate

ROOT = Path(__file__).parent.parent
TOY = ROOT / "examples" / "toy-teacher"
ENV = {**os.environ, "SIDFLOW_NO_BAR": "1"}
CAPTIONS = ["a red cat on a mat", "a blue dog", "two green trees on a hill at dawn", "the sun", "a boat", "a cake"]


# Stand-ins built here: no weights are downloaded. -----------------------------------------------------------------


class _StandInInception(torch.nn.Module):
    """clean-fid's TorchScript exposes `layers`: pool3 features of (x − 128) / 128 at 299² (here a strided conv)."""

    def __init__(self, channels: int, pool: int):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 13, stride=13), torch.nn.Tanh(),
                                          torch.nn.AdaptiveAvgPool2d(pool), torch.nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - 128) / 128)


def _inception_file(path: Path, channels: int = 8, pool: int = 2) -> str:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_StandInInception(channels, pool)).save(str(path))
    return str(path)


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _clip_dir(path: Path) -> str:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    path.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": preprocess}))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return str(path)


def _export_generator(teacher_dir: str, uri: str) -> str:
    from sidflow.generator import export_generator
    from sidflow.teacher import load_teacher

    teacher = load_teacher(teacher_dir)  # the teacher's UNet as a one-step generator: untrained, but a real export
    info = {"teacher": teacher_dir, "teacher_fingerprint": "unpublished", "nimg": 0, "weights": "raw", "steps": 1,
            "config": {"steps": 1, "t_init": 625}}
    export_generator(teacher.unet, teacher, uri, info)
    return uri


def _png_dir(path: Path, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # non-square, odd sizes: the center crop's rounding matters
        h, w = rng.integers(20, 40, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / f"COCO_val2014_{i:012d}.png")
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_teacher):
    from sidflow.cli import main

    root = tmp_path_factory.mktemp("eval")
    inception = _inception_file(root / "weights" / "inception-2015-12-05.pt")
    protocol.write_prompt_set(str(root / "prompts.parquet"), CAPTIONS, image_ids=list(range(len(CAPTIONS))))
    assert main(["data", "ref-stats", "--images", _png_dir(root / "val2014", 8, 0), "--out", str(root / "ref.npz"),
                 "--inception-weights", inception, "--workers", "0", "--batch", "4"]) == 0
    return {"root": root, "inception": inception, "clip": _clip_dir(root / "clip"), "reference": str(root / "ref.npz"),
            "prompts": str(root / "prompts.parquet"), "model": _export_generator(tiny_teacher, str(root / "gen"))}


def _cfg(assets, output, **kw) -> EvaluateConfig:
    base = dict(model=assets["model"], prompts=assets["prompts"], reference=assets["reference"], output=str(output),
                inception_weights=assets["inception"], clip_model=assets["clip"], batch=2, shard_size=2, grid=4,
                workers=2, teacher_steps=2)
    return EvaluateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def one_process(assets):
    out = assets["root"] / "one"
    return run(_cfg(assets, out)), out


# Fréchet distance and the image chain. ------------------------------------------------------------------------------


def test_frechet_distance_against_scipy_and_clean_fid():
    from scipy import linalg

    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 64))
    y = rng.normal(0.2, 1.0, size=(4000, 64)) @ rng.normal(0, 0.3, size=(64, 64))
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    direct = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert abs(frechet_distance(m1, s1, m2, s2) - direct) <= 1e-3
    if tuple(int(v) for v in __import__("scipy").__version__.split(".")[:2]) < (1, 18):  # disp= is gone in 1.18
        from cleanfid.fid import frechet_distance as clean_fid_frechet

        assert abs(frechet_distance(m1, s1, m2, s2) - clean_fid_frechet(m1, s1, m2, s2)) <= 1e-3
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-6
    noisy = [frechet_distance(*feature_stats(x + rng.normal(0, sd, x.shape)), m1, s1) for sd in (0.1, 0.3, 1.0, 2.0)]
    assert noisy == sorted(noisy) and noisy[0] > 0


@pytest.mark.parametrize("shape", [(375, 500), (333, 250), (64, 64), (512, 512)])
def test_resize_chain_matches_clean_fid_bit_for_bit(tmp_path, shape):
    # clean-fid's own dataset on a PNG file with GigaGAN's crop + Lanczos transform, vs our in-memory chain.
    from cleanfid.utils import ResizeDataset
    from torchvision.transforms import functional

    def resize_and_center_crop(image_np):  # GigaGAN evaluation.py compute_fid, resize_size=256
        image_pil = Image.fromarray(image_np)
        image_pil = functional.center_crop(image_pil, min(image_pil.size))  # CenterCropLongEdge
        return np.array(image_pil.resize((256, 256), Image.LANCZOS))

    rng = np.random.default_rng(shape[0])
    smooth = np.kron(rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3)), np.ones((8, 8, 1)))
    image = np.clip(smooth[: shape[0], : shape[1]] + rng.normal(0, 20, (*shape, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    dataset = ResizeDataset([str(tmp_path / "x.png")], mode="clean")
    dataset.custom_image_tranform = resize_and_center_crop
    theirs = dataset[0].numpy().transpose(1, 2, 0)  # [299, 299, 3] float32
    ours = clean_resize(protocol_resize(image, 256))
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_clip_image_goes_through_gigagan_tensor_round_trip():
    from torchvision import transforms

    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    t = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(Image.fromarray(image)))
    gigagan = ((t + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(1, 2, 0).numpy()  # tensor2pil
    assert np.array_equal(gigagan_clip_roundtrip(image), gigagan)
    assert not np.array_equal(gigagan, image)  # the trip is not the identity: values 1..63 drop by one


def _gigagan_tokens(tokenize, captions):  # GigaGAN compute_clip_score, with open_clip's copy of CLIP's tokenizer
    tokens = tokenize(captions)
    prepend_text_token = tokenize(["A photo depicts "])[:, 1:4]
    prepend_text_tokens = prepend_text_token.expand(tokens.shape[0], -1)
    start_tokens = tokens[:, :1]
    new_text_tokens = torch.cat([start_tokens, prepend_text_tokens, tokens[:, 1:]], dim=1)[:, :77]
    last_cols = new_text_tokens[:, 77 - 1 : 77]
    last_cols[last_cols > 0] = 49407
    return torch.cat([new_text_tokens[:, :76], last_cols], dim=1)


def test_prefix_is_inserted_at_token_level_and_long_captions_are_cut_to_77():
    import open_clip

    from sidflow.evaluate.clipscore import prefixed_tokens

    tok = open_clip.get_tokenizer("ViT-g-14")  # its BPE vocabulary ships inside the package
    words = lambda k: " ".join(["dog"] * k)  # noqa: E731  "dog" is one token
    captions = ["A cat sitting on a red couch.", words(71), words(72), words(73), words(74), words(120)]
    ours = prefixed_tokens(tok, captions)
    assert torch.equal(ours, _gigagan_tokens(tok, captions))
    assert ours.shape == (6, 77)
    assert torch.equal(ours[0], tok(["A photo depicts A cat sitting on a red couch."])[0])  # short: = string prefix
    dog = tok(["dog"])[0, 1]
    for row, k in zip(ours[1:], (71, 72, 73, 74, 120)):
        assert row[1:4].tolist() == [320, 1125, 29340]  # "a photo depicts"
        assert int((row == dog).sum()) == min(k, 72) and int(row[-1]) in (0, 49407)
        assert int(row[min(4 + k, 76)]) == 49407  # EOT right after the caption, or forced into the last slot
    assert int(ours[1, -1]) == 0 and int(ours[-1, -1]) == 49407  # 71 words still fit with their EOT


# Prompt sets and bad input. -----------------------------------------------------------------------------------------


def test_captions_txt_is_md5_checked(monkeypatch):
    lines = "\n".join(f"caption {i}" for i in range(protocol.CAPTIONS_TXT_LINES)).encode()
    with pytest.raises(ValueError, match="not GigaGAN's COCO-2014 30k list"):
        protocol.captions_from_gigagan_txt(lines + b" edited")
    monkeypatch.setattr(protocol, "CAPTIONS_TXT_MD5", hashlib.md5(lines).hexdigest())
    captions = protocol.captions_from_gigagan_txt(lines)
    assert len(captions) == 30_000 and captions[0] == "caption 0"


def test_coco_prompts_cli_from_annotations_and_prompt_set_round_trip(tmp_path, capsys):
    from sidflow.cli import main

    anns = [{"id": 100 + 10 * img + k, "image_id": img, "caption": f"image {img} caption {k}\n"}
            for img in (7, 3, 5, 9) for k in range(5)]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": anns}))
    args = ["data", "coco-prompts", "--annotations", str(tmp_path / "ann.json"), "--out"]
    assert main([*args, str(tmp_path / "all.parquet")]) == 0
    assert main([*args, str(tmp_path / "two.parquet"), "--n", "2", "--seed", "1"]) == 0
    everything = protocol.read_prompt_set(str(tmp_path / "all.parquet"))
    assert everything.image_ids == [3, 5, 7, 9] and everything.seeds == [0, 1, 2, 3]
    assert [c.split(" caption")[0] for c in everything.captions] == ["image 3", "image 5", "image 7", "image 9"]
    assert all(c == c.strip() for c in everything.captions)
    two = protocol.read_prompt_set(str(tmp_path / "two.parquet"))
    assert len(two) == 2 and set(two.image_ids) < {3, 5, 7, 9} and two.image_ids == sorted(two.image_ids)
    assert main([*args, str(tmp_path / "again.parquet")]) == 0  # same seed, same draw
    assert protocol.read_prompt_set(str(tmp_path / "again.parquet")).captions == everything.captions
    (tmp_path / "captions.txt").write_text("not the real list\n")
    capsys.readouterr()
    assert main(["data", "coco-prompts", "--captions-txt", str(tmp_path / "captions.txt"), "--out",
                 str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "md5" in err and err.count("\n") == 1


def test_prompt_parquet_without_caption_is_one_clear_line(tmp_path, assets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="has no 'caption' column"):
        validate(_cfg(assets, tmp_path / "out", prompts=str(tmp_path / "p.parquet")))
    with pytest.raises(ValueError, match="must be a .parquet prompt set"):
        validate(_cfg(assets, tmp_path / "out", prompts=str(tmp_path / "p.txt")))


@pytest.mark.parametrize("change, error, match", [
    (dict(reference="/nonexistent/ref.npz"), FileNotFoundError, "sidflow data ref-stats"),
    (dict(inception_weights="/nonexistent/inception-2015-12-05.pt"), FileNotFoundError,
     "download it from https://nvlabs-fi-cdn.nvidia.com/.*/inception-2015-12-05.pt"),
    (dict(inception_weights=""), FileNotFoundError, "inception-2015-12-05.pt is not there"),
    (dict(protocol="sdxl10k"), ValueError, "computed for protocol 'coco30k', not 'sdxl10k'"),
    (dict(features="dinov2"), ValueError, "features='dinov2' is not"),
    (dict(batch=0), ValueError, "batch=0 must be at least 1"),
    (dict(grid=-1), ValueError, "grid=-1 must be at least 0"),
    (dict(workers=-2), ValueError, "workers=-2 must be at least 1"),
    (dict(clip_model="/nonexistent/clip"), FileNotFoundError, "has no open_clip_config.json"),
    (dict(clip_model="ViT-g-14", clip_weights="/nonexistent/open_clip_pytorch_model.bin"), FileNotFoundError,
     "neither a pretrained tag of ViT-g-14"),
    (dict(prompts=""), ValueError, "prompts is empty"),
])
def test_bad_inputs_fail_before_any_model_loads(assets, tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        validate(_cfg(assets, tmp_path / "out", **change))


def test_teacher_needs_a_teacher_sampler_and_cli_errors_are_one_line(assets, tiny_teacher, tmp_path, capsys):
    from sidflow.cli import main

    with pytest.raises(ValueError, match="not an exported sidflow generator.*--sampler ddim"):
        validate(_cfg(assets, tmp_path / "out", model=tiny_teacher))
    validate(_cfg(assets, tmp_path / "out", model=tiny_teacher, sampler="dpm_solver"))
    assert main(["evaluate", "--model", assets["model"], "--prompts", assets["prompts"], "--output",
                 str(tmp_path / "o"), "--reference", str(tmp_path / "missing.npz"), "--inception-weights",
                 assets["inception"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sidflow evaluate: error: reference=") and err.count("\n") == 1


def test_dpm_solver_teacher_rows_sample_from_the_same_seeds(tiny_teacher):
    from sidflow.stages.evaluate import EvaluateConfig, load_sampler

    teacher = EvaluateConfig(model=tiny_teacher, sampler="ddim", teacher_steps=2, kappa=2.0)
    ddim, about = load_sampler(teacher, "cpu")
    dpm, _ = load_sampler(dataclasses.replace(teacher, sampler="dpm_solver"), "cpu")
    assert about["kind"] == "teacher" and about["vae_dtype"] == "fp32"
    a, b = ddim(CAPTIONS[:2], [0, 1]), dpm(CAPTIONS[:2], [0, 1])
    assert a.shape == b.shape == (2, 16, 16, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)
    assert np.array_equal(dpm(CAPTIONS[1:2], [1]), b[1:])  # an image does not depend on its batch


def test_a_padded_decode_gives_each_image_as_alone_and_the_vae_precision_follows_the_vae(tiny_teacher):
    from sidflow.evaluate.sampling import vae_auto_dtype
    from sidflow.stages.evaluate import EvaluateConfig, load_sampler

    sampler, _ = load_sampler(EvaluateConfig(model=tiny_teacher, sampler="ddim", teacher_steps=2), "cpu")
    latents = sampler.latents(CAPTIONS[:3], [0, 1, 2])
    plain = sampler.decode(latents)
    sampler.decode_batch = 5  # what compile_decode sets: short batches are padded to the compiled shape
    padded = sampler.decode(latents[:2])
    assert padded.shape == (2, 16, 16, 3) and np.array_equal(padded, plain[:2])
    nets = sampler.nets
    assert not nets.is_sdxl and vae_auto_dtype(nets) == "fp16"  # SD1.5/2.1 VAEs decode in fp16, as SiD-LSG's
    nets.text_encoder_2 = nets.text_encoder  # as an SDXL teacher: its VAE overflows in fp16 unless it says not
    assert vae_auto_dtype(nets) == "fp32"
    nets.vae.register_to_config(force_upcast=False)  # the fp16-fix VAE
    assert vae_auto_dtype(nets) == "fp16"


def test_inception_loads_from_s3_and_matches_clean_fids_wrapper(tmp_path, s3_bucket, sidflow_cache):
    from cleanfid.inception_torchscript import InceptionV3W

    from sidflow.evaluate.features import inception

    path = _inception_file(tmp_path / "w" / "inception-2015-12-05.pt", channels=8, pool=16)  # 2048-d, as the real one
    storage.upload_file(path, f"{s3_bucket}/metrics/inception-2015-12-05.pt")
    ours = inception(f"{s3_bucket}/metrics/inception-2015-12-05.pt", "cpu")
    theirs = InceptionV3W(str(tmp_path / "w"), download=False)
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        assert np.array_equal(ours(x.permute(0, 2, 3, 1).numpy()), theirs(x).numpy())
    assert ours.fingerprint == "inception:sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt is missing; download it from https://"):
        inception(f"{s3_bucket}/nowhere/inception-2015-12-05.pt", "cpu")


# The stage end to end. ----------------------------------------------------------------------------------------------


def test_metrics_are_complete_and_equal_a_direct_computation(assets, one_process):
    import open_clip

    from sidflow.evaluate.clipscore import prefixed_tokens
    from sidflow.evaluate.reference import read_reference
    from sidflow.generator import load_generator, sample

    result, out = one_process
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fid", "clip", "images", "reference_images", "protocol", "model", "model_fingerprint", "sampler",
            "prompts_fingerprint", "reference_fingerprint", "features", "scorer"} <= metrics.keys()
    assert metrics["images"] == 6 and metrics["reference_images"] == 8 and metrics["protocol"] == "coco30k"
    assert metrics["fid"] == result.fid and metrics["model_fingerprint"].startswith("sha256:")
    assert json.loads((out / "config.json").read_text())["shard_size"] == 2
    assert sorted(os.listdir(out / "shards")) == [f"shard-{k:06d}.npz" for k in range(3)]

    # Independently: sidflow generate's images → crop/Lanczos/bicubic → stand-in Inception; tiny CLIP by hand.
    gen, info = load_generator(assets["model"])
    images256 = [protocol_resize(im, 256) for im in sample(gen, info, CAPTIONS, list(range(6)))]
    net = torch.jit.load(assets["inception"])
    with torch.no_grad():
        feats = net(torch.from_numpy(np.stack([clean_resize(im) for im in images256])).permute(0, 3, 1, 2)).numpy()
    ref = read_reference(assets["reference"])
    assert metrics["fid"] == pytest.approx(frechet_distance(*feature_stats(feats), ref.mu, ref.sigma), rel=1e-5)
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + assets["clip"])
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(gigagan_clip_roundtrip(im))) for im in images256])
        cos = torch.nn.functional.cosine_similarity(
            model.encode_image(x), model.encode_text(prefixed_tokens(open_clip.get_tokenizer("ViT-g-14"), CAPTIONS)))
    assert metrics["clip"] == pytest.approx(float(cos.mean()), abs=1e-6)

    import pyarrow.parquet as pq

    table = pq.read_table(out / "clip_scores.parquet").to_pydict()
    assert table["row"] == list(range(6)) and table["caption"] == CAPTIONS and table["image_id"] == list(range(6))
    assert np.allclose(table["clip"], cos.numpy(), atol=1e-6)
    grid = Image.open(out / "grid.png")
    grid.load()
    assert grid.width == 4 * 256 and grid.height > 256  # 4 tiles, and captions under them
    assert "| FID |" in (out / "row.md").read_text() and f"{metrics['fid']:.2f}" in (out / "row.md").read_text()


def test_the_teacher_grid_samples_the_generators_teacher_for_the_same_prompts_and_seeds(assets, one_process,
                                                                                          tiny_teacher):
    from sidflow.evaluate.report import captioned_grid
    from sidflow.evaluate.sampling import Sampler
    from sidflow.teacher import load_teacher

    _, out = one_process
    metrics = json.loads((out / "metrics.json").read_text())
    # The generator's sidflow.json has no recipe: the teacher is shown at the stage's κ, with its teacher_steps.
    assert metrics["teacher_grid"] == {"teacher": tiny_teacher, "sampler": "ddim", "steps": 2, "kappa": 3.0}
    images = Sampler(load_teacher(tiny_teacher), 2, None, "ddim", 3.0)(CAPTIONS[:4], [0, 1, 2, 3])
    expected = Image.open(io.BytesIO(captioned_grid(np.stack([protocol_resize(im, 256) for im in images]),
                                                    CAPTIONS[:4])))
    assert np.array_equal(np.asarray(Image.open(out / "teacher_grid.png")), np.asarray(expected))


def test_a_generator_whose_teacher_is_gone_gets_its_grid_only(assets, tmp_path, capsys):
    from sidflow.generator import export_generator, load_generator

    gen, info = load_generator(assets["model"])
    export_generator(gen.unet, gen, str(tmp_path / "gen"), {**info, "teacher": str(tmp_path / "deleted-teacher")})
    result = run(_cfg(assets, tmp_path / "eval", model=str(tmp_path / "gen"), limit=2, grid=2))
    assert result.metrics["teacher_grid"] is None and (tmp_path / "eval" / "grid.png").exists()
    assert not (tmp_path / "eval" / "teacher_grid.png").exists()
    assert "no teacher_grid.png: the teacher" in capsys.readouterr().out


@pytest.fixture(scope="module")
def teacher_row(assets, tiny_teacher):
    """The tiny teacher's own evaluation on the same prompts and reference: a comparison row, run once."""
    out = assets["root"] / "teacher-row"
    run(_cfg(assets, out, model=tiny_teacher, sampler="ddim", kappa=2.0))
    return out


def test_a_teacher_row_puts_the_teachers_metrics_and_grid_beside_the_models(assets, teacher_row, tmp_path):
    result = run(_cfg(assets, tmp_path / "eval", teacher_row=str(teacher_row)))
    row = json.loads((teacher_row / "metrics.json").read_text())
    assert result.metrics["teacher_row"] == {k: row[k] for k in ("model", "sampler", "fid", "clip", "images")}
    assert result.metrics["teacher_row"]["fid"] != result.fid  # two evaluations, not one copied
    # The row's grid is the teacher grid (the same first prompts and seeds): nothing sampled twice.
    assert result.metrics["teacher_grid"] == {"teacher": row["model"], "sampler": "ddim", "steps": 2, "kappa": 2.0}
    assert (tmp_path / "eval" / "teacher_grid.png").read_bytes() == (teacher_row / "grid.png").read_bytes()


def test_a_teacher_row_that_would_not_compare_is_refused_before_any_model_loads(assets, teacher_row, one_process,
                                                                               tmp_path):
    other = str(tmp_path / "other.parquet")
    protocol.write_prompt_set(other, [c + " at dusk" for c in CAPTIONS])
    with pytest.raises(ValueError, match="evaluated with another prompts"):
        validate(_cfg(assets, tmp_path / "a", prompts=other, teacher_row=str(teacher_row)))
    with pytest.raises(FileNotFoundError, match="has no metrics.json: evaluate the teacher there first"):
        validate(_cfg(assets, tmp_path / "b", teacher_row=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="the evaluation of a generator, not of a teacher"):
        validate(_cfg(assets, tmp_path / "c", teacher_row=str(one_process[1])))


@pytest.mark.parametrize("config, kappa", [
    ({"guidance": "lsg", "kappa": 2.0}, 2.0),         # the teacher at the κ4 it was distilled against
    ({"guidance": "long", "kappa": 4.5}, 4.5),
    ({"guidance": "lsg", "kappa": 2.0, "kappa_4": 1.5}, 1.5),  # an explicit κ4 wins
    ({"guidance": "zero_cfg", "kappa": 1.0}, 3.0),    # an unguided teacher (κ4 = 1): the stage's κ
    ({"guidance": "anti_cfg", "kappa": -1.0}, 3.0),
    ({"guidance": "short", "kappa": 0.5}, 3.0),
    ({}, 3.0),                                        # no recipe recorded
])
def test_the_teacher_grid_guidance_follows_the_recipe(config, kappa):
    from sidflow.stages.evaluate import teacher_kappa

    assert teacher_kappa({"config": config}, 3.0) == kappa


def test_a_rerun_resumes_from_the_shards(assets, one_process, tmp_path):
    result, out = one_process
    (out / "shards" / "shard-000001.npz").unlink()
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = run(_cfg(assets, out))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # kept, not recomputed
    assert (out / "shards" / "shard-000001.npz").exists()
    assert again.fid == pytest.approx(result.fid, rel=1e-6) and again.clip == pytest.approx(result.clip, abs=1e-7)
    with pytest.raises(ValueError, match="written by a different evaluation"):
        run(_cfg(assets, out, limit=5))


def test_two_processes_give_the_same_features_as_one(assets, one_process):
    from sidflow.evaluate.shards import ShardResult

    _, one = one_process
    two = assets["root"] / "two"
    cfg = _cfg(assets, two, gpus="2")
    proc = subprocess.run([sys.executable, "-m", "sidflow.cli", "evaluate", *to_args(cfg)], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["images"] == 6
    for k in range(3):
        a, b = (ShardResult.from_bytes((d / "shards" / f"shard-{k:06d}.npz").read_bytes()) for d in (one, two))
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.grid, b.grid)  # same images
        # torchrun runs each process on one thread: sums may differ in the last bits.
        assert np.allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
        assert np.allclose(a.scores, b.scores, atol=1e-6)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["fid"] == pytest.approx(one_process[0].fid, rel=1e-4)


def test_toy_evaluator_gives_shapes_fid_and_prompt_accuracy(tmp_path, s3_bucket, sidflow_cache):
    from sidflow.cli import main
    from sidflow.teacher import load_teacher
    from sidflow.toy import evaluator, shapes
    from sidflow.toy.train_teacher import sample_teacher

    captions = shapes.sample(8, 5, "train")[1]
    protocol.write_prompt_set(f"{s3_bucket}/toy/prompts.parquet", captions)
    shapes.write_parquet(f"{s3_bucket}/toy/real.parquet", 32, seed=9)
    toy = f"toy:{TOY / 'evaluator'}"
    assert main(["data", "ref-stats", "--images", f"{s3_bucket}/toy/real.parquet", "--out",
                 f"{s3_bucket}/toy/ref.npz", "--protocol", "native", "--features", toy, "--workers", "0"]) == 0
    cfg = EvaluateConfig(model=str(TOY), prompts=f"{s3_bucket}/toy/prompts.parquet",
                         reference=f"{s3_bucket}/toy/ref.npz", output=f"{s3_bucket}/toy/eval", protocol="native",
                         features=toy, scorer=toy, sampler="ddim", teacher_steps=3, kappa=2.0, batch=4,
                         shard_size=4, grid=8)
    result = run(cfg)
    metrics = json.loads(storage.read_text(f"{s3_bucket}/toy/eval/metrics.json"))
    assert metrics["sampler"] == {"kind": "teacher", "sampler": "ddim", "steps": 3, "kappa": 2.0,
                                  "compile_vae": False, "unet_dtype": "fp32", "vae_dtype": "fp32"}
    # The same numbers from the toy domain's own functions, on sample_teacher's images.
    images = sample_teacher(load_teacher(str(TOY)), captions, list(range(8)), steps=3, kappa=2.0)
    model = evaluator.load(TOY / "evaluator")
    real = shapes.read_parquet(f"{s3_bucket}/toy/real.parquet")[0]
    assert result.fid == pytest.approx(evaluator.shapes_fid(model, images, real), rel=1e-4)
    assert result.clip == pytest.approx(evaluator.prompt_accuracy(model, images, captions), abs=1e-9)
    grid = Image.open(io.BytesIO(storage.read_bytes(f"{s3_bucket}/toy/eval/grid.png")))
    assert grid.width == 4 * 128  # 32-px tiles enlarged so their captions fit


# Config and README. -------------------------------------------------------------------------------------------------


def test_configs_are_frozen_and_documented():
    from sidflow.evaluate.reference import RefStatsConfig

    for cls in (EvaluateConfig, RefStatsConfig):
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().batch = 1
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


def test_cli_dry_run_validates_and_prints_the_config(assets, tmp_path, capsys):
    from sidflow.cli import main

    assert main(["evaluate", "--model", assets["model"], "--prompts", assets["prompts"], "--reference",
                 assets["reference"], "--output", str(tmp_path / "o"), "--inception-weights", assets["inception"],
                 "--clip-model", assets["clip"], "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"] == "coco30k"
    assert not (tmp_path / "o").exists()
