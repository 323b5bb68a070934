"""What each KFP component does, called with the component's arguments.

The component functions are generated from the stage dataclasses (sidflow.kfp.declare); their bodies call these.
Fields that default to None have no run parameter of their own: the KFP backend's driver handles an unset optional
parameter inside a nested DAG such as a loop only from 2.14 (backend/src/v2/driver/resolve.go, "Handle omitted
optional pipeline input parameters"), and kfp.local cannot run one at all. They travel in the one `overrides` dict,
under their pipeline names, as do the ADVANCED settings the run form leaves out.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sidflow import storage
from sidflow.config import override, param
from sidflow.kfp import declare


@dataclass(frozen=True)
class RunPlace:
    """Where a pipeline task writes when its output is not given: <artifact_root>/runs/<run_id>/<teacher>-<hash>."""

    artifact_root: str = param("", "artifact root URI the pipeline's runs go under (names the run directory with "
                                   "run_id and the teacher when output is empty)")
    run_id: str = param("", "the pipeline run's id, passed as the whole value dsl.PIPELINE_JOB_ID_PLACEHOLDER")


@dataclass(frozen=True)
class DistillTask(RunPlace):
    teacher_fingerprint: str = param("", "the teacher's fingerprint: part of the task's inputs, so a new teacher "
                                         "version is never answered with an old run's outputs")
    retries: int = param(3, "times a crashed training is started again by this task, resuming from its newest "
                            "checkpoint (KFP backends up to 2.17 drop set_retry inside a ParallelFor, kubeflow/"
                            "pipelines #12389, #13897)")
    overrides: dict = field(default_factory=dict, metadata={"help": "values of the fields that default to None, by "
                                                                    "pipeline name, e.g. {\"kappa_4\": 3.0}"})


@dataclass(frozen=True)
class Gate:
    """The registration gate between evaluate and register."""

    max_fid: float | None = param(None, "registration gate: a model is registered only if its FID is finite and at "
                                        "most this; None: any finite FID")


# The settings the pipeline's run form leaves out, by pipeline name. The KFP UI lists every run parameter in one
# alphabetical list with its name and type only (frontend NewRunParametersV2.tsx), so the form holds what a run is
# planned with: URIs, recipe, length, placement, the finetune switch and its weights, the evaluation protocol. These
# keep defaults that fit nearly every run (the reference's hyperparameters, logging and checkpoint cadence, speed
# switches, evaluation detail) and are given, when at all, in `overrides`; the components keep them all as inputs.
ADVANCED = ("null_prompt", "alpha", "t_min", "t_max", "t_init", "fake_dropout", "adam_beta1", "adam_beta2",
            "adam_eps", "tf32", "compile", "channels_last", "norms", "generator_backward", "ema_halflife_kimg",
            "ema_rampup", "checkpoint_kimg", "keep_checkpoints", "log_every", "checkpoints", "profile",
            "gan_start_kimg", "adv_rampup_kimg", "gan_clip",
            "eval_scorer", "clip_model", "clip_precision", "unet_dtype", "vae_dtype", "compile_vae", "eval_batch",
            "eval_shard_size", "eval_grid", "eval_teacher_grid", "eval_teacher_row")


def overridable(cls, rename: dict[str, str] | None = None) -> dict[str, str]:
    """Return {pipeline name: field} of cls's fields that travel in `overrides`: those that default to None and the
    ADVANCED ones."""
    unset = declare.none_fields(cls)
    names = {(rename or {}).get(f.name, f.name): f.name for f in dataclasses.fields(cls)}
    return {k: n for k, n in names.items() if n in unset or k in ADVANCED}


def overridden(cls, given: dict, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Return {field: value} of the values in `given` (the `overrides` parameter, by pipeline name) for cls's
    overridable fields."""
    names = overridable(cls, rename)
    return {names[k]: v for k, v in given.items() if k in names}


def override_keys() -> dict[str, tuple[type, str]]:
    """Return {overrides key: (dataclass, field)} over the stages of the pipeline's DAG."""
    from sidflow.stages.distill import DistillConfig
    from sidflow.stages.evaluate import EvaluateConfig
    from sidflow.stages.finetune import FinetuneConfig
    from sidflow.stages.register import RegisterConfig

    keys: dict[str, tuple[type, str]] = {}
    for cls, rename in ((DistillConfig, None), (FinetuneConfig, None), (EvaluateConfig, EVAL_NAMES),
                        (RegisterConfig, None), (Gate, None)):
        for key, name in overridable(cls, rename).items():
            keys.setdefault(key, (cls, name))  # a distill field finetune shares is typed by distill's declaration
    return keys


