"""The `sidflow` command line: every stage runs here exactly as it runs inside a Kubeflow component."""

import argparse
import dataclasses
import json
import os
import sys

from sidflow import config
from sidflow.launch import gpu_count, prints_summary

# Environment switches the commands read; the top-level --help lists them (docs/operating.md §7 says more).
ENVIRONMENT = """\
environment:
  SIDFLOW_CACHE        where s3:// directories and files are fetched to (default: <tmp>/sidflow-cache)
  SIDFLOW_NO_BAR=1     no progress bars (logs, CI, kfp.local; `sidflow demo` sets it)
  SIDFLOW_CHECKED=1    set by sidflow for the ranks it launches: the launcher validated the run, ranks skip it
  SIDFLOW_RESULT_FILE  set by sidflow for the ranks it launches: where rank 0 writes its result
  SIDFLOW_FAILPOINT, SIDFLOW_FAILPOINT_ONCE  fault injection for the tests (crash at a named point)
  AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_S3_ADDRESSING_STYLE, AWS_*  S3 endpoint (MinIO...), style, credentials
  MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_INSECURE_TLS,
  MLFLOW_TRACKING_SERVER_CERT_PATH  an mlflow+http(s):// registry's credentials and TLS
  MODEL_REGISTRY_TOKEN, MODEL_REGISTRY_CA_CERT, KF_PIPELINES_SA_TOKEN_PATH  a kubeflow-mr+http(s):// registry's
  KF_PIPELINES_ENDPOINT  the KFP API of `sidflow pipeline submit|schedule` when --host is not given
  KUBECONFIG           the cluster of the pipeline's TrainJob task
"""


def _parser(sub, name: str, help: str, example: str | None = None, description: str | None = None,
            ) -> argparse.ArgumentParser:
    # Every subcommand's --help ends with an example of its use, kept as written.
    return sub.add_parser(name, help=help, description=description or help, formatter_class=config.HelpFormatter,
                          epilog=f"example:\n  {example}" if example else None)


def _stage_parser(sub, name: str, cls, help: str, example: str | None = None) -> argparse.ArgumentParser:
    p = _parser(sub, name, help, example)
    config.add_arguments(p, cls)
    if any("§" in f.metadata.get("help", "") for f in dataclasses.fields(cls)):  # say where the § numbers point
        p.epilog = (p.epilog + "\n\n" if p.epilog else "") + SECTIONS
    return p


SECTIONS = ("§N: section N of docs/method.md (the method's equations, each with the code that implements it), or of "
            "the docs/ file named before it")


def _distill(args) -> int:
    from sidflow.stages import distill

    return _train(args, distill.DistillConfig, distill.validate, distill.launch)


def _finetune(args) -> int:
    from sidflow.stages import finetune

    return _train(args, finetune.FinetuneConfig, finetune.validate, finetune.launch)


def _train(args, cls, validate, launch) -> int:
    # distill and finetune: --dry-run validates and prints the config; else one child process per GPU.
    from sidflow.stages.distill import summary

    cfg = config.from_args(cls, args)
    if args.dry_run:
        validate(cfg, world_size=gpu_count(cfg.gpus))
        print(config.to_json(cfg))
        return 0
    result = launch(cfg)
    if prints_summary(cfg.gpus):
        print(summary(result))
    return 143 if result.interrupted else 0  # 128 + SIGTERM: the orchestrator retries and the run resumes


def _distill_trainjob(args) -> int:
    import yaml

    from sidflow import sizing, trainjob
    from sidflow.stages import distill

    cfg = config.from_args(distill.DistillConfig, args)
    placement = config.from_args(trainjob.PlacementConfig, args)
    kind = "sd15"
    if sizing.AUTO in (placement.distill_cpu, placement.distill_memory):  # sized by the teacher's type, as in a run
        try:
            kind = sizing.read_type(cfg.teacher)
        except (OSError, ValueError) as exc:  # a hub id, or storage this machine cannot reach
            print(f"sidflow distill-trainjob: sized with the sd15 preset: the teacher's configs could not be read "
                  f"({str(exc).splitlines()[0]}); give --distill-cpu and --distill-memory for another type",
                  file=sys.stderr)
    job = trainjob.manifest(cfg, placement, args.image, kind=kind)
    print(yaml.safe_dump(job, sort_keys=False, width=120), end="")
    return 0


