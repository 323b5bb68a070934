"""Tier 2: the finetune stage on a tiny SD teacher: real pairs (pack, encode once), the UNet discriminator, the start
from a distill run, each guidance mode with the GAN on, resume, bad inputs."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sidflow import pairs, storage
from sidflow.stages.distill import DistillConfig
from sidflow.stages.distill import run as distill_run
from sidflow.stages.finetune import FinetuneConfig, run, validate
from sidflow.train import checkpoint

os.environ.setdefault("SIDFLOW_NO_BAR", "1")


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\na blue dog\nthe sun\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 shapes pairs in shards of 5, plus one corrupt image that pack skips."""
    from sidflow.toy.shapes import sample

    images, captions = sample(12, 0, "train")
    rows = [(_png(im), c) for im, c in zip(images, captions)]
    rows.insert(3, (b"\x89PNG\r\n\x1a\n truncated", "a broken file"))
    out = str(tmp_path_factory.mktemp("pairs") / "pairs")
    result = pairs.pack(iter(rows), out, rows_per_shard=5)
    assert (result.rows, result.shards, result.skipped) == (12, 3, 1)
    return out


@pytest.fixture(scope="module")
def distilled(tiny_teacher, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "run"
    distill_run(DistillConfig(**_base(tiny_teacher, prompts), output=str(out)))
    return str(out)


def _base(teacher, prompts, **kw):
    return dict(teacher=teacher, prompts=prompts, batch=2, micro_batch=1, kimg=0.004, checkpoint_kimg=0.002,
                precision="fp32", lr_g=1e-4, lr_fake=1e-4, ema_halflife_kimg=0.002, **kw)


def _cfg(teacher, prompts, data, output, **kw):
    return FinetuneConfig(**{**_base(teacher, prompts), "data": data, "output": str(output), "steps": 2, **kw})


def test_pack_reads_folders_with_captions_and_coco_annotations(tmp_path):
    from sidflow.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"im{i}.png").write_bytes(_png(np.full((20, 30, 3), 40 * i, np.uint8)))
        (folder / f"im{i}.txt").write_text(f"caption {i}\n")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    (folder / "bad.txt").write_text("never used")
    assert main(["data", "pack", "--images", str(folder), "--out", str(tmp_path / "a"), "--rows-per-shard", "2"]) == 0
    assert storage.read_manifest(str(tmp_path / "a")) is not None
    assert pairs.check_shards(str(tmp_path / "a")) == 3
    # A captions file instead of sidecars: an image it does not name is a one-line error.
    (tmp_path / "caps.tsv").write_text("im0.png\tzero\nim1.png\tone\n")
    with pytest.raises(ValueError, match="(bad.jpg|im2.png) has no caption"):
        list(pairs.folder_rows(str(folder), str(tmp_path / "caps.tsv")))
    # COCO: the first caption by annotation id, images missing from the folder left out.
    coco = {"images": [{"id": 2, "file_name": "im1.png"}, {"id": 1, "file_name": "im0.png"},
                       {"id": 3, "file_name": "gone.png"}],
            "annotations": [{"id": 9, "image_id": 1, "caption": "later"}, {"id": 4, "image_id": 1, "caption": "first"},
                            {"id": 5, "image_id": 2, "caption": " two "}, {"id": 6, "image_id": 3, "caption": "x"}]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    rows = list(pairs.coco_rows(str(tmp_path / "captions_train2014.json"), str(folder)))
    assert [c for _, c in rows] == ["first", "two"]
    assert main(["data", "pack", "--annotations", str(tmp_path / "captions_train2014.json"), "--coco-images",
                 str(folder), "--out", str(tmp_path / "b")]) == 0
    assert main(["data", "pack", "--out", str(tmp_path / "c")]) == 2  # neither source: one line, nothing written
    assert not (tmp_path / "c").exists()


def test_the_unet_discriminator_is_the_mid_block_channel_mean_and_reaches_its_input(tiny_teacher):
    from diffusers import UNet2DConditionModel

    from sidflow.teacher import unet_logits

    unet = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    t, c = torch.tensor([100, 700]), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    seen = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, out: seen.update(mid=out))
    unet(x, t, encoder_hidden_states=c)
    hook.remove()
    logits = unet_logits(unet)(x, t, c)
    assert logits.shape == (2, 1, *seen["mid"].shape[2:])
    torch.testing.assert_close(logits, seen["mid"].mean(dim=1, keepdim=True))
    logits.sum().backward()
    assert x.grad.abs().sum() > 0  # the generator's gradient reaches x_g through the encoder
    assert unet.up_blocks[0].resnets[0].conv1.weight.grad is None  # the decoder is not run


