"""Stage `evaluate`: FID and CLIP score of a generator (or a teacher) under the zero-shot COCO protocol.

The protocol is GigaGAN's, which DMD2 and SiD-LSG report (evaluation.md §0): one image per caption of a prompt set,
image i from seed i; both fake and real images center-cropped and Lanczos-resized to 256, then clean-fid `clean`
(bicubic 299, TF-Inception pool3) against reference statistics of all 40,504 val2014 images; CLIP = cosine of
OpenCLIP ViT-g-14 embeddings with the "A photo depicts " prefix. Prompts are sharded over the processes of the
launch (one per GPU); shards are files under `output`, so a restarted run resumes. Rank 0 then writes
metrics.json (last), clip_scores.parquet, grid.png and row.md. With the toy shapes evaluator as features and
scorer, `fid` is shapes-FID and `clip` is prompt accuracy.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

from sidflow import storage
from sidflow.config import param, to_json

METRICS = "metrics.json"


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate, against which reference, with which networks and precision, and where results go."""

    model: str = param("", "model URI: an exported generator (the distill output's model/), or a teacher when "
                           "sampler is ddim or dpm_solver", required=True)
    prompts: str = param("", "prompt set URI: .parquet with caption, seed (default: row index), optional image_id "
                             "(`sidflow data coco-prompts`)", required=True)
    reference: str = param("", "reference statistics URI (.npz from `sidflow data ref-stats`, same protocol and "
                               "features)", required=True)
    output: str = param("", "URI for metrics.json, clip_scores.parquet, grid.png, row.md and shards/", required=True)
    protocol: Literal["coco30k", "sdxl10k", "native"] = param(
        "coco30k", "coco30k: crop + Lanczos 256 (GigaGAN/DMD2/SiD-LSG); sdxl10k: FID at 512, CLIP at 256 (DMD2 "
                   "SDXL); native: images as generated (toy)")
    features: str = param("inception", "FID features: 'inception' (clean-fid's TF-Inception from "
                                       "inception_weights) or 'toy:<evaluator URI>' (shapes-FID)")
    inception_weights: str = param("", "URI (s3:// or local) of inception-2015-12-05.pt, clean-fid's TF-Inception "
                                       "TorchScript")
    scorer: str = param("openclip", "'openclip' (clip_model + clip_weights, GigaGAN's CLIP score) or "
                                    "'toy:<evaluator URI>' (prompt accuracy)")
    clip_model: str = param("ViT-g-14", "OpenCLIP architecture, or URI of an open_clip directory "
                                        "(open_clip_config.json + weights)")
    clip_weights: str = param("laion2b_s12b_b42k", "OpenCLIP pretrained tag (Hugging Face cache) or URI of the "
                                                   "checkpoint file; unused when clip_model is a directory")
    clip_precision: Literal["fp32", "tf32", "fp16", "bf16"] = param(
        "fp16", "CLIP precision: fp16 weights (8x faster than fp32; moves the score < 1e-4, "
                "benchmarks/eval_throughput.py); fp32 = GigaGAN's exact .float(); tf32 = fp32 weights, TF32 matmuls")
    sampler: Literal["generator", "ddim", "dpm_solver"] = param(
        "generator", "generator: the exported generator's own K steps; ddim / dpm_solver: a teacher with "
                     "teacher_steps steps and CFG guidance (comparison rows)")
    teacher_steps: int = param(25, "steps of the ddim / dpm_solver teacher sampler")
    kappa: float = param(3.0, "CFG scale κ of the teacher sampler (SD1.5's best-FID setting, evaluation.md §1)")
    unet_dtype: Literal["fp16", "bf16", "fp32"] = param(
        "fp16", "UNet autocast precision on GPU (SiD-LSG generates in fp16); CPU runs use fp32")
    vae_dtype: Literal["auto", "fp32", "bf16", "fp16"] = param(
        "auto", "VAE decode precision on GPU; auto: fp16 (as SiD-LSG generates) except fp32 for an SDXL VAE with "
                "force_upcast (it overflows in fp16); fp32 is safe for every VAE")
    compile_vae: bool = param(True, "torch.compile the VAE decode on GPU: 1.7-2x faster at the same precision (one "
                                    "pixel level on 3.7% of the pixels in fp32, fewer than eager fp16 moves); "
                                    "compiles once per process (~20-30 s)")
    batch: int = param(32, "images generated per process per batch")
    shard_size: int = param(1024, "prompts per shard: the unit of work handed to a process and of resume")
    limit: int | None = param(None, "evaluate only the first N prompts (smoke runs); None: all")
    grid: int = param(16, "images in grid.png: those of the first N prompts")
    teacher_grid: bool = param(True, "for a generator, also sample its teacher (ddim, teacher_steps, at the CFG κ it "
                                     "was distilled against, else kappa) for grid.png's prompts and seeds: "
                                     "teacher_grid.png, shown beside it on the run page")
    teacher_row: str = param("", "URI of the teacher's own evaluation output on the same prompts, reference, "
                                 "features and scorer (`sidflow evaluate --sampler ddim`, run once per teacher): its "
                                 "metrics go into metrics.json beside this model's and its grid.png is the teacher "
                                 "grid; '' = none")
    save_images: bool = param(False, "also write every image to images/<row>.png (off: images stay in memory)")
    workers: int | None = param(None, "CPU threads per process for crop, resize and CLIP preprocessing; None: "
                                      "min(4, cores): more contend with generation for Python's GIL")
    gpus: str = param("1", "GPUs to use: a count or 'all' (one process per GPU); in the pipeline (eval_gpus) a "
                           "count: the GPUs the evaluate pod requests")