def checked_overrides(given: dict) -> dict:
    """Return `overrides` with each value typed as its field; an unknown key or a bad value is a one-line
    ValueError. The distill task checks them too: a run started from the UI has not been through submit."""
    import difflib
    import typing

    from sidflow.config import coerce

    keys, out = override_keys(), {}
    for key, value in given.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            raise ValueError(f"overrides: {key!r} is not one of {list(keys)}"
                             + (f" (did you mean {close[0]}?)" if close else ""))
        cls, name = keys[key]
        out[key] = coerce(key, typing.get_type_hints(cls)[name], value)
    return out


def _log(metrics, values: dict) -> None:
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))


def distill(metrics, model, artifact_root: str, run_id: str, teacher_fingerprint: str, retries: int,
            overrides: dict, **fields) -> str:
    """Distill in this pod: one process per GPU, re-launched after a crash; return the exported model's URI."""
    from sidflow.stages import distill as stage

    cfg = _distill_config(fields, artifact_root, run_id, overrides)
    return _trained(metrics, model, stage.launch_with_retries(cfg, retries), f"distill of {cfg.teacher}")


def train_metrics(kimg: float, iterations: int | None, last: dict) -> dict:
    """The numbers a training task puts on its KFP Metrics artifact, for the UI's run comparison: kimg, iterations,
    images/s and the losses of the last logged iteration (loss_g, loss_fake; loss_disc, loss_adv with the GAN term),
    then the rest of that iteration's line (NaN drops, peak memory, phase seconds with profile)."""
    first = {"kimg": kimg, "iterations": iterations, "images_per_s": last.get("images_per_s"),
             **{k: last.get(k) for k in ("loss_g", "loss_fake", "loss_disc", "loss_adv")}}
    rest = {k: v for k, v in last.items() if k not in first and k != "iteration"}  # iteration: = iterations
    return {k: v for k, v in {**first, **rest}.items() if v is not None}


def _trained(metrics, model, result, what: str) -> str:
    # What the distill and finetune tasks do with their result: log it, fail an interrupted run (so that the task's
    # retry resumes it), describe the exported model on the KFP Model artifact.
    from sidflow.generator import describe
    from sidflow.stages.distill import summary

    print(summary(result))
    _log(metrics, train_metrics(result.kimg, result.iterations, result.metrics))
    if result.interrupted:
        raise RuntimeError(f"{what} was interrupted at {result.kimg:.3f} kimg; a retry resumes it")
    model.metadata.update(describe(result.model_uri, model.path))
    return result.model_uri


@dataclass(frozen=True)
class Finetune:
    """The pipeline's switch for the finetune stage between distill and evaluate."""

    finetune: bool = param(False, "fine-tune the distilled generator with the adversarial term on real text-image "
                                  "pairs (finetune_data) before it is evaluated and registered")


# Pipeline name of a FinetuneConfig field the pipeline also has for distill, or that needs the stage's name to read.
FINETUNE_NAMES = {k: f"finetune_{k}" for k in ("data", "steps", "kimg", "guidance", "kappa")}


def finetune(metrics, model, artifact_root: str, run_id: str, teacher_fingerprint: str, retries: int,
             overrides: dict, **fields) -> str:
    """Fine-tune the distilled generator at `init` in this pod (one process per GPU, re-launched after a crash);
    return the exported model's URI. An empty output is finetune/ of the run directory."""
    from sidflow.stages import distill as distill_stage
    from sidflow.stages import finetune as stage

    cfg = _finetune_config(fields, artifact_root, run_id, overrides)
    result = distill_stage.launch_with_retries(cfg, retries, "finetune", stage.check)
    return _trained(metrics, model, result, f"finetune of {cfg.init}")


def _finetune_config(fields: dict, artifact_root: str, run_id: str, given: dict):
    from sidflow.kfp.paths import run_output
    from sidflow.stages.finetune import FinetuneConfig

    fields = {**fields, **overridden(FinetuneConfig, given)}
    fields["output"] = fields["output"] or storage.join(run_output(artifact_root, run_id, fields["teacher"]),
                                                        "finetune")
    return override(FinetuneConfig(), fields)