def test_finetune_starts_from_the_distill_run_and_encodes_the_pairs_once(tiny_teacher, prompts, data, distilled,
                                                                        tmp_path, monkeypatch):
    from sidflow.generator import load_generator
    from sidflow.stages import distill, finetune

    cfg = _cfg(tiny_teacher, prompts, data, tmp_path / "ft", init=distilled)
    # The start: G is the distill run's export, the fake its newest checkpoint's fake network.
    nets, _ = distill.networks(cfg, torch.device("cpu"))
    finetune._load_init(cfg, nets)
    exported = load_generator(storage.join(distilled, "model"))[0].unet.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in nets.G.state_dict().items())
    fake = checkpoint.load(checkpoint.latest(distilled))["fake"]["model"]
    assert all(torch.equal(v, fake[k]) for k, v in nets.fake.state_dict().items())

    result = run(cfg)
    assert result.iterations == 2 and {"loss_disc", "loss_adv"} <= result.metrics.keys()
    info = json.loads((tmp_path / "ft" / "pairs" / pairs.CACHE_INFO).read_text())
    assert (info["rows"], info["skipped"]) == (12, 0)  # pack already dropped the corrupt image
    card = (tmp_path / "ft" / "model" / "README.md").read_text()
    assert "2-step generator fine-tuned" in card and "trust_remote_code=True" in card
    # Longer: the run resumes from its checkpoint and re-encodes nothing.
    monkeypatch.setattr(pairs, "_encode_part", lambda *a: pytest.fail("the pairs were encoded again"))
    longer = run(FinetuneConfig(**{**cfg.__dict__, "kimg": 0.006}))
    assert longer.iterations == 3


def test_a_resumed_finetune_equals_an_uninterrupted_one(tiny_teacher, prompts, data, tmp_path):
    # Two iterations then one more from the checkpoint, against three at once: every draw (prompts, k, the real
    # pairs' epoch walk, noise) is keyed by the iteration, so the weights are equal.
    whole = run(_cfg(tiny_teacher, prompts, data, tmp_path / "whole", kimg=0.006, steps=3, gan_start_kimg=0.002,
                     adv_rampup_kimg=0.004))
    part = _cfg(tiny_teacher, prompts, data, tmp_path / "part", kimg=0.004, steps=3, gan_start_kimg=0.002,
                adv_rampup_kimg=0.004)
    run(part)
    run(FinetuneConfig(**{**part.__dict__, "kimg": 0.006}))
    a = checkpoint.load(checkpoint.latest(str(tmp_path / "whole")))
    b = checkpoint.load(checkpoint.latest(str(tmp_path / "part")))
    for net in ("G", "fake"):
        assert all(torch.equal(v, b[net]["model"][k]) for k, v in a[net]["model"].items()), net
    assert whole.metrics["loss_adv"] == b["metrics"]["loss_adv"]


@pytest.mark.parametrize("guidance,kappa", [("lsg", 1.5), ("zero_cfg", 1.5), ("anti_cfg", -0.5)])
def test_each_guidance_mode_trains_with_the_gan_on(tiny_teacher, prompts, data, tmp_path, guidance, kappa):
    result = run(_cfg(tiny_teacher, prompts, data, tmp_path / guidance, guidance=guidance, kappa=kappa, kimg=0.002,
                      checkpoints=False, ema_halflife_kimg=0.0))
    m = result.metrics
    assert all(np.isfinite(m[k]) for k in ("loss_fake", "loss_g", "loss_disc", "loss_adv")) and m["loss_disc"] > 0


def test_a_finetune_with_both_weights_zero_is_few_step_distill(tiny_teacher, prompts, data, tmp_path):
    # The control row of a GAN comparison: no adversarial compute and none of its clipping of the fake step, so
    # the generator equals a K-step distill run's with the same settings (the GAN's clip alone would change it).
    from sidflow.generator import load_generator

    kw = dict(steps=2, checkpoints=False)
    ctrl = run(_cfg(tiny_teacher, prompts, data, tmp_path / "ctrl", adv_weight=0.0, disc_weight=0.0, **kw))
    plain = distill_run(DistillConfig(**_base(tiny_teacher, prompts), output=str(tmp_path / "plain"), **kw))
    assert "loss_disc" not in ctrl.metrics and not (tmp_path / "ctrl" / "pairs").exists()
    got, want = (load_generator(r.model_uri)[0].unet.state_dict() for r in (ctrl, plain))
    assert all(torch.equal(v, want[k]) for k, v in got.items())


