"""Stage `distill`: data-free one-step SiD-LSG distillation of a teacher (method.md §1–§5, §8).

`run(cfg)` validates everything a user can get wrong, writes config.json to the output, builds the networks (G
and the fake score network start as copies of the teacher's UNet) and the prompt conditions, trains them with
the one loop in `sidflow.train.loop` and publishes checkpoints and the exported generator under `cfg.output`.
"""

import json
import math
import os
import uuid
from dataclasses import dataclass
from typing import Literal

from sidflow import storage
from sidflow.config import override, param, to_dict, to_json
from sidflow.method.guidance import resolved_kappas
from sidflow.train.result import DistillResult, total_images  # noqa: F401  (the stage's result and length)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = param("", "teacher URI (a published diffusers SD1.5/SD2.1-base/SDXL directory, local or s3://)",
                         required=True)
    prompts: str = param("", "training prompts URI: .txt (one per line) or .parquet with a 'prompt' column",
                         required=True)
    output: str = param("", "run URI: config.json, checkpoints/, logs/ and model/ are written under it", required=True)
    guidance: Literal["lsg", "long", "short", "zero_cfg", "anti_cfg"] = param(
        "lsg", "κ preset: lsg = κ everywhere, long = teacher only, short = fake training only (method.md §3)")
    kappa: float = param(1.5, "guidance scale κ of the preset; released SD1.5 models use 1.5, 2, 3, 4.5 (§3, §7.2)")
    kappa_1: float | None = param(None, "override κ1: CFG on the fake network while it is trained (§3)")
    kappa_2: float | None = param(None, "override κ2 (= κ3): CFG on the fake network inside the generator loss (§3)")
    kappa_4: float | None = param(None, "override κ4: CFG on the teacher inside the generator loss (§3)")
    null_prompt: Literal["auto", "empty", "zeros"] = param(
        "auto", "∅ for CFG and dropout: encoding of '' or zeros; auto = the teacher's force_zeros_for_empty_prompt "
        "(zeros for SDXL, '' for SD1.5/2.1) (§3, §6.4)")
    alpha: float = param(1.0, "α of the SiD generator loss; 1.0 for SD (method.md §4)")
    t_min: int = param(20, "smallest diffusion time t drawn for both losses (§1)")
    t_max: int = param(980, "t is drawn from {t_min..t_max-1} (§1)")
    t_init: int = param(625, "generator start time; 0.9286·z is fed at t=625 (§1, §2)")
    steps: int = param(1, "generator steps K; 1 is one-step SiD-LSG (§6.1)")
    fake_dropout: float = param(0.1, "prompt dropout to '' in the fake step when κ1 or κ2 is not 1 (§3)")
    lr_fake: float = param(1e-6, "Adam learning rate of the fake score network (§5)")
    lr_g: float = param(1e-6, "Adam learning rate of the generator (§5)")
    adam_beta1: float = param(0.0, "Adam β1 (§5)")
    adam_beta2: float = param(0.999, "Adam β2 (§5)")
    adam_eps: float = param(1e-8, "Adam ε (§5)")
    batch: int = param(512, "global batch per phase (prompts per fake step and per generator step) (§5)")
    micro_batch: int = param(1, "samples per GPU per accumulation round (--batch-gpu in the reference code)")
    kimg: float = param(10000.0, "training length in thousands of generator images (SiD-LSG's SD runs: 10 Mimg)")
    precision: Literal["bf16", "fp32"] = param(
        "bf16", "bf16 = autocast over fp32 master weights; fp32 = paper-faithful (TF32 off unless tf32) (§5, §8)")
    tf32: bool = param(False, "allow TF32 matmuls in fp32 mode (off in the reference code)")
    grad_checkpointing: bool = param(False, "gradient checkpointing in the generator, fake and teacher UNets")
    compile: bool = param(False, "torch.compile the repeated blocks of the generator, fake and teacher UNets (resnet "
                                 "and transformer blocks, in place); the first iterations pay the compile time, which "
                                 "for SD1.5 on an H200 outlasted a 560 s benchmark, so no speed-up is measured "
                                 "yet (docs/benchmarks.md)")
    channels_last: bool = param(False, "keep the UNets' convolution weights and activations NHWC on a GPU; off = NCHW, "
                                       "faster with torch's CUDA GroupNorm, which has no NHWC kernel and converts "
                                       "the layout both ways (docs/benchmarks.md)")
    norms: Literal["fp32", "autocast"] = param(
        "fp32", "GroupNorm/LayerNorm under precision bf16: fp32 = autocast's own rule (the norm and the activation "
                "after it in fp32); autocast = in bf16, statistics accumulated in fp32: 1.14x the images/s and less "
                "activation memory, but worse four-step toy FID in every pair measured (docs/benchmarks.md); "
                "fp32 runs are unaffected (method.md §8.1)")
    generator_backward: Literal["joint", "split"] = param(
        "joint", "joint = one backward through teacher and fake; split = one network's graph at a time, the same "
                 "gradient for less activation memory and one more forward of the cheaper network (method.md §4)")
    clip_grad_value: float | None = param(None, "clip each gradient value to ±this after nan_to_num (off for SD)")
    ema_halflife_kimg: float = param(50.0, "EMA half-life in kimg; 0 turns EMA off (--ema 0.05 = 50 kimg, §5)")
    ema_rampup: float = param(0.05, "EMA ramp-up: half-life = min(half-life, rampup · images seen) (§5)")
    checkpoint_kimg: float = param(100.0, "publish a checkpoint every this many kimg (and on SIGTERM or Ctrl-C)")
    keep_checkpoints: int = param(3, "keep the newest N complete checkpoints; older ones are deleted once a new one "
                                     "is published (an SD1.5 checkpoint is ~24 GB)")
    log_every: int = param(1, "write a metrics line every this many iterations")
    checkpoints: bool = param(True, "publish checkpoints; off only for benchmarks and smoke runs (no resume)")
    profile: bool = param(False, "time each phase of an iteration (synchronizes the GPU: slower)")
    seed: int = param(0, "random seed; every draw of iteration i derives from (seed, i, rank)")
    sharding: Literal["ddp", "fsdp"] = param(
        "ddp", "ddp = a full replica per GPU; fsdp = parameters, grads and Adam state sharded (FSDP2), needed for SDXL "
               "on 80 GB GPUs")
    gpus: str = param("1", "GPUs to use: a count or 'all' (one process per GPU); in the pipeline a count: the GPUs "
                           "each distill pod requests")
    resume: bool = param(True, "resume from the newest complete checkpoint under output, if any")


