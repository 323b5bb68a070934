"""Tier 2: the distill stage on a tiny SD teacher: export, reload, resume after SIGTERM, DDP, bad inputs."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sidflow import storage
from sidflow.config import to_args
from sidflow.stages.distill import DistillConfig, launch, run, validate
from sidflow.train import checkpoint

ENV = {**os.environ, "SIDFLOW_NO_BAR": "1"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\na blue dog\n\na green tree on a hill\nthe sun\n")
    return str(path)


def _cfg(teacher_uri, prompts_uri, output, **kw):
    base = dict(teacher=teacher_uri, prompts=prompts_uri, output=str(output), batch=2, micro_batch=1, kimg=0.006,
                checkpoint_kimg=0.002, precision="fp32", lr_g=1e-4, lr_fake=1e-4, ema_halflife_kimg=0.002, kappa=1.5)
    return DistillConfig(**{**base, **kw})


def _cli(cfg: DistillConfig, *extra) -> list[str]:
    return [sys.executable, "-m", "sidflow.cli", "distill", *to_args(cfg), *extra]


def _sigterm_after_first_checkpoint(cfg: DistillConfig, nimg: int) -> tuple[int, str]:
    """Start `sidflow distill` for cfg, SIGTERM it once the checkpoint at nimg is published; return (rc, output)."""
    proc = subprocess.Popen(_cli(cfg), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = Path(cfg.output) / "checkpoints" / checkpoint.name_for(nimg) / "manifest.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    return proc.returncode, out


def _weights(uri: str) -> dict:
    return checkpoint.load(uri)["G"]["model"]


def _assert_same(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, worst


def test_distill_exports_a_pipeline_that_diffusers_loads_and_matches_generate(tiny_teacher, prompts, tmp_path):
    from diffusers import DiffusionPipeline

    from sidflow.generator import load_generator, sample

    result = run(_cfg(tiny_teacher, prompts, tmp_path / "run"))
    assert result.iterations == 3 and not result.interrupted
    assert storage.read_manifest(result.model_uri) is not None
    lines = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(np.isfinite(v) for v in result.metrics.values() if isinstance(v, float))
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "fingerprint" in card and "kappa" in card and "6 (0.006 kimg)" in card
    # The generator moved away from the teacher.
    state = _weights(checkpoint.latest(str(tmp_path / "run")))
    from diffusers import UNet2DConditionModel

    teacher_unet = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet").state_dict()
    assert max(float((state[k] - teacher_unet[k]).abs().max()) for k in state) > 1e-6

    gen, info = load_generator(result.model_uri)
    ours = sample(gen, info, ["a red cat"], [7]).astype(np.float32) / 255
    pipe = DiffusionPipeline.from_pretrained(result.model_uri)
    z = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(7))[None]
    theirs = pipe("a red cat", num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="np").images
    # diffusers post-processes with (x/2 + 0.5), we with x·127.5 + 128 → within 1/255 plus rounding.
    assert np.abs(ours - theirs).max() <= 2 / 255


def test_a_k_step_export_samples_in_diffusers_as_generate_does(tiny_teacher, prompts, tmp_path):
    # K = 3: the shipped scheduler re-noises between steps as the loop's sampler does; with one generator per image
    # the pipeline draws what `sidflow generate` draws for each seed, and an image does not depend on its batch.
    from diffusers import DiffusionPipeline

    from sidflow.generator import load_generator, sample

    result = run(_cfg(tiny_teacher, prompts, tmp_path / "run", kimg=0.002, ema_halflife_kimg=0.0, steps=3))
    assert "trust_remote_code=True" in (tmp_path / "run" / "model" / "README.md").read_text()
    gen, info = load_generator(result.model_uri)
    ours = sample(gen, info, ["a red cat", "a blue dog"], [7, 8]).astype(np.float32) / 255
    assert np.array_equal(ours[1:], sample(gen, info, ["a blue dog"], [8]).astype(np.float32) / 255)
    pipe = DiffusionPipeline.from_pretrained(result.model_uri, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "SiDMultistepScheduler"
    seeds = [torch.Generator().manual_seed(s) for s in (7, 8)]
    theirs = pipe(["a red cat", "a blue dog"], num_inference_steps=3, guidance_scale=1.0, generator=seeds,
                  output_type="np").images
    assert np.abs(ours - theirs).max() <= 2 / 255
    # Not the same sampler without the fresh noise: the steps after the first matter.
    one = pipe(["a red cat"], num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(7),
               output_type="np").images
    assert np.abs(ours[:1] - one).max() > 4 / 255
    # Another step count samples the pipeline's schedule for it, in both (`sidflow generate --steps 1`)
    assert np.abs(sample(gen, info, ["a red cat"], [7], steps=1).astype(np.float32) / 255 - one).max() <= 2 / 255


def test_generate_cli_writes_png(tiny_teacher, prompts, tmp_path, capsys):
    from PIL import Image

    from sidflow.cli import main

    run(_cfg(tiny_teacher, prompts, tmp_path / "run", kimg=0.002, ema_halflife_kimg=0.0))
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "a red cat", "--out", str(out),
                 "-n", "4", "--device", "cpu"]) == 0
    assert Image.open(out).size == (32, 32)  # 2×2 grid of 16² images
    for bad, match in ((["--steps", "0"], "steps=0 must be between 1 and t_init=625"), (["-n", "0"], "-n 0")):
        assert main(["generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "x", "--out",
                     str(tmp_path / "bad.png"), "--device", "cpu", *bad]) == 2
        (line,) = [e for e in capsys.readouterr().err.splitlines() if e.startswith("sidflow generate: error:")]
        assert match in line and not (tmp_path / "bad.png").exists()


def test_resume_after_sigterm_equals_uninterrupted_run(tiny_teacher, prompts, tmp_path):
    straight = _cfg(tiny_teacher, prompts, tmp_path / "straight", kimg=0.016, checkpoint_kimg=0.004)
    run(straight)
    killed = dataclasses.replace(straight, output=str(tmp_path / "killed"))
    rc, out = _sigterm_after_first_checkpoint(killed, 4)
    assert rc == 143, out[-2000:]  # stopped early, checkpointed, told the orchestrator to retry
    stopped_at = checkpoint.latest(str(tmp_path / "killed"))
    assert stopped_at is not None and not stopped_at.endswith(checkpoint.name_for(16))
    assert storage.read_manifest(str(tmp_path / "killed" / "model")) is None  # no export from a stopped run
    # A torn checkpoint (files, no manifest) with a larger number must be ignored on resume.
    torn = tmp_path / "killed" / "checkpoints" / checkpoint.name_for(999_999)
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"garbage")
    assert checkpoint.latest(str(tmp_path / "killed")) == stopped_at
    assert not run(killed).interrupted  # the same command, here in this process
    end = checkpoint.name_for(16)
    _assert_same(_weights(str(tmp_path / "straight" / "checkpoints" / end)),
                 _weights(str(tmp_path / "killed" / "checkpoints" / end)), 1e-6)
    metrics = (tmp_path / "killed" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 8  # the pre-kill lines were kept, none repeated


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_teacher, prompts, tmp_path, capfd, monkeypatch,
                                                           sharding):
    # DDP or FSDP over gloo on CPU: reducing on the last accumulation round only (method.md §8.2) must give the
    # same update as one process accumulating the whole global batch; so must FSDP's sharded Adam and EMA.
    # torchrun runs each process on one thread, so sums differ in the last bits; a large Adam ε keeps Adam's
    # first steps (≈ lr·sign(g) for tiny g) from amplifying that rounding into a different sign.
    one = _cfg(tiny_teacher, prompts, tmp_path / "one", kimg=0.008, checkpoint_kimg=0.008, batch=4, adam_eps=1e-2)
    two = dataclasses.replace(one, output=str(tmp_path / "two"), gpus="2", sharding=sharding)
    run(one)
    # The CLI and the KFP one-pod component both call launch(): gpus=2 is 2 child processes, and the result is the one
    # rank 0 reported.
    # Validated once, here: a rank that validated again would be killed at this failpoint.
    monkeypatch.setenv("SIDFLOW_FAILPOINT", "distill:validate:rank1")
    result = launch(two)
    assert ("sharded over 2 processes" in "".join(capfd.readouterr())) == (sharding == "fsdp")
    assert (result.iterations, result.kimg, result.interrupted) == (2, 0.008, False)
    assert storage.read_manifest(result.model_uri) is not None and np.isfinite(result.metrics["loss_g"])
    assert checkpoint.run_info(checkpoint.latest(str(tmp_path / "two")))["config"]["gpus"] == "2"
    lines = (tmp_path / "two" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one writer (rank 0), one line per iteration
    end = checkpoint.name_for(8)
    a, b = (checkpoint.load(str(tmp_path / run / "checkpoints" / end)) for run in ("one", "two"))
    for net in ("G", "fake", "ema"):
        _assert_same(a[net]["model"], b[net]["model"], 1e-5)
    # The exported generator is whole (gathered from the shards under FSDP) and equals the EMA.
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(str(tmp_path / "two" / "model"), subfolder="unet").state_dict()
    _assert_same(exported, b["ema"]["model"], 0.0)


def test_fsdp_resumes_a_single_process_checkpoint(tiny_teacher, prompts, tmp_path, capfd):
    # Checkpoints hold full state dicts whatever wrote them: a 2-process FSDP run resumes a 1-process run's
    # checkpoint (weights and Adam state re-sharded) and lands where the 1-process run does.
    one = _cfg(tiny_teacher, prompts, tmp_path / "one", kimg=0.008, checkpoint_kimg=0.004, batch=4, adam_eps=1e-2)
    run(one)
    half = checkpoint.name_for(4)
    storage.publish_dir(str(tmp_path / "one" / "checkpoints" / half), str(tmp_path / "two" / "checkpoints" / half))
    two = dataclasses.replace(one, output=str(tmp_path / "two"), gpus="2", sharding="fsdp")
    launch(two)
    out = "".join(capfd.readouterr())
    assert "resumed from" in out and "sharded over 2 processes" in out
    end = checkpoint.name_for(8)
    _assert_same(_weights(str(tmp_path / "one" / "checkpoints" / end)),
                 _weights(str(tmp_path / "two" / "checkpoints" / end)), 1e-5)


@pytest.mark.parametrize("change, error, match", [
    (dict(teacher="/nonexistent/teacher"), ValueError, "does not exist"),
    (dict(batch=5, micro_batch=2), ValueError, "not divisible by GPUs × micro_batch"),
    (dict(batch=0), ValueError, "batch=0 and micro_batch=1 must be at least 1"),  # 0 and -2 divide by anything
    (dict(batch=-2, micro_batch=1), ValueError, "batch=-2 and micro_batch=1 must be at least 1"),
    (dict(micro_batch=0), ValueError, "micro_batch=0 must be at least 1"),
    (dict(kappa=25.0), ValueError, "kappa_1=25.0 is outside"),
    (dict(kappa_4=-1.0), ValueError, "kappa_4=-1.0 is outside"),
    (dict(guidance="anti_cfg", kappa=0.5), ValueError, "must be negative"),
    (dict(steps=0), ValueError, "steps=0"),
    (dict(clip_grad_value=0.0), ValueError, r"clip_grad_value=0.0 must be positive \(None: no clipping\)"),
])
def test_bad_inputs_fail_fast_in_one_line(tiny_teacher, prompts, tmp_path, change, error, match):
    with pytest.raises(error, match=match) as info:
        validate(_cfg(tiny_teacher, prompts, tmp_path / "out", **change))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "config.json").exists()


def test_empty_prompt_file_and_unwritable_output(tiny_teacher, prompts, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        validate(_cfg(tiny_teacher, str(empty), tmp_path / "out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        validate(_cfg(tiny_teacher, prompts, blocker / "out"))


def test_batch_split_is_checked_against_the_gpu_count(tiny_teacher, prompts, tmp_path):
    with pytest.raises(ValueError, match="2 × 3"):
        validate(_cfg(tiny_teacher, prompts, tmp_path / "out", batch=8, micro_batch=3), world_size=2)


def test_cli_dry_run_prints_config_and_trains_nothing(tiny_teacher, prompts, tmp_path, capsys):
    from sidflow.cli import main

    cfg = _cfg(tiny_teacher, prompts, tmp_path / "dry")
    assert main(_cli(cfg, "--dry-run")[3:]) == 0
    assert '"t_init": 625' in capsys.readouterr().out
    assert not (tmp_path / "dry" / "checkpoints").exists()
    assert main(["distill", "--teacher", tiny_teacher, "--prompts", prompts, "--output", str(tmp_path / "x"),
                 "--batch", "3", "--micro-batch", "2"]) == 2
    assert "sidflow distill: error: batch=3 is not divisible" in capsys.readouterr().err


def test_s3_output_round_trip(tiny_teacher, prompts, s3_bucket, tmp_path):
    cfg = _cfg(tiny_teacher, prompts, s3_bucket + "/runs/r1", kimg=0.004)
    result = run(cfg)
    assert result.model_uri == s3_bucket + "/runs/r1/model"
    assert storage.read_manifest(result.model_uri) is not None
    assert checkpoint.latest(cfg.output) == s3_bucket + "/runs/r1/checkpoints/" + checkpoint.name_for(4)
    assert storage.exists(s3_bucket + "/runs/r1/config.json")


def test_prompts_from_parquet_and_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sidflow.prompts import read_prompts

    pq.write_table(pa.table({"prompt": ["a cat", None, "  a dog ", ""]}), tmp_path / "p.parquet")
    assert read_prompts(str(tmp_path / "p.parquet")) == ["a cat", "a dog"]
    pq.write_table(pa.table({"text_en": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'prompt' or 'caption' column"):
        read_prompts(str(tmp_path / "bad.parquet"))
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]


def test_sigterm_to_a_multi_process_launch_checkpoints_and_resumes(tiny_teacher, prompts, tmp_path):
    # A preempted multi-GPU pod: SIGTERM reaches the launching process, which forwards it to every rank; they stop at
    # the same iteration, publish a checkpoint, and the launch exits 143. The same command then finishes the run.
    one = _cfg(tiny_teacher, prompts, tmp_path / "one", kimg=0.016, checkpoint_kimg=0.004, batch=4, adam_eps=1e-2)
    run(one)
    two = dataclasses.replace(one, output=str(tmp_path / "two"), gpus="2")
    rc, out = _sigterm_after_first_checkpoint(two, 4)
    assert rc == 143, out[-3000:]
    stopped_at = checkpoint.latest(str(tmp_path / "two"))
    assert stopped_at is not None and not stopped_at.endswith(checkpoint.name_for(16))
    assert not launch(two).interrupted
    end = checkpoint.name_for(16)
    _assert_same(_weights(str(tmp_path / "one" / "checkpoints" / end)),
                 _weights(str(tmp_path / "two" / "checkpoints" / end)), 1e-5)


@pytest.mark.parametrize("guidance, kappa, kappa_2, kappa_4, dropped", [
    ("lsg", 1.5, 1.5, 1.5, 4),       # the fake step's 2 rounds x 2 iterations drop prompts; the generator step never
    ("long", 3.0, 1.0, 3.0, 0),      # κ4 on the teacher, the fake unguided: no dropout
    ("zero_cfg", 1.0, 0.0, 1.0, 0),  # an unconditional fake never sees c: no dropout (method.md §6.3)
    ("anti_cfg", -1.0, -1.0, 1.0, 4),
])
def test_the_loop_passes_each_kappa_to_its_network_and_drops_prompts_in_the_fake_step_only(
        tiny_teacher, prompts, tmp_path, monkeypatch, guidance, kappa, kappa_2, kappa_4, dropped):
    # Spies on the loop's own calls (every LSG test has κ2 = κ4, so a swap at the call site passed them all).
    from sidflow.train import loop

    seen, drops = [], []
    real_loss, real_drop = loop.generator_step_loss, loop.drop_prompts

    def spy_loss(*args, **kwargs):
        seen.append((kwargs["kappa_2"], kwargs["kappa_4"]))
        return real_loss(*args, **kwargs)

    def spy_drop(c, null, p, **kwargs):
        drops.append(p)
        return real_drop(c, null, p, **kwargs)

    monkeypatch.setattr(loop, "generator_step_loss", spy_loss)
    monkeypatch.setattr(loop, "drop_prompts", spy_drop)
    run(_cfg(tiny_teacher, prompts, tmp_path / "run", kimg=0.004, guidance=guidance, kappa=kappa, checkpoints=False))
    assert set(seen) == {(kappa_2, kappa_4)} and len(seen) == 4  # 2 rounds x 2 iterations
    assert len(drops) == dropped and all(p == 0.1 for p in drops)


@pytest.mark.parametrize("norms", ["fp32", "autocast"])
def test_in_bf16_the_frozen_teacher_and_the_fake_start_as_the_same_function(prompts, tmp_path, norms):
    # The teacher is stored in bf16 (no master copy) while the fake keeps fp32 weights that autocast casts at each
    # forward; the norms, which autocast runs in fp32, keep the teacher's fp32 weights, so both agree bit for bit at
    # step 0 (with bf16-rounded norm weights they did not). The bundled toy teacher is trained: its norm weights are
    # not the 1s and 0s of a fresh init, which bf16 holds exactly. With norms=autocast both cast them alike.
    from sidflow.demo import TOY_TEACHER
    from sidflow.stages.distill import networks

    nets, data = networks(_cfg(str(TOY_TEACHER), prompts, tmp_path / "run", precision="bf16", norms=norms),
                          torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, *nets.shape, generator=g), torch.tensor([100, 800]), data.encode(torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nets.teacher(x, t, c), nets.score(nets.fake)(x, t, c))


@pytest.mark.parametrize("guidance, kappa", [
    ("lsg", 1.5),  # the teacher runs twice
    ("long", 3.0),  # the fake runs twice (one forward, the teacher's CFG is two)
])
def test_split_generator_backward_gives_the_loop_the_joint_gradients(tiny_teacher, prompts, tmp_path,
                                                                     grads_before_clipping, guidance, kappa):
    # method.md §4: the loop's split path (2 accumulation rounds, the NaN drop, the division by the batch) leaves G
    # the gradients the joint path does, and logs the same loss. Adam would hide a wrong scale: compare the grads.
    # (fp32: accelerate's precision is fixed per process; test_method checks the split path under bf16 autocast.)
    seen = grads_before_clipping  # per iteration: the fake's, then G's
    got = {}
    for mode in ("joint", "split"):
        seen.clear()
        result = run(_cfg(tiny_teacher, prompts, tmp_path / mode, kimg=0.002, guidance=guidance, kappa=kappa,
                          generator_backward=mode, checkpoints=False))
        got[mode] = result.metrics["loss_g"], seen[1]
    (loss_joint, joint), (loss_split, split) = got["joint"], got["split"]
    assert loss_split == pytest.approx(loss_joint, rel=1e-6)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(split, joint))
    assert worst < 1e-4, worst  # of each tensor's largest gradient


def test_compiled_blocks_keep_the_state_dict_keys_and_a_copy_runs_its_own_weights():
    import copy

    from diffusers import UNet2DConditionModel

    from sidflow.teacher import REPEATED_BLOCKS, compile_blocks
    from sidflow.toy.tiny import tiny_configs

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_configs()["unet"]).eval()
    keys = list(unet.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        eager = unet(x, t, c).sample
        assert compile_blocks(unet, backend="eager") == 12  # the tiny UNet: 8 resnet blocks, 4 transformer blocks
        assert all(m._compiled_call_impl is not None for m in unet.modules() if type(m).__name__ in REPEATED_BLOCKS)
        torch.testing.assert_close(unet(x, t, c).sample, eager, rtol=0, atol=0)
        assert list(unet.state_dict()) == keys  # no `_orig_mod.`: checkpoints, export and FSDP see the same names
        ema = copy.deepcopy(unet)
        assert list(ema.state_dict()) == keys and all(m._compiled_call_impl is None for m in ema.modules())
        for p in ema.parameters():
            p.mul_(0.5)
        assert not torch.allclose(ema(x, t, c).sample, eager)  # its own weights, not the compiled original's


def test_a_compiled_run_trains_checkpoints_exports_and_resumes_as_an_eager_one(tiny_teacher, prompts, tmp_path,
                                                                              monkeypatch):
    # compile=True on the stage: the three UNets compiled in place (dynamo's eager backend here: inductor on a CPU
    # takes minutes) train as the uncompiled ones do, and the checkpoints (G, fake, EMA) and the export keep the
    # teacher's keys, so a compiled run resumes an eager one's checkpoint and vice versa.
    import functools

    from diffusers import UNet2DConditionModel

    from sidflow import teacher as teacher_module
    from sidflow.generator import load_generator

    compiled = []
    real = teacher_module.compile_blocks

    def spy(unet):
        compiled.append(real(unet, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(teacher_module, "compile_blocks", functools.partial(spy))
    eager = run(_cfg(tiny_teacher, prompts, tmp_path / "eager", kimg=0.004))
    half = _cfg(tiny_teacher, prompts, tmp_path / "compiled", kimg=0.002, compile=True)
    run(half)
    assert compiled == [12, 12, 12]  # G, the fake and the teacher
    result = run(dataclasses.replace(half, kimg=0.004))  # resumes its own checkpoint, compiled again
    assert result.metrics["loss_g"] == pytest.approx(eager.metrics["loss_g"], rel=1e-6)
    keys = set(UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet").state_dict())
    end = checkpoint.load(checkpoint.latest(str(tmp_path / "compiled")))
    for net in ("G", "fake", "ema"):
        assert set(end[net]["model"]) == keys, net
    _assert_same(end["G"]["model"], _weights(checkpoint.latest(str(tmp_path / "eager"))), 1e-6)
    gen, _ = load_generator(result.model_uri)
    assert set(gen.unet.state_dict()) == keys
