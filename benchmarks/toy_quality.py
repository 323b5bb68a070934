"""The toy quality table: real data, the toy teacher with DDIM at several steps and CFG scales, SiD rows.

Same evaluators, prompts and seeds for every row. shapes-FID is the Fréchet distance of evaluator features against
fresh real renders of the seen caption combinations; prompt accuracy is measured on seen and held-out combinations.
One small classifier's FID moves with its training seed, so every row is scored by each evaluator shipped with the
teacher (`<teacher>/evaluator*`): shapes_fid is their mean, shapes_fid_spread half their range, and a row beats
another only when its FID is lower under every evaluator (`beats_teacher_25`: against the 25-step teacher row at
the same κ). A row with `stage=finetune` runs the finetune stage: few-step SiD with the adversarial term on real
shapes pairs (`--real-pairs` renders of the training split, packed and encoded as a user's data would be);
`init=run<i>` starts it from the i-th run of the same command (give that run `checkpoints=true` so its fake
network is kept too).

  python benchmarks/toy_quality.py --teacher examples/toy-teacher --rows real,teacher,sid \
      --sid-runs "sid-lsg:kappa=2;sid-adv:stage=finetune,steps=4,kappa=2"
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, record  # noqa: E402

from sidflow.config import override  # noqa: E402
from sidflow.toy import evaluator, shapes  # noqa: E402


def eval_set(n: int) -> tuple[dict, np.ndarray, list[int]]:
    """The prompts (seen and held-out combinations), real reference renders and seeds every row is scored on."""
    prompts = {"seen": shapes.sample(n, 12_345, "train")[1], "heldout": shapes.sample(n, 12_346, "heldout")[1]}
    return prompts, shapes.sample(n * 5, 777, "train")[0], list(range(n))


def evaluate(models: list, make_images, prompts: dict, reference: np.ndarray) -> dict:
    """Return shapes-FID (seen prompts) and prompt accuracy (seen, held-out) of a sampler under each evaluator:
    the mean, the spread (half the range) and the value under each."""
    seen = make_images(prompts["seen"])
    held = make_images(prompts["heldout"])
    fid = [evaluator.shapes_fid(m, seen, reference) for m in models]
    acc = [evaluator.prompt_accuracy(m, seen, prompts["seen"]) for m in models]
    held_acc = [evaluator.prompt_accuracy(m, held, prompts["heldout"]) for m in models]
    return {"shapes_fid": round(float(np.mean(fid)), 3), "shapes_fid_spread": round((max(fid) - min(fid)) / 2, 3),
            "prompt_acc_seen": round(float(np.mean(acc)), 4), "prompt_acc_heldout": round(float(np.mean(held_acc)), 4),
            "shapes_fid_by_evaluator": [round(f, 3) for f in fid],
            "prompt_acc_seen_by_evaluator": [round(a, 4) for a in acc]}, seen


def beats(row: dict, other: dict) -> bool:
    """True when `row` has the lower shapes-FID under every evaluator both were scored by."""
    a, b = row.get("shapes_fid_by_evaluator"), other.get("shapes_fid_by_evaluator")
    return bool(a and b and len(a) == len(b) and all(x < y for x, y in zip(a, b)))


def compare(rows: list[dict]) -> None:
    """Mark each SiD row against the 25-step teacher row at the same κ: beats_teacher_25 (lower FID under every
    evaluator), fid_vs_teacher_25 (ratio of the means) and acc_vs_teacher_25 (seen prompt accuracy difference)."""
    teachers = {r.get("kappa"): r for r in rows if r["row"] == "teacher" and r["steps"] == 25}
    for r in rows:
        t = teachers.get(r.get("kappa"))
        if r["row"].startswith("sid") and t is not None and r.get("kappa") is not None:
            r["beats_teacher_25"] = beats(r, t)
            r["fid_vs_teacher_25"] = round(r["shapes_fid"] / t["shapes_fid"], 3)
            r["acc_vs_teacher_25"] = round(r["prompt_acc_seen"] - t["prompt_acc_seen"], 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="examples/toy-teacher")
    p.add_argument("--evaluators", default=None, help="comma-separated evaluator directories (default: every "
                   "<teacher>/evaluator* directory)")
    p.add_argument("--real-pairs", type=int, default=20_000, help="real shapes pairs for stage=finetune rows")
    p.add_argument("--n", type=int, default=2000, help="images per row and split")
    p.add_argument("--rows", default="real,teacher,sid")
    p.add_argument("--teacher-steps", default="1,2,4,25")
    p.add_argument("--teacher-cfg", default="1,1.5,2")
    p.add_argument("--sid-runs", default="sid-lsg:kappa=2;sid-lsg:kappa=1.5",
                   help="'row:key=value,...;...' DistillConfig overrides, one SiD row each (row names as in the issue)")
    p.add_argument("--kimg", type=float, default=200.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1024)
    p.add_argument("--ema", type=float, default=20.0, help="EMA half-life kimg")
    p.add_argument("--curve-kimg", type=float, default=None,
                   help="also score each SiD run's EMA generator every this many kimg (its checkpoints), as `curve`")
    p.add_argument("--merge", default=None, help="comma-separated result files to merge into --file (no runs)")
    p.add_argument("--grid", default=None, help="write a sample grid PNG here (teacher 25 steps vs SiD one step)")
    p.add_argument("--file", default="toy_quality.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.merge:
        return merge(args)

    from sidflow.generator import image_grid, load_generator, sample
    from sidflow.stages import distill, finetune
    from sidflow.teacher import load_teacher
    from sidflow.toy.train_teacher import sample_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = (args.evaluators.split(",") if args.evaluators
             else sorted(str(p) for p in Path(args.teacher).glob("evaluator*") if p.is_dir()))
    model = [evaluator.load(path, device) for path in paths]
    config_paths = {"evaluators": paths}
    prompts, reference, seeds = eval_set(args.n)
    rows, grids = [], {}
    config = {k: v for k, v in vars(args).items() if k != "out"} | config_paths

    def save(final=False):  # after every row, so a run cut short still leaves its rows
        compare(rows)
        record("toy_quality", args.file, 1 if device == "cuda" else 0, {"rows": rows},
               config | {"grid_rows": list(grids)}, Path(args.out), final=final)

    training = json.loads((Path(args.teacher) / "training.json").read_text())
    wanted = set(args.rows.split(","))

    def real(caps):  # fresh renders of the captions, render i from seed i
        return np.stack([shapes.render(*shapes.parse(c).values(), np.random.default_rng(i))
                         for i, c in enumerate(caps)])

    if "real" in wanted:
        metrics, _ = evaluate(model, real, prompts, reference)
        rows.append({"row": "real", "steps": None, "kappa": None, **metrics, "images_seen": None,
                     "gpu_minutes": None})
    teacher = load_teacher(args.teacher, device)
    if "real-vae" in wanted:  # the same renders through the teacher's VAE: what a latent generator can reach at best
        metrics, _ = evaluate(model, lambda caps: vae_round_trip(teacher, real(caps)), prompts, reference)
        rows.append({"row": "real-vae", "steps": None, "kappa": None, **metrics, "images_seen": None,
                     "gpu_minutes": None})
        print(json.dumps(rows[-1]), flush=True)
        save()
    if "teacher" in wanted:
        for steps in [int(s) for s in args.teacher_steps.split(",")]:
            for g in [float(s) for s in args.teacher_cfg.split(",")]:
                metrics, imgs = evaluate(model, lambda caps: sample_teacher(teacher, caps, seeds, steps, g),
                                         prompts, reference)
                rows.append({"row": "teacher", "steps": steps, "kappa": g, **metrics,
                             "images_seen": training["metrics"]["unet_steps"] * training["config"]["batch"],
                             "gpu_minutes": round(training["metrics"]["minutes"], 2)})
                grids[f"teacher-{steps}-{g}"] = imgs[:16]
                print(json.dumps(rows[-1]), flush=True)
                save()
    if "sid" in wanted:
        work = Path(tempfile.mkdtemp(prefix="sidflow-toy-"))
        (work / "prompts.txt").write_text("\n".join(sorted({shapes.caption(*c) for c in shapes.combos("train")})))
        for i, (row, overrides) in enumerate(parse_runs(args.sid_runs)):
            given, overrides = dict(overrides), dict(overrides)
            stage = finetune if overrides.pop("stage", "distill") == "finetune" else distill
            base = dict(teacher=args.teacher, prompts=str(work / "prompts.txt"), output=str(work / f"run{i}"),
                        lr_g=args.lr, lr_fake=args.lr, batch=args.batch, micro_batch=args.micro_batch, kimg=args.kimg,
                        ema_halflife_kimg=args.ema, checkpoints=False)
            if args.curve_kimg:  # a checkpoint at each curve point, all kept until they are scored
                base |= dict(checkpoints=True, checkpoint_kimg=args.curve_kimg, keep_checkpoints=10_000)
            if stage is finetune:
                base["data"] = real_pairs(work / "pairs", args.real_pairs)
                if overrides.get("init", "").startswith("run"):  # init=run<i>: the i-th run of this command
                    overrides["init"] = str(work / overrides["init"])
                cfg = override(finetune.FinetuneConfig(**base), overrides)
            else:
                cfg = override(distill.DistillConfig(**base), overrides)
            start = time.time()
            result = stage.run(cfg)
            if result.interrupted:  # SIGTERM: the model at result.model_uri is not this run's end
                raise SystemExit(f"{row} was interrupted at {result.kimg:.1f} kimg; its row is not recorded")
            minutes = (time.time() - start) / 60
            gen, info = load_generator(result.model_uri, device)
            metrics, imgs = evaluate(model, lambda caps: sample(gen, info, caps, seeds, batch=512), prompts, reference)
            rows.append({"row": row, "steps": cfg.steps, "kappa": cfg.kappa, **metrics,
                         "images_seen": int(result.kimg * 1000), "gpu_minutes": round(minutes, 2),
                         "config": given | ({"stage": "finetune"} if stage is finetune else {})})
            grids[f"{row}-{cfg.steps}-{cfg.kappa}"] = imgs[:16]
            print(json.dumps(rows[-1]), flush=True)
            save()
            if args.curve_kimg:
                rows[-1]["curve"] = curve(model, gen, info, cfg.output, prompts, reference, seeds)
                save()
    if args.grid and grids:
        from PIL import Image

        strip = np.concatenate([image_grid(v, cols=16) for v in grids.values()])
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(args.grid)
    save(final=True)


@torch.no_grad()
def vae_round_trip(teacher, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Return uint8 images [N, H, W, 3]: each image encoded as the real pairs are and decoded as generated latents
    are."""
    from sidflow.evaluate.sampling import Sampler
    from sidflow.pairs import latents

    decoder, out = Sampler(teacher, 1, None), []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(decoder.decode(latents(teacher, x.to(decoder.device))))
    return np.concatenate(out)