def keep_model(model: str) -> str:
    """Return the model URI unchanged: a OneOf made a plain task output (the distilled model when finetune is off,
    the fine-tuned one from whichever branch ran)."""
    print(f"handing on {model}")
    return model


def _distill_config(fields: dict, artifact_root: str, run_id: str, given: dict):
    from sidflow.kfp.paths import run_output
    from sidflow.stages.distill import DistillConfig

    given = checked_overrides(given)
    _check_evaluate_overrides(given)
    fields = {**fields, **overridden(DistillConfig, given)}
    fields["output"] = fields["output"] or run_output(artifact_root, run_id, fields["teacher"])
    return override(DistillConfig(), fields)  # Literal values and types are checked as on the CLI


def _check_evaluate_overrides(given: dict) -> None:
    # A run started from the UI has not been through submit's value checks: evaluate's settings in `overrides`
    # (eval_batch, eval_grid, eval_scorer...) are checked here, before the distillation's GPU hours, not after them.
    from sidflow.stages import evaluate as stage

    try:
        stage.check_values(override(stage.EvaluateConfig(), overridden(stage.EvaluateConfig, given, EVAL_NAMES)))
    except ValueError as e:
        raise ValueError(named_as_run_parameters(str(e), EVAL_NAMES)) from None


def named_as_run_parameters(message: str, names: dict[str, str]) -> str:
    """Return a stage's error message with its field names (`batch=`) as the pipeline's (`eval_batch=`)."""
    import re

    for stage_name, name in names.items():
        message = re.sub(rf"\b{stage_name}=", f"{name}=", message)
    return message


def distill_trainjob(metrics, model, trainer_image: str, artifact_root: str, run_id: str, teacher_fingerprint: str,
                     retries: int, overrides: dict, **fields) -> str:
    """Create a TrainJob for the run, wait for it (re-creating a Failed one up to `retries` times); return the URI
    of the model it exported."""
    from sidflow import trainjob
    from sidflow.stages import distill

    placement = trainjob.PlacementConfig(**{f.name: fields.pop(f.name)
                                            for f in dataclasses.fields(trainjob.PlacementConfig)})
    cfg = _distill_config(fields, artifact_root, run_id, overrides)
    return _trainjob(metrics, model, cfg, placement, trainer_image, retries, "distill", distill.check)


def finetune_trainjob(metrics, model, trainer_image: str, artifact_root: str, run_id: str, teacher_fingerprint: str,
                      retries: int, overrides: dict, **fields) -> str:
    """finetune as a TrainJob on distill_nodes nodes, as distill_trainjob does distill; return the model's URI."""
    from sidflow import trainjob
    from sidflow.stages import finetune as stage

    placement = trainjob.PlacementConfig(**{f.name: fields.pop(f.name)
                                            for f in dataclasses.fields(trainjob.PlacementConfig)})
    return _trainjob(metrics, model, _finetune_config(fields, artifact_root, run_id, overrides), placement,
                     trainer_image, retries, "finetune", stage.check)


def _trainjob(metrics, model, cfg, placement, trainer_image: str, retries: int, stage: str, check) -> str:
    # Validate once for every rank, create the TrainJob (re-created after a failure up to `retries` times: it resumes
    # from its newest checkpoint), wait for it, and hand on the model it exported.
    from sidflow import trainjob
    from sidflow.generator import describe

    gpus = trainjob.check(cfg, placement)  # the cluster's rules, then the run's inputs, once for every rank
    check(cfg, placement.distill_nodes * gpus, fetch_teacher=False)
    job = trainjob.manifest(cfg, placement, trainer_image, checked=True, stage=stage)
    for attempt in range(retries + 1):
        try:
            trainjob.run(job)  # adopts a running job; deletes and re-creates a Failed one
            break
        except RuntimeError as e:
            if "failed:" not in str(e) or attempt == retries:
                raise
            print(f"{e}; attempt {attempt + 2} of {retries + 1} resumes from the newest checkpoint")
    model_uri, info = trainjob.result(cfg.output)
    _log(metrics, train_metrics(info["nimg"] / 1000, info.get("metrics", {}).get("iteration"),
                                info.get("metrics", {})))
    model.metadata.update(describe(model_uri, model.path))
    print(f"TrainJob {job['metadata']['name']} exported {model_uri}")
    return model_uri