@dataclass(frozen=True)
class EvaluateResult:
    """Where metrics.json is, and the headline numbers in it."""

    metrics_uri: str
    fid: float
    clip: float
    images: int
    metrics: dict


def validate(cfg: EvaluateConfig) -> None:
    """Raise a one-line error for any user mistake, before a model is loaded or a GPU touched."""
    from sidflow.evaluate.protocol import PROTOCOLS, read_prompt_set
    from sidflow.evaluate.reference import read_reference

    for name in ("model", "prompts", "reference", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is empty: {EvaluateConfig.__dataclass_fields__[name].metadata['help']}")
    check_values(cfg)
    if cfg.features == "inception":
        from sidflow.evaluate.features import INCEPTION_FILE, INCEPTION_URL

        if not cfg.inception_weights or not storage.exists(cfg.inception_weights):
            raise FileNotFoundError(f"inception_weights={cfg.inception_weights!r}: {INCEPTION_FILE} is not there; "
                                    f"download it from {INCEPTION_URL} and pass its URI (s3:// or a local path)")
    if cfg.scorer == "openclip":
        from sidflow.evaluate.clipscore import check_openclip

        check_openclip(cfg.clip_model, cfg.clip_weights)
    _check_model(cfg)
    prompts = read_prompt_set(cfg.prompts)
    reference = read_reference(cfg.reference)
    meta = reference.meta
    if meta["fid_size"] != PROTOCOLS[cfg.protocol].fid_size:
        raise ValueError(f"reference={cfg.reference!r} was computed for protocol {meta['protocol']!r}, not "
                         f"{cfg.protocol!r}: recompute it with `sidflow data ref-stats --protocol {cfg.protocol}`")
    if cfg.teacher_row:
        _teacher_row(cfg, prompts.fingerprint, reference.fingerprint)


def check_values(cfg: EvaluateConfig) -> None:
    """The part of `validate` that reads nothing: a one-line error for any value out of range (`sidflow pipeline
    submit` runs it on a run's parameters)."""
    for name in ("batch", "shard_size", "teacher_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"limit={cfg.limit} must be at least 1 (or None: all prompts)")
    if cfg.grid < 0:
        raise ValueError(f"grid={cfg.grid} must be at least 0 (0: no grid.png)")
    if cfg.workers is not None and cfg.workers < 0:  # else the thread pool refuses it after the models load
        raise ValueError(f"workers={cfg.workers} must be at least 1 (None or 0: the default)")
    if cfg.features != "inception" and not cfg.features.startswith("toy:"):
        raise ValueError(f"features={cfg.features!r} is not 'inception' or 'toy:<evaluator URI>'")
    if cfg.scorer != "openclip" and not cfg.scorer.startswith("toy:"):
        raise ValueError(f"scorer={cfg.scorer!r} is not 'openclip' or 'toy:<evaluator URI>'")


def _teacher_row(cfg: EvaluateConfig, prompts_fingerprint: str, reference_fingerprint: str) -> dict:
    """Return the metrics.json of cfg.teacher_row; raise a one-line error unless it is a teacher's evaluation on
    this evaluation's prompts, reference and protocol (the features and scorer are compared once they are loaded)."""
    uri = storage.join(cfg.teacher_row, METRICS)
    if not storage.exists(uri):
        raise FileNotFoundError(f"teacher_row={cfg.teacher_row!r} has no {METRICS}: evaluate the teacher there first "
                                "(`sidflow evaluate --model <teacher> --sampler ddim` with this run's prompts and "
                                "reference)")
    row = json.loads(storage.read_text(uri))
    if row.get("sampler", {}).get("kind") != "teacher":
        raise ValueError(f"teacher_row={cfg.teacher_row!r} is the evaluation of a generator, not of a teacher")
    for name, ours in (("prompts_fingerprint", prompts_fingerprint), ("reference_fingerprint", reference_fingerprint),
                       ("protocol", cfg.protocol)):
        if row.get(name) != ours:
            raise ValueError(f"teacher_row={cfg.teacher_row!r} was evaluated with another {name.split('_')[0]} "
                             f"({row.get(name)!r}, here {ours!r}): its numbers would not compare")
    return row


def _check_model(cfg: EvaluateConfig) -> None:
    from sidflow.generator import INFO_FILE
    from sidflow.teacher import check_teacher_dir, materialize

    path = materialize(cfg.model)
    check_teacher_dir(path, generator=cfg.sampler == "generator")
    if cfg.sampler == "generator" and not os.path.isfile(os.path.join(path, INFO_FILE)):
        raise ValueError(f"model={cfg.model!r} has no {INFO_FILE}: not an exported sidflow generator; to evaluate "
                         "a teacher pass --sampler ddim (or dpm_solver) with --teacher-steps and --kappa")
    if cfg.sampler == "generator" and not storage.is_s3(cfg.model):
        storage.verify_published(cfg.model)  # a local generator without a manifest does not exist to readers


def load_sampler(cfg: EvaluateConfig, device) -> tuple["Sampler", dict]:  # noqa: F821  (sidflow.evaluate.sampling)
    """Return (sampler, description) for cfg.model, as cfg.sampler, teacher_steps, kappa, the dtypes and compile_vae
    say; description goes into metrics.json.

    vae_dtype "auto" is `vae_auto_dtype`. On the CPU every network runs in fp32 whatever the dtypes say, and nothing
    is compiled (recorded as such). cfg.batch is the largest batch the sampler will be called with (the compiled
    decode's shape).
    """
    import torch

    from sidflow.evaluate.sampling import Sampler, compile_decode, model_fingerprint, set_precision, vae_auto_dtype
    from sidflow.generator import load_generator
    from sidflow.teacher import load_teacher

    uri, sampler, steps, kappa = cfg.model, cfg.sampler, cfg.teacher_steps, cfg.kappa
    unet_dtype, vae_dtype, compile_vae = cfg.unet_dtype, cfg.vae_dtype, cfg.compile_vae
    device = torch.device(device)
    if device.type == "cpu":
        unet_dtype, vae_dtype, compile_vae = "fp32", "fp32", False
    if sampler == "generator":
        nets, info = load_generator(uri, device)
        out = Sampler(nets, info["config"]["steps"], info["config"]["t_init"])
        about = {"kind": "generator", "steps": out.steps, "t_init": out.t_init}
    else:
        nets = load_teacher(uri, device)
        out = Sampler(nets, steps, None, sampler, kappa)
        about = {"kind": "teacher", "sampler": sampler, "steps": steps, "kappa": kappa}
    set_precision(out, unet_dtype, vae_auto_dtype(nets) if vae_dtype == "auto" else vae_dtype)
    if compile_vae:
        compile_decode(out, cfg.batch)
    return out, {**about, "unet_dtype": unet_dtype, "vae_dtype": out.vae_dtype, "compile_vae": compile_vae,
                 "fingerprint": model_fingerprint(uri)}



def load_features(spec: str, inception_weights: str, device):
    """Return the FID feature extractor `spec` names: 'inception' (clean-fid's TF-Inception from inception_weights) or
    'toy:<evaluator directory URI>' (shapes-FID)."""
    from sidflow.evaluate.features import check_spec, inception

    check_spec(spec)
    if spec == "inception":
        return inception(inception_weights, device)
    from sidflow.toy.metrics import toy_features

    return toy_features(spec[len("toy:"):], device)


def run(cfg: EvaluateConfig) -> EvaluateResult:
    """Validate, record config.json, evaluate this process's shards, then (rank 0) write the results."""
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    from sidflow.evaluate.clipscore import load_openclip
    from sidflow.evaluate.protocol import PROTOCOLS, read_prompt_set
    from sidflow.evaluate.reference import read_reference
    from sidflow.evaluate.shards import evaluate_rows, read_shard, shard_rows, shard_uri
    from sidflow.launch import checked

    if not checked():  # a rank of run_per_gpu: the launching process validated
        validate(cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once and keeps the fastest
    if rank == 0:
        storage.write_text(storage.join(cfg.output, "config.json"), to_json(cfg))
    start = time.time()
    prompts = read_prompt_set(cfg.prompts)
    reference = read_reference(cfg.reference)
    extractor = load_features(cfg.features, cfg.inception_weights, device)
    if reference.meta["features"] != extractor.fingerprint:
        raise ValueError(f"reference={cfg.reference!r} holds features of {reference.meta['features']}, this "
                         f"evaluation uses {extractor.fingerprint}: recompute it with `sidflow data ref-stats`")
    if cfg.scorer == "openclip":
        scorer = load_openclip(cfg.clip_model, cfg.clip_weights, device, cfg.clip_precision)
    else:
        from sidflow.toy.metrics import toy_scorer

        scorer = toy_scorer(cfg.scorer[len("toy:"):], device)
    sampler, about = load_sampler(cfg, device)
    protocol = PROTOCOLS[cfg.protocol]
    n = min(len(prompts), cfg.limit or len(prompts))
    key = _run_key(prompts.fingerprint, n, protocol.name, extractor.fingerprint, scorer.fingerprint, about,
                   cfg.shard_size, cfg.batch)  # batch: a K-step generator seeds its later noise per batch
    shards = shard_rows(n, cfg.shard_size)
    mine = [k for k in range(len(shards)) if k % world == rank]
    bar = tqdm(total=sum(len(shards[k]) for k in mine), unit="img", desc="evaluate", dynamic_ncols=True,
               disable=rank != 0 or os.environ.get("SIDFLOW_NO_BAR") == "1")
    for k in mine:
        if read_shard(shard_uri(cfg.output, k), key) is not None:  # resumed: written by an earlier run
            bar.update(len(shards[k]))
            continue
        result = evaluate_rows(shards[k], prompts, sampler, protocol, extractor, scorer, cfg.batch, key, cfg.grid,
                               cfg.workers, storage.join(cfg.output, "images") if cfg.save_images else None, bar)
        storage.write_bytes(shard_uri(cfg.output, k), result.to_bytes())
    bar.close()
    acc.wait_for_everyone()
    metrics_uri = storage.join(cfg.output, METRICS)
    if rank == 0:
        _write_results(cfg, prompts, reference, extractor, scorer, about, key, len(shards), n, world,
                       time.time() - start)
    acc.wait_for_everyone()
    metrics = json.loads(storage.read_text(metrics_uri))
    return EvaluateResult(metrics_uri, metrics["fid"], metrics["clip"], metrics["images"], metrics)


def launch(cfg: EvaluateConfig) -> EvaluateResult:
    """Run the stage on `cfg.gpus` GPUs: in this process for one (or inside a torchrun launch), else as one child
    process per GPU; return the result rank 0 reported. Used by the CLI and the KFP component alike."""
    from sidflow.launch import per_gpu

    return per_gpu("evaluate", cfg, run, lambda c, n: validate(c), EvaluateResult)


def _run_key(*parts) -> str:
    """sha256 of everything that decides a shard's numbers: shards of another evaluation are never mixed in."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_results(cfg, prompts, reference, extractor, scorer, about, key, n_shards, n, world, seconds) -> dict:
    """Gather every shard, compute FID and the mean score, write the result files with metrics.json last."""
    import numpy as np

    from sidflow.evaluate.fid import feature_stats, frechet_distance
    from sidflow.evaluate.report import captioned_grid, markdown_row, scores_parquet
    from sidflow.evaluate.shards import read_shard, shard_uri

    shards = [read_shard(shard_uri(cfg.output, k), key) for k in range(n_shards)]
    rows = np.concatenate([s.rows for s in shards])
    assert np.array_equal(rows, np.arange(n)), "a shard is missing or out of order"
    scores = np.concatenate([s.scores for s in shards])
    mu, sigma = feature_stats(np.concatenate([s.features for s in shards]))
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    metrics = {
        "fid": fid, "clip": float(scores.mean()), "images": int(n), "reference_images": reference.meta["images"],
        "protocol": cfg.protocol, "model": cfg.model, "model_fingerprint": about["fingerprint"],
        "sampler": {k: v for k, v in about.items() if k != "fingerprint"},
        "prompts": cfg.prompts, "prompts_fingerprint": prompts.fingerprint,
        "reference": cfg.reference, "reference_fingerprint": reference.fingerprint,
        "features": extractor.fingerprint, "scorer": scorer.fingerprint, "processes": world,
        "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 2),
    }
    out = cfg.output
    scores_parquet(storage.join(out, "clip_scores.parquet"), rows, prompts.captions, prompts.seeds, prompts.image_ids,
                   scores)
    tiles = [s.grid for s in shards if len(s.grid)]
    if tiles:
        grid = np.concatenate(tiles)
        storage.write_bytes(storage.join(out, "grid.png"), captioned_grid(grid, prompts.captions[: len(grid)]))
    metrics.update(_teacher_beside(cfg, prompts, reference, extractor, scorer, len(grid) if tiles else 0))
    storage.write_text(storage.join(out, "row.md"), markdown_row(metrics))
    storage.write_text(storage.join(out, METRICS), json.dumps(metrics, indent=2))  # last: readers wait for it
    return metrics


TEACHER_GRID = "teacher_grid.png"


def teacher_kappa(info: dict, default: float) -> float:
    """The CFG κ to show a generator's teacher at: the κ4 the generator was distilled against (method.md §3) when it
    guides the teacher (> 1), else `default` (the stage's teacher κ: Zero-CFG and Anti-CFG distill an unguided one)."""
    from sidflow.method.guidance import kappas

    c = info.get("config") or {}
    try:
        k4 = float(c["kappa_4"]) if c.get("kappa_4") is not None else \
            kappas(c["guidance"], kappa=float(c["kappa"]))["kappa_4"]
    except (KeyError, TypeError, ValueError):  # a hand-made sidflow.json without a recipe
        return default
    return k4 if k4 > 1 else default


def _teacher_beside(cfg: EvaluateConfig, prompts, reference, extractor, scorer, n_grid: int) -> dict:
    """What metrics.json says of the teacher beside this model: `teacher_row`, its metrics from cfg.teacher_row when
    that was scored alike; `teacher_grid`, what teacher_grid.png shows (the row's grid.png, else sampled here)."""
    out = {}
    row = _teacher_row(cfg, prompts.fingerprint, reference.fingerprint) if cfg.teacher_row else None
    if row is not None and (row["features"], row["scorer"]) != (extractor.fingerprint, scorer.fingerprint):
        print(f"teacher_row={cfg.teacher_row!r} was scored with other features or another scorer: not shown")
        row = None
    if row is not None:
        out["teacher_row"] = {k: row[k] for k in ("model", "sampler", "fid", "clip", "images")}
    if n_grid and cfg.teacher_grid and cfg.sampler == "generator":
        row_grid = storage.join(cfg.teacher_row, "grid.png") if row is not None else None
        if row_grid and storage.exists(row_grid):  # the same first prompts and seeds, already sampled
            storage.write_bytes(storage.join(cfg.output, TEACHER_GRID), storage.read_bytes(row_grid))
            out["teacher_grid"] = {"teacher": row["model"], **{k: row["sampler"][k] for k in ("sampler", "steps",
                                                                                              "kappa")}}
        else:
            out["teacher_grid"] = _write_teacher_grid(cfg, prompts, n_grid, extractor.device)
    return out


def _write_teacher_grid(cfg: EvaluateConfig, prompts, n: int, device) -> dict | None:
    """Sample the generator's teacher for the first `n` prompts with their seeds, tiled and captioned as grid.png is,
    into teacher_grid.png; return what was sampled, or None (with a one-line note) when the teacher cannot be read."""
    import dataclasses

    import numpy as np

    from sidflow.evaluate.protocol import PROTOCOLS
    from sidflow.evaluate.report import captioned_grid
    from sidflow.evaluate.resize import protocol_resize
    from sidflow.generator import INFO_FILE

    info = json.loads(storage.read_text(storage.join(cfg.model, INFO_FILE)))
    teacher = info.get("teacher") or ""
    row = {"teacher": teacher, "sampler": "ddim", "steps": cfg.teacher_steps, "kappa": teacher_kappa(info, cfg.kappa)}
    try:
        sampler, _ = load_sampler(dataclasses.replace(cfg, model=teacher, sampler="ddim", kappa=row["kappa"],
                                                      compile_vae=False), device)
    except (OSError, ValueError) as exc:  # moved or deleted since the distillation: the grid only
        print(f"no teacher_grid.png: the teacher {teacher!r} does not load ({str(exc).splitlines()[0]})")
        return None
    size = PROTOCOLS[cfg.protocol].clip_size  # grid.png's tiles are the scorer's input size
    captions, seeds, b = prompts.captions[:n], prompts.seeds[:n], cfg.batch
    images = np.concatenate([sampler(captions[i:i + b], seeds[i:i + b]) for i in range(0, n, b)])
    tiles = np.stack([protocol_resize(image, size) for image in images])
    storage.write_bytes(storage.join(cfg.output, TEACHER_GRID), captioned_grid(tiles, captions))
    return row


def summary(result: EvaluateResult) -> str:
    """Return the one-line JSON summary the CLI prints."""
    return json.dumps({"metrics": result.metrics_uri, "fid": round(result.fid, 4), "clip": round(result.clip, 5),
                       "images": result.images})