KAPPA_RANGE = (0.0, 20.0)
MAX_SEED = 999_999  # the loop's RNG keys multiply the seed by ~4e12: larger seeds overflow torch's 64-bit seed
# Fields that change what a run computes: a checkpoint written under other values belongs to another run. The rest
# (length, logging, placement, and how the same gradients are computed: grad_checkpointing, compile,
# generator_backward, channels_last) may change between a run and its resume: kimg extends a run, gpus re-shards it
# (the draws are keyed by global micro-batch index, so 1 and N GPUs see the same ones, and micro_batch is kept).
NOT_IDENTITY = ("teacher", "output", "kimg", "checkpoint_kimg", "keep_checkpoints", "log_every", "checkpoints",
                "profile", "gpus", "resume", "sharding", "grad_checkpointing", "compile", "generator_backward",
                "channels_last")


def validate(cfg: DistillConfig, world_size: int = 1, fetch_teacher: bool = True) -> None:
    """Raise a one-line error for any user mistake, before a model is loaded or a GPU touched. Without
    `fetch_teacher` an s3:// teacher is only checked to be published (its manifest): the process that starts a
    TrainJob validates for its nodes, each of which fetches the teacher and checks its files as it loads it."""
    from sidflow import failpoints
    from sidflow.teacher import TeacherError, check_teacher_dir, materialize

    failpoints.hit(f"distill:validate:rank{os.environ['RANK']}" if "RANK" in os.environ else "distill:validate")

    for name in ("teacher", "prompts", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is empty: it must be a URI")
    check_values(cfg, world_size)
    if fetch_teacher or not storage.is_s3(cfg.teacher):
        check_teacher_dir(materialize(cfg.teacher))
    elif storage.read_manifest(cfg.teacher) is None:
        raise TeacherError(f"teacher {cfg.teacher} has no manifest.json: publish it with `sidflow download-teacher`")
    from sidflow.prompts import read_prompts

    read_prompts(cfg.prompts)
    _check_writable(cfg.output)


def check_values(cfg: DistillConfig, world_size: int = 1) -> None:
    """The part of `validate` that reads nothing: a one-line error for any value out of range. `sidflow pipeline
    submit` runs it on a run's parameters, so a bad value is refused before the run starts, not in its distill pod."""
    k = resolved_kappas(cfg)
    lo = -5.0 if cfg.guidance == "anti_cfg" else KAPPA_RANGE[0]
    for name, value in k.items():
        if not (lo <= value <= KAPPA_RANGE[1]) or math.isnan(value):
            raise ValueError(f"{name}={value} is outside [{lo}, {KAPPA_RANGE[1]}] for guidance={cfg.guidance!r}")
    if cfg.guidance == "anti_cfg" and k["kappa_2"] >= 0:
        raise ValueError(f"kappa={cfg.kappa} must be negative for guidance='anti_cfg' (method.md §6.3)")
    if not 0 <= cfg.t_min < cfg.t_max <= 1000 or not 0 < cfg.t_init < 1000:
        raise ValueError(f"t_min={cfg.t_min}, t_max={cfg.t_max}, t_init={cfg.t_init} must satisfy "
                         "0 ≤ t_min < t_max ≤ 1000 and 0 < t_init < 1000")
    if cfg.steps < 1 or cfg.steps > cfg.t_init:
        raise ValueError(f"steps={cfg.steps} must be between 1 and t_init={cfg.t_init}")
    if cfg.batch < 1 or cfg.micro_batch < 1:  # 0 % n is 0 too: without this a run would load, then divide by zero
        raise ValueError(f"batch={cfg.batch} and micro_batch={cfg.micro_batch} must be at least 1")
    if cfg.batch % (world_size * cfg.micro_batch):
        raise ValueError(f"batch={cfg.batch} is not divisible by GPUs × micro_batch = {world_size} × {cfg.micro_batch}")
    if not 0 <= cfg.fake_dropout < 1:
        raise ValueError(f"fake_dropout={cfg.fake_dropout} must be in [0, 1)")
    if cfg.clip_grad_value is not None and not cfg.clip_grad_value > 0:
        raise ValueError(f"clip_grad_value={cfg.clip_grad_value} must be positive (None: no clipping)")
    for name in ("kimg", "lr_g", "lr_fake", "adam_eps"):
        _positive(cfg, name)
    for name in ("alpha", "kappa"):
        if not math.isfinite(getattr(cfg, name)):
            raise ValueError(f"{name}={getattr(cfg, name)} must be a finite number")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be in [0, 1)")
    for name in ("ema_halflife_kimg", "ema_rampup"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ValueError(f"{name}={getattr(cfg, name)} must be a finite number ≥ 0 (ema_halflife_kimg 0: no EMA)")
    if not (math.isfinite(cfg.checkpoint_kimg) and cfg.checkpoint_kimg * 1000 >= 1):
        raise ValueError(f"checkpoint_kimg={cfg.checkpoint_kimg} must be at least 0.001 (one image)")
    if cfg.log_every < 1 or cfg.keep_checkpoints < 1:
        raise ValueError(f"log_every={cfg.log_every} and keep_checkpoints={cfg.keep_checkpoints} must be at least 1")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ValueError(f"seed={cfg.seed} must be in [0, {MAX_SEED}] (it is mixed into per-iteration RNG keys)")


def _positive(cfg: DistillConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value} must be a positive finite number")


def _check_writable(uri: str) -> None:
    # Nothing is created here: a local output is checked on its nearest existing parent, an S3 one with a probe
    # object that is deleted at once.
    if not storage.is_s3(uri):
        path = os.path.abspath(storage.local_path(uri))
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"output={uri!r} is not writable ({path} is not a writable directory)")
        return
    probe = storage.join(uri, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"ok")
    except OSError as e:
        raise PermissionError(f"output={uri!r} is not writable: {e}") from None
    storage.delete_file(probe)


def identity(cfg: DistillConfig, teacher_fingerprint: str | None) -> dict:
    """Return what a checkpoint must match to be resumed by `cfg`: the math fields and the teacher's content."""
    fields = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY}
    return {**fields, "teacher": teacher_fingerprint or cfg.teacher}