def _evaluate(args) -> int:
    from sidflow.stages import evaluate

    cfg = config.from_args(evaluate.EvaluateConfig, args)
    if args.dry_run:
        evaluate.validate(cfg)
        print(config.to_json(cfg))
        return 0
    result = evaluate.launch(cfg)  # several GPUs: one child process each
    if prints_summary(cfg.gpus):
        print(evaluate.summary(result))
    return 0


def _data(args) -> int:
    from sidflow.evaluate import protocol

    if args.data_command == "pack":
        from sidflow import pairs

        if (args.images is None) == (args.annotations is None) or (args.annotations and not args.coco_images):
            raise ValueError("pass --images (a folder; captions from --captions or <name>.txt files) or "
                             "--annotations with --coco-images (COCO captions_train2014.json and its image folder)")
        rows = (pairs.folder_rows(args.images, args.captions) if args.images
                else pairs.coco_rows(args.annotations, args.coco_images))
        result = pairs.pack(rows, args.out, args.rows_per_shard)
        print(json.dumps({"out": result.out, "pairs": result.rows, "shards": result.shards,
                          "skipped": result.skipped}))
        return 0
    if args.data_command == "stage-weights":
        from sidflow.evaluate import weights

        print(weights.summary(weights.stage(config.from_args(weights.StageWeightsConfig, args))))
        return 0
    if args.data_command == "ref-stats":
        import torch

        from sidflow.evaluate.reference import RefStatsConfig, compute_reference
        from sidflow.stages.evaluate import load_features

        cfg = config.from_args(RefStatsConfig, args)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(json.dumps(compute_reference(cfg, load_features(cfg.features, cfg.inception_weights, device))))
        return 0
    from sidflow import storage

    if (args.captions_txt is None) == (args.annotations is None):
        raise ValueError("pass exactly one of --captions-txt (GigaGAN's 30k list) and --annotations "
                         "(COCO captions_val2014.json)")
    if args.captions_txt is not None:
        if args.n is not None:
            raise ValueError("--n applies to --annotations only: captions.txt is used whole, as the papers do")
        captions, ids = protocol.captions_from_gigagan_txt(storage.read_bytes(args.captions_txt)), None
    else:
        captions, ids = protocol.captions_from_coco_annotations(storage.read_bytes(args.annotations), args.n,
                                                                args.seed)
    protocol.write_prompt_set(args.out, captions, image_ids=ids)
    print(json.dumps({"out": args.out, "prompts": len(captions), "image_ids": ids is not None}))
    return 0


def _download_teacher(args) -> int:
    from sidflow.stages import download_teacher

    result = download_teacher.run(config.from_args(download_teacher.DownloadTeacherConfig, args))
    print(json.dumps({"uri": result.uri, "fingerprint": result.fingerprint, "skipped": result.skipped}))
    return 0


def _generate(args) -> int:
    from PIL import Image

    from sidflow.generator import image_grid, load_generator, sample

    if args.n < 1:
        raise ValueError(f"-n {args.n}: the number of images must be at least 1")
    gen, info = load_generator(args.model, args.device)
    steps = info["config"]["steps"] if args.steps is None else args.steps
    images = sample(gen, info, [args.prompt] * args.n, list(range(args.seed, args.seed + args.n)), steps=steps)
    grid = images[0] if args.n == 1 else image_grid(images)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(json.dumps({"out": args.out, "images": args.n, "steps": steps, "trained_steps": info["config"]["steps"]}))
    return 0


def _build_tiny(args) -> int:
    from sidflow.toy.tiny import build_tiny_sd

    print(build_tiny_sd(args.out, seed=args.seed))
    return 0