def curve(models: list, gen, info: dict, output: str, prompts: dict, reference: np.ndarray,
          seeds: list[int]) -> list[dict]:
    """Score the EMA generator of every checkpoint of a run, oldest first: the FID-against-kimg curve of one run
    (the generator `gen` is reloaded with each checkpoint's weights; the run's exported model was scored already)."""
    from sidflow.generator import sample
    from sidflow.train import checkpoint

    points = []
    for uri in reversed(checkpoint.complete(output)):
        state = checkpoint.load(uri)
        gen.unet.load_state_dict((state["ema"] or state["G"])["model"])
        metrics, _ = evaluate(models, lambda caps: sample(gen, info, caps, seeds, batch=512), prompts, reference)
        points.append({"kimg": round(state["nimg"] / 1000, 3), **metrics})
        print(json.dumps(points[-1]), flush=True)
    return points


def real_pairs(out: Path, n: int) -> str:
    """Pack n fresh renders of the training split (captions as the teacher saw them) as real pairs, once."""
    import io

    from PIL import Image

    from sidflow.pairs import pack

    if not (out / "manifest.json").exists():
        images, captions = shapes.sample(n, 4_242, "train")

        def rows():
            for im, c in zip(images, captions):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                yield buf.getvalue(), c

        pack(rows(), str(out))
    return str(out)


def parse_runs(text: str) -> list[tuple[str, dict[str, str]]]:
    """`row:k=v,k=v;row2:k=v` → [("row", {"k": "v", ...}), ...] (a row name may repeat)."""
    runs = []
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        name, _, body = spec.partition(":")
        runs.append((name.strip(), dict(kv.split("=", 1) for kv in filter(None, body.split(",")))))
    return runs


def merge(args) -> None:
    """Join result files written by separate processes (one GPU shared, or several calls) into one table."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
    rows = [row for part in parts for row in part["metrics"]["rows"]]
    # a merged file merges again flat; each part keeps the tree it ran on, since parts may come from several
    configs, notes = [], []
    for part in parts:
        configs += [{"git_sha": part["git_sha"], **c} for c in part["config"].get("parts", [part["config"]])]
        notes += [part["config"]["note"]] if "note" in part["config"] else part["config"].get("notes", [])
    first = parts[0]
    compare(rows)
    result = {**first, "command": " && ".join(part["command"] for part in parts),
              "metrics": {"rows": rows}, "config": {"parts": configs, "notes": notes}}
    Path(args.out, args.file).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