def evaluate(metrics, samples, artifact_root: str, run_id: str, teacher: str, overrides: dict, model_name: str = "",
             **fields) -> str:
    """Evaluate the model (one process per GPU of the pod); return the URI of its metrics.json."""
    from sidflow.generator import INFO_FILE
    from sidflow.kfp.paths import run_output
    from sidflow.stages import evaluate as stage

    output = fields["output"] or storage.join(run_output(artifact_root, run_id, teacher), "eval")
    cfg = override(stage.EvaluateConfig(), {**fields, "output": output,
                                            **overridden(stage.EvaluateConfig, overrides, EVAL_NAMES)})
    result = stage.launch(cfg)
    print(stage.summary(result))
    _log(metrics, {k: result.metrics[k] for k in ("fid", "clip", "images", "images_per_s")})
    grid_uri, info_uri = storage.join(output, "grid.png"), storage.join(cfg.model, INFO_FILE)
    teacher_uri = storage.join(output, stage.TEACHER_GRID)
    info = json.loads(storage.read_text(info_uri)) if cfg.sampler == "generator" and storage.exists(info_uri) else None
    with open(samples.path, "w") as f:
        f.write(run_page(cfg, result.metrics, info, model_name,
                         storage.read_bytes(grid_uri) if storage.exists(grid_uri) else None,
                         storage.read_bytes(teacher_uri) if result.metrics.get("teacher_grid") else None))
    return result.metrics_uri


def _metric_names(cfg) -> tuple[str, str]:
    # What fid and clip measure under this evaluation (evaluation.md): the toy evaluator's, or the paper protocol's.
    fid = "shapes-FID" if cfg.features.startswith("toy:") else f"FID ({cfg.protocol}, clean-fid Inception)"
    score = "prompt accuracy" if cfg.scorer.startswith("toy:") else f"CLIP score ({cfg.clip_model})"
    return fid, score


def run_page(cfg, metrics: dict, info: dict | None, model_name: str, grid_png: bytes | None,
             teacher_png: bytes | None = None) -> str:
    """Return the evaluate task's HTML page for the Kubeflow UI: the model by name and recipe (teacher, guidance and
    κ, K steps, kimg from its sidflow.json; a teacher's sampler when it is one), its metrics named by protocol,
    and the captioned sample grid, beside the teacher's for the same prompts and seeds when there is one."""
    import base64
    from html import escape

    if info is not None:
        c = info.get("config", {})
        kind = "few-step SiD + adversarial finetune" if "data" in c else "SiD-LSG" if info.get("steps", 1) == 1 \
            else "few-step SiD"
        k = info.get("steps", 1)
        parts = [f"guidance {c['guidance']}" if "guidance" in c else None,  # a hand-made sidflow.json may lack them
                 f"κ {c['kappa']:g}" if isinstance(c.get("kappa"), (int, float)) else None,
                 f"K = {k} step{'s' if k != 1 else ''}",
                 f"{info.get('nimg', 0) / 1000:g} kimg"
                 + (f" ({info['weights']} weights)" if info.get("weights") else "")]
        recipe = f"{kind}: " + ", ".join(p for p in parts if p)
        teacher = info.get("teacher", "")
    else:  # a teacher scored with its own sampler (comparison rows)
        recipe = f"teacher, {cfg.sampler} {cfg.teacher_steps} steps, CFG κ {cfg.kappa:g}"
        teacher = cfg.model
    fid_name, score_name = _metric_names(cfg)
    t = metrics.get("teacher_row")  # the teacher's own evaluation on the same prompts and reference, when given
    columns = [[f"{m['fid']:.3f}", f"{m['clip']:.4f}", m.get("images", "")] for m in ([metrics, t] if t else [metrics])]
    columns[0].append(f"{metrics.get('images_per_s', 0):.1f}")  # the teacher row's rate is another run's
    head = ""
    if t:
        columns[1].append("")
        how = t["sampler"]  # {"kind": "teacher", "sampler", "steps", "kappa", ...}
        head = (f"<tr><th></th><th>this model</th><th>its teacher: {escape(str(how['sampler']))} {how['steps']} "
                f"steps, CFG κ {how['kappa']:g}</th></tr>")
    rows = head + "".join(f"<tr><th>{escape(name)}</th>" + "".join(f"<td>{c[i]}</td>" for c in columns) + "</tr>"
                          for i, name in enumerate([fid_name, score_name, "images", "images/s"]))

    def img(png: bytes, alt: str) -> str:
        return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    grid = img(grid_png, "samples: the first prompts, captioned") if grid_png else "<p>no grid (grid = 0)</p>"
    if grid_png and teacher_png and metrics.get("teacher_grid"):
        sampled = metrics["teacher_grid"]
        grid = ("<table><tr><th>this model</th><th>its teacher: "
                f"{escape(sampled['sampler'])} {sampled['steps']} steps, CFG κ {sampled['kappa']:g}, same prompts and "
                "seeds</th></tr>"
                f"<tr><td>{grid}</td><td>{img(teacher_png, 'the teacher: the same prompts and seeds')}</td></tr>"
                "</table>")
    title = model_name or "sidflow model"
    return (f"<html><head><meta charset='utf-8'><title>{escape(title)}</title></head><body>"
            f"<h2>{escape(title)}</h2><p>{escape(recipe)}</p><p>teacher: <code>{escape(teacher)}</code></p>"
            f"<table>{rows}</table><p>prompts: <code>{escape(cfg.prompts)}</code>; model: "
            f"<code>{escape(cfg.model)}</code></p>{grid}</body></html>")