def _make_shapes(args) -> int:
    from sidflow.toy.shapes import write_parquet

    write_parquet(args.out, args.n, args.seed, args.split)
    print(json.dumps({"out": args.out, "images": args.n, "split": args.split}))
    return 0


def _train_teacher(args) -> int:
    from sidflow.toy.train_teacher import ToyTeacherConfig, train_teacher

    print(json.dumps(train_teacher(config.from_args(ToyTeacherConfig, args))))
    return 0


def _train_evaluator(args) -> int:
    from sidflow.toy import evaluator, shapes

    device = "cuda" if _cuda() else "cpu"
    model = evaluator.train(args.steps, seed=args.seed, device=device)
    evaluator.save(model, args.out)
    images, captions = shapes.sample(10_000, 10_000_019, split="all")  # fresh renders, not seen in training
    print(json.dumps({"out": args.out, "accuracy_real": evaluator.prompt_accuracy(model, images, captions)}))
    return 0


def _demo(args) -> int:
    from sidflow.demo import run_demo

    return 0 if run_demo(args.out) is not None else 1


def _registry(args) -> int:
    from sidflow import registry
    from sidflow.stages import register

    cmd = args.registry_command
    if cmd == "register":
        r = register.run(config.from_args(register.RegisterConfig, args))
        out = {"version": r.version, "promoted": r.promoted, "champion_version": r.champion_version}
    elif cmd == "list":
        held = registry.champion(args.registry, args.name)
        out = [{"version": v.version, "champion": held is not None and v.version == held.version, "metrics": v.metrics,
                "teacher_fingerprint": v.teacher_fingerprint, "run_id": v.run_id, "created": v.created,
                "model_uri": v.model_uri} for v in registry.list_versions(args.registry, args.name, args.reindex)]
    elif cmd == "show":  # without --version: the champion
        v = registry.get(args.registry, args.name, args.version) if args.version is not None else \
            registry.champion(args.registry, args.name)
        if v is None:
            raise FileNotFoundError(f"{args.name} has no champion in {args.registry}; pass --version")
        out = v.to_dict()
    elif cmd == "promote":
        registry.promote(args.registry, args.name, args.version)
        out = {"champion": args.version}
    else:
        out = {"versions": [v.version for v in registry.list_versions(args.registry, args.name, reindex=True)]}
    print(json.dumps(out, indent=1))
    return 0


def _watch_teachers(args) -> int:
    from sidflow.stages import watch_teachers

    result = watch_teachers.run(config.from_args(watch_teachers.WatchTeachersConfig, args))
    print(json.dumps(dataclasses.asdict(result), indent=1))
    return 0


