"""The `sidflow` command line: every stage runs here exactly as it runs inside a Kubeflow component."""

import argparse
import json
import os
import sys

from sidflow import config


def _stage_parser(sub, name: str, cls, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    config.add_arguments(p, cls)
    return p


def _distill(args) -> int:
    from sidflow.stages import distill

    cfg = config.from_args(distill.DistillConfig, args)
    n = _gpu_count(cfg.gpus)
    if n > 1 and "WORLD_SIZE" not in os.environ:  # relaunch one process per GPU with torchrun
        distill.validate(cfg, world_size=n)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "sidflow.cli", *sys.argv[1:]]
        os.execv(sys.executable, cmd)
    if args.dry_run:
        distill.validate(cfg, world_size=distill.world_size())
        print(config.to_json(cfg))
        return 0
    result = distill.run(cfg)
    print(distill.summary(result))
    return 143 if result.interrupted else 0  # 128 + SIGTERM: the orchestrator retries and the run resumes


def _gpu_count(gpus: str) -> int:
    if gpus == "all":
        import torch

        return max(torch.cuda.device_count(), 1)
    try:
        n = int(gpus)
    except ValueError:
        raise ValueError(f"gpus={gpus!r} must be a count or 'all'") from None
    if n < 1:
        raise ValueError(f"gpus={gpus!r} must be at least 1")
    return n


def _download_teacher(args) -> int:
    from sidflow.stages import download_teacher

    result = download_teacher.run(config.from_args(download_teacher.DownloadTeacherConfig, args))
    print(json.dumps({"uri": result.uri, "fingerprint": result.fingerprint, "skipped": result.skipped}))
    return 0


def _generate(args) -> int:
    from PIL import Image

    from sidflow.generator import image_grid, load_generator, sample

    gen, info = load_generator(args.model, args.device)
    images = sample(gen, info, [args.prompt] * args.n, list(range(args.seed, args.seed + args.n)))
    grid = images[0] if args.n == 1 else image_grid(images)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(json.dumps({"out": args.out, "images": args.n, "steps": info["config"]["steps"]}))
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

    return run_demo(args.out)


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

    print(json.dumps(watch_teachers.run(config.from_args(watch_teachers.WatchTeachersConfig, args)).new, indent=1))
    return 0


def _pipeline(args) -> int:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pipeline/ and components/ sit beside sidflow/
    from pipeline import compile as kfp_pipeline

    if args.pipeline_command == "compile":
        print(kfp_pipeline.compile(args.out))
        return 0
    bad = [kv for kv in args.set or [] if "=" not in kv]
    if bad:
        raise ValueError(f"--set {bad[0]!r} is not key=value")
    arguments = dict(kv.split("=", 1) for kv in args.set or [])
    for name in ("teachers", "registry", "artifact_root", "prompts"):
        arguments[name] = getattr(args, name)
    from sidflow.stages.distill import DistillConfig

    arguments = {k: config._coerce(k, config._field_types(DistillConfig).get(k, str), v) for k, v in arguments.items()}
    kfp_pipeline.run_local(args.pipeline_root, **arguments)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sidflow` console script."""
    # Library chatter (optional torchvision backends, diffusers config notices) is not for our users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from sidflow.stages.distill import DistillConfig
    from sidflow.stages.download_teacher import DownloadTeacherConfig

    parser = argparse.ArgumentParser(prog="sidflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = _stage_parser(sub, "download-teacher", DownloadTeacherConfig, "fetch a teacher once and publish it")
    p.set_defaults(fn=_download_teacher)
    p = _stage_parser(sub, "distill", DistillConfig, "one-step SiD-LSG distillation of a teacher")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and stop")
    p.set_defaults(fn=_distill)
    p = sub.add_parser("generate", help="sample an exported generator")
    p.add_argument("--model", required=True, help="generator URI (the distill output's model/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG path; a grid when -n > 1")
    p.add_argument("-n", type=int, default=1, help="number of images (seeds seed..seed+n-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(fn=_generate)
    toy = sub.add_parser("toy", help="toy teachers").add_subparsers(dest="toy_command", required=True)
    p = toy.add_parser("build-tiny", help="build a tiny random SD-layout teacher (tests, smoke runs)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_build_tiny)
    p = toy.add_parser("make-shapes", help="write a procedural shapes text-image parquet")
    p.add_argument("--out", required=True, help="parquet URI")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    p.set_defaults(fn=_make_shapes)
    from sidflow.toy.train_teacher import ToyTeacherConfig

    p = _stage_parser(toy, "train-teacher", ToyTeacherConfig, "train a small SD-layout teacher on a text-image parquet")
    p.set_defaults(fn=_train_teacher)
    p = toy.add_parser("train-evaluator", help="train the shapes attribute classifier (shapes-FID, prompt accuracy)")
    p.add_argument("--out", required=True, help="directory")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_train_evaluator)
    p = sub.add_parser("demo", help="the whole job on the bundled teacher, on this machine")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(fn=_demo)
    from sidflow.stages.register import RegisterConfig

    p = sub.add_parser("registry", help="the model registry: register, list, show, promote, reindex")
    p.set_defaults(fn=_registry)
    reg = p.add_subparsers(dest="registry_command", required=True)
    _stage_parser(reg, "register", RegisterConfig, "register an evaluated model; promote it if it passes the gate")
    for name, help in [("list", "list the versions of a model"), ("show", "print one version (default: champion)"),
                       ("promote", "make a version the champion, no gate"),
                       ("reindex", "rebuild index.json from versions/")]:
        p = reg.add_parser(name, help=help, description=help)
        p.add_argument("--registry", required=True, help="registry root URI (s3://bucket/prefix or a local path)")
        p.add_argument("--name", default="sid-generator", help="registered model name")
        if name in ("show", "promote"):
            p.add_argument("--version", type=int, required=name == "promote", help="version number")
        if name == "list":
            p.add_argument("--reindex", action="store_true", help="rebuild index.json from versions/ first")
    from sidflow.stages.watch_teachers import WatchTeachersConfig

    p = _stage_parser(sub, "watch-teachers", WatchTeachersConfig, "list teachers with no registered distillation yet")
    p.set_defaults(fn=_watch_teachers)
    p = sub.add_parser("pipeline", help="the sid-distill Kubeflow pipeline: compile it, or run it here (kfp.local)")
    p.set_defaults(fn=_pipeline)
    kp = p.add_subparsers(dest="pipeline_command", required=True)
    p = kp.add_parser("compile", help="compile the pipeline to IR YAML")
    p.add_argument("--out", default="pipeline/sid_distill.yaml", help="output YAML path")
    p = kp.add_parser("run-local", help="run the whole pipeline on this machine (kfp.local, no pod settings)")
    p.add_argument("--pipeline-root", default="kfp-local", help="local directory for kfp.local outputs")
    p.add_argument("--teachers", required=True, help="comma-separated teacher sources")
    p.add_argument("--registry", required=True, help="registry root URI")
    p.add_argument("--artifact-root", required=True, help="artifact root URI (teachers/ and runs/ go under it)")
    p.add_argument("--prompts", required=True, help="training prompts URI")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another pipeline parameter (repeatable)")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # user-caused: one clear line, no traceback
        print(f"sidflow {args.command}: error: {e}", file=sys.stderr)
        return 2


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