def test_bad_inputs_are_one_line_errors_before_any_training(tiny_teacher, prompts, data, distilled, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = _cfg(tiny_teacher, prompts, data, tmp_path / "out")
    validate(good)
    (tmp_path / "empty").mkdir()
    no_caption = tmp_path / "nocap.parquet"
    pq.write_table(pa.table({"image": [b"x"], "text": ["y"]}), no_caption)
    other = tmp_path / "other-teacher"
    from sidflow.toy.tiny import build_tiny_sd

    build_tiny_sd(other, seed=1)
    cases = {"steps=9 must be between 1 and 8": dict(steps=9),
             "data is empty": dict(data=""),
             "holds no .parquet shard": dict(data=str(tmp_path / "empty")),
             "needs 'image' and 'caption'": dict(data=str(no_caption)),
             "adv_weight=-1.0 must be": dict(adv_weight=-1.0),
             "gan_clip=0.0 must be": dict(gan_clip=0.0),
             "holds no exported generator": dict(init=str(tmp_path / "nothing")),
             "was distilled from teacher": dict(init=distilled, teacher=str(other))}
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            validate(FinetuneConfig(**{**good.__dict__, **change}))
    assert not (tmp_path / "out").exists()


def test_the_split_generator_backward_gives_the_joint_gradients_with_the_gan_on(tiny_teacher, prompts, data, tmp_path,
                                                                              grads_before_clipping):
    # method.md §4 with the adversarial term: L_adv reaches x_g through the fake's encoder at x_t in both paths, over
    # the same w (§6.2); G's gradients (before Adam, which would hide a wrong scale) and the logged losses agree.
    seen = grads_before_clipping  # per iteration: the fake's, then G's
    got = {}
    for mode in ("joint", "split"):
        seen.clear()
        result = run(_cfg(tiny_teacher, prompts, data, tmp_path / mode, kimg=0.002, checkpoints=False,
                          ema_halflife_kimg=0.0, generator_backward=mode))
        got[mode] = result.metrics, seen[1]
    (m_joint, joint), (m_split, split) = got["joint"], got["split"]
    for key in ("loss_g", "loss_adv", "loss_disc", "loss_fake"):
        assert m_split[key] == pytest.approx(m_joint[key], rel=1e-6), key
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(split, joint))
    assert worst < 1e-4, worst  # of each tensor's largest gradient


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_gan_on(tiny_teacher, prompts, data, tmp_path, sharding):
    # The discriminator runs on the fake module itself, outside the DDP wrapper, inside the same backward as the score
    # loss: its gradient must reach the reduction (and the FSDP shards) as one process's does. Rank 0 encodes the
    # pairs; the other waits and reads them. A large Adam ε as in the distill test keeps rounding from flipping signs.
    from sidflow.stages.finetune import launch

    one = _cfg(tiny_teacher, prompts, data, tmp_path / "one", kimg=0.008, checkpoint_kimg=0.008, batch=4,
               adam_eps=1e-2, steps=2)
    two = FinetuneConfig(**{**one.__dict__, "output": str(tmp_path / "two"), "gpus": "2", "sharding": sharding})
    alone = run(one)
    result = launch(two)
    assert (result.iterations, result.interrupted) == (2, False) and result.metrics["loss_disc"] > 0
    # The losses summed over ranks are one process's. (At the start the logits barely depend on the input, so this
    # would not show a rank scoring another rank's pairs; test_real_pairs_walk_one_permutation_per_epoch checks the
    # draw itself.)
    for key in ("loss_disc", "loss_adv", "loss_fake"):
        assert result.metrics[key] == pytest.approx(alone.metrics[key], rel=1e-4), key
    end = checkpoint.name_for(8)
    a, b = (checkpoint.load(str(tmp_path / name / "checkpoints" / end)) for name in ("one", "two"))
    for net in ("G", "fake", "ema"):
        worst = max(float((a[net]["model"][k].float() - v.float()).abs().max()) for k, v in b[net]["model"].items())
        assert worst <= 1e-5, (net, worst)


def test_real_pairs_walk_one_permutation_per_epoch():
    from sidflow.train.loop import GAN

    gan = GAN(real=None, size=10, adv_weight=1.0, disc_weight=1.0, gan_start_kimg=4.0, adv_rampup_kimg=4.0)
    walk = torch.cat([gan.indices(seed=3, it=i, batch=4) for i in range(5)])  # 20 draws: two epochs of 10
    assert sorted(walk[:10].tolist()) == sorted(walk[10:].tolist()) == list(range(10))
    assert walk[:10].tolist() != walk[10:].tolist()  # a new order each epoch
    assert torch.equal(gan.indices(seed=3, it=3, batch=4), walk[12:16])  # iteration 3 alone: what a resume draws
    assert not torch.equal(gan.indices(seed=4, it=0, batch=4), walk[:4])
    # λ_adv: 0 before the start, then a linear rise over rampup_kimg.
    assert [gan.adv_weight_at(n) for n in (0, 3999, 4000, 6000, 8000, 9000)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