def _recorded_identity(info: dict, cls: type = DistillConfig) -> dict:
    # The identity of the run a checkpoint's run.json or a model's sidflow.json records ("unpublished": the loop's
    # word for a teacher it could not fingerprint, which then counts by its URI), read as a `cls` config.
    fields = {k: v for k, v in info.get("config", {}).items() if k in cls.__dataclass_fields__}
    trained_on = info.get("teacher_fingerprint")
    return identity(override(cls(), fields), None if trained_on == "unpublished" else trained_on)


def check_resume(cfg: DistillConfig) -> None:
    """Refuse, in one line, to continue a checkpoint under cfg.output that another run wrote (another teacher, κ,
    batch, learning rate...); a resume may change only length, logging and placement (NOT_IDENTITY)."""
    from sidflow.teacher import fingerprint
    from sidflow.train import checkpoint

    last = checkpoint.latest(cfg.output) if cfg.resume else None
    info = checkpoint.run_info(last) if last else None
    if info is None:
        return
    ours = identity(cfg, fingerprint(cfg.teacher))
    theirs = _recorded_identity(info, type(cfg))
    changed = [f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in ours if ours[k] != theirs.get(k)]
    if changed:
        raise ValueError(f"output={cfg.output!r} holds a checkpoint of another run ({'; '.join(changed)}); use a new "
                         "output, restore those values to resume it, or pass --no-resume to start over in place")


