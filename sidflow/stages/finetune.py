"""Stage `finetune`: few-step SiD with the adversarial term on real text-image pairs (method.md §6).

The distill stage's run with three additions: the generator and the fake score network may start from a distill
run (`init`: its exported generator and its newest checkpoint's fake network), the real pairs at `data` are encoded
once into latents and text embeddings under the output, and the loop adds the Diffusion-GAN term whose
discriminator is the fake network's encoder (no new parameters). Checkpoints, resume, export and DDP/FSDP are the
distill stage's, through the same loop.
"""

import json
import math
from dataclasses import dataclass

from sidflow import storage
from sidflow.config import param, to_json
from sidflow.stages import distill
from sidflow.stages.distill import DistillConfig
from sidflow.train.result import DistillResult

MAX_STEPS = 8


@dataclass(frozen=True)
class FinetuneConfig(DistillConfig):
    steps: int = param(4, f"generator steps K (1..{MAX_STEPS}); each iteration trains one k ~ U{{1..K}} (§6.1)")
    kimg: float = param(1000.0, "training length in thousands of generator images")
    init: str = param("", "distill run URI (its output, or its model/) to start from: G from its exported generator, "
                          "the fake network from its newest checkpoint; '' starts both from the teacher")
    data: str = param("", "real text-image pairs: parquet shards ('image' bytes, 'caption') at a URI, as "
                          "`sidflow data pack` writes them (§6.2)", required=True)
    adv_weight: float = param(0.01, "λ_adv: the generator loss is ½ L_SiD + ½ λ_adv L_adv; sweep 1e-3..1e-2 (§6.2)")
    disc_weight: float = param(1.0, "λ_D: the fake step adds λ_D L_D to its score loss (§6.2); with adv_weight 0 "
                                    "too, the run has no adversarial term (a control: few-step SiD alone)")
    gan_start_kimg: float = param(0.0, "the adversarial terms start after this many kimg (the fake first fits G; "
                                       "0 when init is a distill run whose fake already does)")
    adv_rampup_kimg: float = param(0.0, "λ_adv rises linearly from 0 over this many kimg after gan_start_kimg")
    gan_clip: float = param(1.0, "clip each gradient value of the fake step to ±this while the GAN is on (§6.2)")


def validate(cfg: FinetuneConfig, world_size: int = 1, fetch_teacher: bool = True) -> None:
    """Raise a one-line error for any user mistake, before a model is loaded or a GPU touched."""
    from sidflow.pairs import check_shards

    if not cfg.data:
        raise ValueError("data is empty: it must be the URI of real text-image pairs (sidflow data pack)")
    _check_own_values(cfg)
    distill.validate(cfg, world_size, fetch_teacher)  # distill's value checks, then the teacher, prompts, output
    check_shards(cfg.data)
    if cfg.init:
        _check_init(cfg)


def check_values(cfg: FinetuneConfig, world_size: int = 1) -> None:
    """The part of `validate` that reads nothing (see distill.check_values)."""
    _check_own_values(cfg)
    distill.check_values(cfg, world_size)


def _check_own_values(cfg: FinetuneConfig) -> None:
    if not 1 <= cfg.steps <= MAX_STEPS:
        raise ValueError(f"steps={cfg.steps} must be between 1 and {MAX_STEPS}")
    for name in ("adv_weight", "disc_weight", "gan_start_kimg", "adv_rampup_kimg"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value} must be a finite number ≥ 0")
    if not (math.isfinite(cfg.gan_clip) and cfg.gan_clip > 0):
        raise ValueError(f"gan_clip={cfg.gan_clip} must be a positive finite number")


def init_run(init: str) -> str:
    """Return the distill run URI `init` names: the run itself, or its model/ (what the distill task returns)."""
    return init.rstrip("/").rsplit("/", 1)[0] if _export_info(init) is not None else init


def _export_info(model: str) -> dict | None:
    # The sidflow.json of the generator published at `model`, or None where there is none.
    from sidflow.generator import INFO_FILE

    manifest = storage.read_manifest(model)
    if manifest is None or INFO_FILE not in {f["path"] for f in manifest["files"]}:
        return None
    return json.loads(storage.read_text(storage.join(model, INFO_FILE)))