# Pipeline name of an EvaluateConfig field, where the bare name is a distill parameter or would be unclear.
EVAL_NAMES = {k: f"eval_{k}" for k in ("prompts", "reference", "protocol", "features", "scorer", "batch",
                                       "shard_size", "limit", "grid", "teacher_grid", "teacher_row", "workers", "gpus")}


def passes_gate(metrics: str, overrides: dict) -> bool:
    """True when the evaluation's FID and score are finite and the FID is at most max_fid (if set)."""
    max_fid = override(Gate(), overridden(Gate, overrides)).max_fid
    m = json.loads(storage.read_text(metrics))
    passed = math.isfinite(m["fid"]) and math.isfinite(m["clip"]) and (max_fid is None or m["fid"] <= max_fid)
    print(f"fid {m['fid']:.4f}, score {m['clip']:.4f}: {'passes' if passed else 'fails'} the gate (max_fid={max_fid})")
    return passed


def register(overrides: dict, **fields) -> dict:
    """Register the model; return {"version", "promoted", "champion_version"}."""
    from sidflow.stages import register as stage

    cfg = override(stage.RegisterConfig(), {**fields, **overridden(stage.RegisterConfig, overrides)})
    result = stage.run(cfg)
    print(f"registered {cfg.model} as {cfg.model_name} v{result.version} (promoted={result.promoted})")
    return {"version": result.version, "promoted": result.promoted, "champion_version": result.champion_version}


def watch_teachers(**fields) -> list:
    """Return one {"source", "dest", "fingerprint"} per new teacher, for a dsl.ParallelFor; log the sources skipped
    (registered, already tried) and those that failed (each with its one-line reason)."""
    from sidflow.stages import watch_teachers as stage

    result = stage.run(stage.WatchTeachersConfig(**fields))
    print(stage.summary(result))
    return result.new


def download_teacher(**fields):
    """Publish the teacher once; return (uri, fingerprint, skipped)."""
    from collections import namedtuple

    from sidflow.stages import download_teacher as stage

    cfg = stage.DownloadTeacherConfig(**fields)
    result = stage.run(cfg)
    print(f"teacher {cfg.source} -> {result.uri} ({result.fingerprint}, skipped={result.skipped})")
    return namedtuple("Outputs", ["uri", "fingerprint", "skipped"])(result.uri, result.fingerprint, result.skipped)


def size_teacher(teacher: str, **given):
    """Return (teacher_type, gpus, sharding, distill_cpu, distill_memory, eval_gpus) for the teacher at `teacher`."""
    from collections import namedtuple

    from sidflow import sizing

    kind = sizing.read_type(teacher)
    sized = sizing.resolve(kind, **given)
    print(f"teacher {teacher}: {kind}; " + ", ".join(f"{k}={v}" + " (preset)" * (given[k] in (sizing.AUTO, ""))
                                                    for k, v in sized.items()))
    return namedtuple("Outputs", ["teacher_type", *sized])(kind, *sized.values())