def finished(cfg: DistillConfig) -> DistillResult | None:
    """Return the result of the run already exported under cfg.output if it is this run, trained to its end."""
    from sidflow.generator import INFO_FILE
    from sidflow.teacher import fingerprint

    model_uri = storage.join(cfg.output, "model")
    manifest = storage.read_manifest(model_uri) if cfg.resume else None
    if manifest is None or INFO_FILE not in {f["path"] for f in manifest["files"]}:
        return None
    info = json.loads(storage.read_text(storage.join(model_uri, INFO_FILE)))
    same = _recorded_identity(info, type(cfg)) == identity(cfg, fingerprint(cfg.teacher))
    if not same or info.get("nimg") != total_images(cfg):
        return None
    return DistillResult(model_uri=model_uri, kimg=info["nimg"] / 1000, iterations=info["nimg"] // cfg.batch,
                         interrupted=False, metrics=info.get("metrics", {}))


def check(cfg: DistillConfig, world: int, fetch_teacher: bool = True) -> None:
    """Everything a run checks before it trains: the inputs (validate) and whose checkpoints it would resume."""
    validate(cfg, world_size=world, fetch_teacher=fetch_teacher)
    check_resume(cfg)


def run(cfg: DistillConfig) -> DistillResult:
    """Validate, record config.json, train, export; return where the generator is and what was measured."""
    from sidflow.launch import checked
    from sidflow.train.loop import device, train

    if not checked():  # a rank of run_per_gpu: the launching process checked (once, not once per GPU)
        check(cfg, world_size())
    done = finished(cfg)
    if done is not None:  # a re-run of a finished command (or a retry after its export) is a no-op
        return done
    storage.write_text(storage.join(cfg.output, "config.json"), to_json(cfg))
    return train(cfg, *networks(cfg, device()))