def _check_init(cfg: FinetuneConfig) -> None:
    # The distill run must have finished its export, from the same teacher.
    from sidflow.teacher import fingerprint

    info = _export_info(storage.join(init_run(cfg.init), "model"))
    if info is None:
        raise ValueError(f"init={cfg.init!r} holds no exported generator (model/ with its manifest): pass the output "
                         "of a finished distill run")
    ours, theirs = fingerprint(cfg.teacher), info.get("teacher_fingerprint")
    # Teachers count by content where both were published, else by URI (the loop's rule for a resume).
    same = ours == theirs if ours and theirs != "unpublished" else info.get("teacher") == cfg.teacher
    if not same:
        raise ValueError(f"init={cfg.init!r} was distilled from teacher {info.get('teacher')!r} "
                         f"({info.get('teacher_fingerprint')}), not from teacher={cfg.teacher!r} ({ours})")


def check(cfg: FinetuneConfig, world: int, fetch_teacher: bool = True) -> None:
    """Everything a run checks before it trains (distill.check's, with the pairs and the init run)."""
    validate(cfg, world_size=world, fetch_teacher=fetch_teacher)
    distill.check_resume(cfg)


def run(cfg: FinetuneConfig) -> DistillResult:
    """Validate, record config.json, encode the pairs once, train with the adversarial term, export."""
    from accelerate import PartialState

    from sidflow.launch import checked
    from sidflow.pairs import cache_key, encoded
    from sidflow.teacher import fingerprint, load_teacher, unet_logits
    from sidflow.train.loop import GAN, device, train

    if not checked():
        check(cfg, distill.world_size())
    done = distill.finished(cfg)
    if done is not None:
        return done
    state = PartialState()
    if state.is_main_process:
        storage.write_text(storage.join(cfg.output, "config.json"), to_json(cfg))
    dev = device()
    teacher = load_teacher(cfg.teacher, dev, null=cfg.null_prompt)
    gan = None
    if cfg.adv_weight > 0 or cfg.disc_weight > 0:
        key = cache_key(cfg.data, fingerprint(cfg.teacher), cfg.teacher)
        pairs = encoded(teacher, cfg.data, storage.join(cfg.output, "pairs"), key, state.process_index,
                        state.num_processes, state.wait_for_everyone)
        gan = GAN(real=pairs.real, size=pairs.size, adv_weight=cfg.adv_weight, disc_weight=cfg.disc_weight,
                  gan_start_kimg=cfg.gan_start_kimg, adv_rampup_kimg=cfg.adv_rampup_kimg, gan_clip=cfg.gan_clip)
    elif state.is_main_process:  # a control: the same start and schedule, none of the GAN's compute or clipping
        print("finetune: adv_weight and disc_weight are 0, so no adversarial term: few-step SiD alone")
    nets, conditions = distill.networks(cfg, dev, teacher)
    if cfg.init:
        _load_init(cfg, nets)
    if gan is not None:
        nets.disc = unet_logits
    return train(cfg, nets, conditions, gan)


def _load_init(cfg: FinetuneConfig, nets) -> None:
    # G: the distill run's exported weights (its EMA); the fake: its newest checkpoint's, when it kept one. A resume
    # of this run then replaces both with its own checkpoint (the loop loads it after this).
    from sidflow.generator import load_generator
    from sidflow.train import checkpoint

    run_uri = init_run(cfg.init)
    gen, _ = load_generator(storage.join(run_uri, "model"))
    nets.G.load_state_dict(gen.unet.state_dict())
    del gen
    found = checkpoint.load_latest(run_uri)
    if found is None:
        print(f"finetune: {run_uri} kept no checkpoint; the fake network starts from the teacher")
        return
    nets.fake.load_state_dict(found[1]["fake"]["model"])


def launch(cfg: FinetuneConfig) -> DistillResult:
    """Run the stage on `cfg.gpus` GPUs (one process each), as distill.launch does."""
    from sidflow.launch import per_gpu

    return per_gpu("finetune", cfg, run, check, DistillResult,
                   finished=lambda rc, result: rc == 0 or result["interrupted"])