def _pipeline(args) -> int:
    from sidflow.kfp import compile as kfp_pipeline
    from sidflow.kfp import submit

    images = dict(image_registry=args.image_registry, runtime_digest=args.runtime_digest,
                  trainer_digest=args.trainer_digest) if args.pipeline_command != "run-local" else {}
    if args.pipeline_command == "compile":
        print(kfp_pipeline.compile(args.out, args.max_parallel, **images))
        return 0
    if args.pipeline_command == "run-local":
        from google.protobuf import json_format

        from sidflow.kfp.sid_distill import check_run, sid_distill

        params = submit.parameters(json_format.MessageToDict(sid_distill.pipeline_spec))
        arguments = submit.parse_overrides(args.set or [], params)
        for name in ("teachers", "registry", "artifact_root", "prompts"):
            arguments[name] = getattr(args, name)
        check_run(arguments)
        kfp_pipeline.run_local(args.pipeline_root, **arguments)
        return 0
    if any(images.values()):  # the run uses the team's images: compile a package that names them
        import tempfile

        args.package = kfp_pipeline.compile(tempfile.mkstemp(suffix=".yaml", prefix="sid-distill-")[1], **images)
    params = submit.package_parameters(args.package)  # submit, schedule: typed as the compiled pipeline declares
    arguments = submit.parse_overrides(args.params, params)
    submit.check_required(arguments, params)
    from sidflow.kfp.sid_distill import check_run

    check_run(arguments)  # the stages' value checks on what the run will see, as run-local does
    if args.pipeline_command == "schedule":
        submit.check_cron(args.cron)
    if args.dry_run:
        print(json.dumps({"parameters": arguments, "pipeline_root": args.pipeline_root, "package": args.package}))
        return 0
    common = dict(package=args.package, experiment=args.experiment, namespace=args.namespace,
                  pipeline_root=args.pipeline_root, service_account=args.service_account)
    try:
        client = submit.connect(args.host, args.namespace, args.existing_token)
        if args.pipeline_command == "submit":
            out = submit.submit(client, arguments, run_name=args.run_name, **common)
        else:
            out = submit.schedule(client, arguments, cron=args.cron, name=args.name, **common)
    except ConnectionError as e:  # the API server refused or could not be reached: one line, no traceback
        print(f"sidflow pipeline {args.pipeline_command}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sidflow` console script."""
    # Library chatter (optional torchvision backends, diffusers config notices) is not for our users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from sidflow.kfp import compile as kfp_compile
    from sidflow.stages.distill import DistillConfig
    from sidflow.stages.download_teacher import DownloadTeacherConfig

    parser = argparse.ArgumentParser(prog="sidflow", description=__doc__, formatter_class=config.HelpFormatter,
                                     epilog="example:\n  sidflow demo          # the whole pipeline on the bundled "
                                            "toy teacher, on this machine\n\n" + ENVIRONMENT)
    sub = parser.add_subparsers(dest="command", required=True)
    p = _stage_parser(sub, "download-teacher", DownloadTeacherConfig, "fetch a teacher once and publish it",
                      "sidflow download-teacher --source hf://stable-diffusion-v1-5/stable-diffusion-v1-5 "
                      "--dest s3://my-bucket/teachers/sd15")
    p.set_defaults(fn=_download_teacher)
    p = _stage_parser(sub, "distill", DistillConfig, "one-step SiD-LSG distillation of a teacher",
                      "sidflow distill --teacher s3://my-bucket/teachers/sd15 --prompts s3://my-bucket/prompts.txt "
                      "--output s3://my-bucket/runs/sd15-lsg1.5 --kappa 1.5 --gpus 8 --tf32 --dry-run")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and stop")
    p.set_defaults(fn=_distill)
    from sidflow.stages.finetune import FinetuneConfig

    p = _stage_parser(sub, "finetune", FinetuneConfig, "few-step SiD with the adversarial term on real text-image "
                      "pairs, from a distill run or a teacher",
                      "sidflow finetune --init s3://my-bucket/runs/sd15-lsg1.5 --data s3://my-bucket/pairs/coco "
                      "--output s3://my-bucket/runs/sd15-adv-k4 --steps 4 --gpus 8")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and stop")
    p.set_defaults(fn=_finetune)
    from sidflow import trainjob

    p = _stage_parser(sub, "distill-trainjob", DistillConfig, "print the Kubeflow Trainer TrainJob (YAML) that runs "
                      "this distill on --distill-nodes nodes × --gpus GPUs; kubectl create -f it",
                      "sidflow distill-trainjob --distill-nodes 2 --gpus 8 --teacher s3://my-bucket/teachers/sd15 "
                      "--prompts s3://my-bucket/prompts.txt --output s3://my-bucket/runs/sd15 | kubectl create -f -")
    config.add_arguments(p, trainjob.PlacementConfig)
    p.add_argument("--image", default=trainjob.TRAINER_IMAGE, help="trainer image (default: %(default)s)")
    p.set_defaults(fn=_distill_trainjob)
    p = _parser(sub, "generate", "sample an exported generator", "sidflow generate --model "
                "s3://my-bucket/runs/sd15-lsg1.5/model --prompt 'a photo of a cat' -n 4 --out cats.png")
    p.add_argument("--model", required=True, help="generator URI (the distill output's model/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG path; a grid when -n > 1")
    p.add_argument("-n", type=int, default=1, help="number of images (seeds seed..seed+n-1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the K the generator was trained "
                   "with); the same schedule as the exported pipeline's num_inference_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(fn=_generate)
    toy = _parser(sub, "toy", "toy teachers", "sidflow toy make-shapes --out shapes.parquet --n 50000")
    toy = toy.add_subparsers(dest="toy_command", required=True)
    p = _parser(toy, "build-tiny", "build a tiny random SD-layout teacher (tests, smoke runs)",
                "sidflow toy build-tiny --out tiny-teacher")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_build_tiny)
    p = _parser(toy, "make-shapes", "write a procedural shapes text-image parquet",
                "sidflow toy make-shapes --out shapes-train.parquet --n 50000 --split train")
    p.add_argument("--out", required=True, help="parquet URI")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    p.set_defaults(fn=_make_shapes)
    from sidflow.toy.train_teacher import ToyTeacherConfig

    p = _stage_parser(toy, "train-teacher", ToyTeacherConfig, "train a small SD-layout teacher on a text-image parquet",
                      "sidflow toy train-teacher --data shapes-train.parquet --output toy-teacher --minutes 30")
    p.set_defaults(fn=_train_teacher)
    p = _parser(toy, "train-evaluator", "train the shapes attribute classifier (shapes-FID, prompt accuracy)",
                "sidflow toy train-evaluator --out toy-teacher/evaluator --steps 4000")
    p.add_argument("--out", required=True, help="directory")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_train_evaluator)
    p = _parser(sub, "demo", "the whole job on the bundled teacher, on this machine: one line per pipeline stage, the "
                "before/after table and <out>/comparison.png (teacher 1 step | distilled | teacher 25 steps); "
                "kfp.local's full log goes to <out>/pipeline.log",
                "sidflow demo --out demo-out")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(fn=_demo)
    from sidflow.stages.register import RegisterConfig

    p = _parser(sub, "registry", "the model registry: register, list, show, promote, reindex",
                "sidflow registry list --registry s3://my-bucket/registry --name sid-generator")
    p.set_defaults(fn=_registry)
    reg = p.add_subparsers(dest="registry_command", required=True)
    _stage_parser(reg, "register", RegisterConfig, "register an evaluated model; promote it if it passes the gate",
                  "sidflow registry register --registry s3://my-bucket/registry --model "
                  "s3://my-bucket/runs/sd15-lsg1.5/model --metrics s3://my-bucket/runs/sd15-lsg1.5/eval/metrics.json")
    for name, help in [("list", "list the versions of a model"), ("show", "print one version (default: champion)"),
                       ("promote", "make a version the champion, no gate"),
                       ("reindex", "rebuild index.json from versions/")]:
        p = _parser(reg, name, help, f"sidflow registry {name} --registry s3://my-bucket/registry"
                    + (" --version 3" if name == "promote" else ""))
        p.add_argument("--registry", required=True, help="registry URI: s3://bucket/prefix, a path, "
                       "mlflow+http(s)://host:port or kubeflow-mr+http(s)://host:port")
        p.add_argument("--name", default="sid-generator", help="registered model name")
        if name in ("show", "promote"):
            p.add_argument("--version", type=int, required=name == "promote", help="version number")
        if name == "list":
            p.add_argument("--reindex", action="store_true", help="rebuild index.json from versions/ first")
    from sidflow.evaluate.reference import RefStatsConfig
    from sidflow.stages.evaluate import EvaluateConfig

    p = _stage_parser(sub, "evaluate", EvaluateConfig, "FID and CLIP score under the zero-shot COCO protocol",
                      "sidflow evaluate --model s3://my-bucket/runs/sd15-lsg1.5/model --prompts "
                      "s3://my-bucket/eval/coco30k.parquet --reference s3://my-bucket/eval/val2014_256.npz "
                      "--output s3://my-bucket/runs/sd15-lsg1.5/eval --gpus 8")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and stop")
    p.set_defaults(fn=_evaluate)
    p = _parser(sub, "data", "data: real text-image pairs, COCO prompt sets, reference statistics",
                "sidflow data coco-prompts --captions-txt captions.txt --out s3://my-bucket/eval/coco30k.parquet")
    p.set_defaults(fn=_data)
    data = p.add_subparsers(dest="data_command", required=True)
    p = _parser(data, "coco-prompts", "write a prompt set parquet (caption, seed[, image_id])",
                "sidflow data coco-prompts --annotations annotations/captions_val2014.json --n 10000 "
                "--out s3://my-bucket/eval/coco10k.parquet",
                description="From GigaGAN's captions.txt (30k, md5 checked) or COCO's captions_val2014.json "
                            "(one caption per image, drawn with --seed; --n random images).")
    p.add_argument("--out", required=True, help="parquet URI")
    p.add_argument("--captions-txt", help="URI of GigaGAN's captions.txt (the SiD-LSG / DMD2 copies are identical)")
    p.add_argument("--annotations", help="URI of COCO's annotations/captions_val2014.json")
    p.add_argument("--n", type=int, help="with --annotations: draw this many images (10000 for the SDXL protocol)")
    p.add_argument("--seed", type=int, default=0, help="with --annotations: seed of the caption and image draws")
    p = _parser(data, "pack", "write real text-image pairs as parquet shards for `sidflow finetune --data`",
                "sidflow data pack --annotations coco/annotations/captions_train2014.json --coco-images "
                "coco/train2014 --out s3://my-bucket/pairs/coco",
                description="From a folder of images with captions, or COCO's captions_train2014.json and its "
                            "images; images that do not decode are skipped and counted.")
    p.add_argument("--out", required=True, help="URI of the shards' directory (published with a manifest)")
    p.add_argument("--images", help="folder of .png/.jpg/.webp images")
    p.add_argument("--captions", help="with --images: a .jsonl of {file, caption} or lines file<TAB>caption "
                                      "(default: <name>.txt beside each image)")
    p.add_argument("--annotations", help="URI of COCO's annotations/captions_train2014.json (first caption per image)")
    p.add_argument("--coco-images", help="with --annotations: the folder of its images (train2014/)")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="pairs per parquet shard (default: %(default)s)")
    _stage_parser(data, "ref-stats", RefStatsConfig, "compute reference mu/sigma of real images once, store at a URI",
                  "sidflow data ref-stats --images val2014.zip --out s3://my-bucket/eval/val2014_256.npz")
    from sidflow.evaluate.weights import StageWeightsConfig

    _stage_parser(data, "stage-weights", StageWeightsConfig, "copy evaluate's OpenCLIP and Inception weights to a URI "
                  "once (from a machine with internet), for clusters without it",
                  "sidflow data stage-weights --dest s3://my-bucket/weights")
    from sidflow.stages.watch_teachers import WatchTeachersConfig

    p = _stage_parser(sub, "watch-teachers", WatchTeachersConfig, "list teachers with no registered distillation yet",
                      "sidflow watch-teachers --teachers 's3://my-bucket/teachers/*' --registry "
                      "s3://my-bucket/registry --artifact-root s3://my-bucket/sidflow")
    p.set_defaults(fn=_watch_teachers)
    p = _parser(sub, "pipeline", "the sid-distill Kubeflow pipeline: compile, run-local, submit, schedule",
                "sidflow pipeline compile --image-registry registry.example.com/ml --out sid-distill.yaml")
    p.set_defaults(fn=_pipeline)
    kp = p.add_subparsers(dest="pipeline_command", required=True)
    p = _parser(kp, "compile", "compile the pipeline to IR YAML",
                "sidflow pipeline compile --image-registry registry.example.com/ml --out sid-distill.yaml")
    p.add_argument("--out", default="sid_distill.yaml", help="output YAML path (the package's own copy is "
                   "regenerated with `python -m sidflow.kfp.compile`)")
    p.add_argument("--max-parallel", type=int, help="teachers distilled at once: GPU pods or TrainJobs started "
                   "together when several new teachers appear (default 1)")
    _image_flags(p)
    p = _parser(kp, "run-local", "run the whole pipeline on this machine (kfp.local, no pod settings)",
                "sidflow pipeline run-local --teachers examples/toy-teacher --registry reg --artifact-root art "
                "--prompts prompts.txt --set kimg=1")
    p.add_argument("--pipeline-root", default="kfp-local", help="local directory for kfp.local outputs")
    p.add_argument("--teachers", required=True, help="comma-separated teacher sources")
    p.add_argument("--registry", required=True, help="registry root URI")
    p.add_argument("--artifact-root", required=True, help="artifact root URI (teachers/ and runs/ go under it)")
    p.add_argument("--prompts", required=True, help="training prompts URI")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another pipeline parameter (repeatable)")
    for name, help in [("submit", "start one run on a Kubeflow Pipelines cluster; prints its id and UI link"),
                       ("schedule", "create a recurring run (enabled, max_concurrency 1, no catch-up); prints its "
                                    "id and UI link")]:
        p = _parser(kp, name, help, f"sidflow pipeline {name} --host http://localhost:3000 "
                    + ("--cron '0 0 3 * * *' " if name == "schedule" else "")
                    + "teachers=hf://stable-diffusion-v1-5/stable-diffusion-v1-5 registry=s3://my-bucket/registry "
                    "artifact_root=s3://my-bucket/sidflow prompts=s3://my-bucket/prompts.txt kimg=2000",
                    description=help + ". KEY=VALUE overrides are parsed into the types the compiled pipeline "
                    "declares (false, 1e-5, 8 arrive as JSON bool, float, int).")
        p.add_argument("params", nargs="*", metavar="KEY=VALUE", help="pipeline parameter overrides")
        p.add_argument("--host", help="KFP API endpoint, e.g. http://localhost:3000 after `kubectl port-forward -n "
                                      "kubeflow svc/ml-pipeline-ui 3000:80` (default: $KF_PIPELINES_ENDPOINT, "
                                      "then in-cluster or kubeconfig discovery)")
        p.add_argument("--namespace", help="profile namespace of a multi-user Kubeflow (default: kfp's context)")
        p.add_argument("--existing-token", help="bearer token for the API server (multi-user Kubeflow)")
        p.add_argument("--experiment", default="sidflow", help="experiment name, created if missing")
        p.add_argument("--pipeline-root", help="artifact root of the run, e.g. s3://bucket/kfp (default: the "
                                               "kfp-launcher ConfigMap's defaultPipelineRoot)")
        p.add_argument("--package", default=kfp_compile.DEFAULT_OUT, help="compiled pipeline YAML (default: the one "
                       "shipped in the package)")
        p.add_argument("--service-account", help="Kubernetes ServiceAccount the run's pods use")
        p.add_argument("--dry-run", action="store_true", help="print the typed parameters and stop")
        _image_flags(p)
        if name == "submit":
            p.add_argument("--run-name", help="run name (default: the package file name and the time)")
        else:
            p.add_argument("--cron", required=True, help='6 fields, seconds first: "0 0 3 * * *" = 03:00 daily; '
                                                         "or @daily, @every 24h")
            p.add_argument("--name", default="sid-distill", help="recurring run name")
    args = parser.parse_args(argv)
    from sidflow.storage import StorageError

    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, PermissionError, StorageError) as e:  # one clear line, no traceback
        print(f"sidflow {args.command}: error: {e}", file=sys.stderr)
        return 2


def _image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-registry", help="registry holding your pushes of sidflow-runtime and sidflow-trainer "
                   "(`make images IMAGE_REPO=<registry>/sidflow`), e.g. registry.example.com/ml; default "
                   "ghcr.io/example")
    p.add_argument("--runtime-digest", help="pin sidflow-runtime by digest (sha256:…)")
    p.add_argument("--trainer-digest", help="pin sidflow-trainer by digest (sha256:…)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