def networks(cfg: DistillConfig, device, teacher=None):
    """Return the loop's Networks and Conditions for cfg on `device`: G and the fake score network are full copies
    of the frozen teacher UNet (method.md §2); the conditions are the training prompts' text embeddings. `teacher`:
    the teacher already loaded on `device` (else it is loaded here)."""
    import copy

    import torch

    from sidflow.generator import export_generator, generator_info
    from sidflow.method.vp import VP
    from sidflow.prompts import read_prompts
    from sidflow.teacher import autocast_norms, compile_blocks, fingerprint, load_teacher, score_net
    from sidflow.train.loop import Conditions, Networks

    teacher = teacher or load_teacher(cfg.teacher, device, null=cfg.null_prompt)
    prompts = read_prompts(cfg.prompts)
    if device.type == "cuda" and cfg.channels_last:  # NHWC convolutions need no layout transposes
        teacher.unet.to(memory_format=torch.channels_last)
    G, fake = copy.deepcopy(teacher.unet), copy.deepcopy(teacher.unet)
    if cfg.precision == "bf16":  # frozen, so no master copy: autocast would cast it to bf16 at every forward
        # The norms keep their fp32 weights, as the fake's are at every forward (autocast casts the weights of
        # convolutions and matmuls only), so that at step 0 teacher and fake compute the same function.
        for m in teacher.unet.modules():
            if not isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(torch.bfloat16)
    if cfg.grad_checkpointing:  # diffusers checkpoints only modules in train mode; the teacher has no dropout
        for m in (G, fake, teacher.unet):
            m.enable_gradient_checkpointing()
            m.train()
    if cfg.norms == "autocast":  # teacher, G and the fake alike, so that at step 0 teacher and fake still agree
        for m in (G, fake, teacher.unet):
            autocast_norms(m)
    if cfg.compile:  # after the copies: a deepcopy comes out uncompiled (so does G's EMA, which never runs)
        for m in (G, fake, teacher.unet):
            compile_blocks(m)
    model_uri = storage.join(cfg.output, "model")

    def export(unet, nimg: int, weights: str, metrics: dict) -> None:
        export_generator(unet, teacher, model_uri, generator_info(cfg, nimg, weights, metrics))

    nets = Networks(G=G, fake=fake, teacher=score_net(teacher.unet), score=score_net,
                    vp=VP(teacher.a, teacher.s).to(device), null=teacher.null().to(device),  # [1, 77, D]: "" (§3)
                    shape=teacher.latent_shape, export=export, fingerprint=fingerprint(cfg.teacher),
                    template=teacher.unet)
    return nets, Conditions(len(prompts), lambda idx: teacher.encode([prompts[i] for i in idx]))


def launch(cfg: DistillConfig) -> DistillResult:
    """Run the stage on `cfg.gpus` GPUs: in this process for one (or inside a torchrun launch), else as one child
    process per GPU; return the result rank 0 reported. Used by the CLI and the one-pod KFP component alike."""
    from sidflow.launch import per_gpu

    # A SIGTERM'd run checkpoints and reports interrupted=True; torchrun then exits non-zero, which is expected.
    return per_gpu("distill", cfg, run, check, DistillResult,
                   finished=lambda rc, result: rc == 0 or result["interrupted"])


def launch_with_retries(cfg: DistillConfig, retries: int, command: str = "distill", checker=None) -> DistillResult:
    """Validate here, then run the stage as child processes (one per GPU), starting them again up to `retries` times
    after a crash (a killed or failed process): each attempt resumes from the newest checkpoint. User errors are
    found by the validation and never retried; an interrupted run (SIGTERM: the pod is going away) is returned.
    `command` and `checker`: the finetune stage's (default: this stage's `check`), through the same loop."""
    import sys

    from sidflow.launch import gpu_count, run_per_gpu

    n = gpu_count(cfg.gpus)
    (checker or check)(cfg, n)
    for attempt in range(retries + 1):
        rc, result = run_per_gpu(command, cfg, n)
        if result is not None and (rc == 0 or result["interrupted"]):
            return DistillResult(**result)
        print(f"{command}: attempt {attempt + 1} of {retries + 1} ended with exit code {rc}"
              + ("; starting again from the newest checkpoint" if attempt < retries else ""), file=sys.stderr)
    raise RuntimeError(f"{command} failed {retries + 1} times (last exit code {rc}); the lines above say why")


def world_size() -> int:
    """Return the number of processes of this launch (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def summary(result: DistillResult) -> str:
    """Return the one-line JSON summary the CLI prints."""
    return json.dumps({"model": result.model_uri, "kimg": round(result.kimg, 3), "iterations": result.iterations,
                       "interrupted": result.interrupted, **dict(sorted(result.metrics.items()))})
