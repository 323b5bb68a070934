"""Learning-curve sweep of SiD-LSG on the toy teacher: shapes-FID and prompt accuracy at several kimg milestones.

Each run trains in segments (the stage resumes from its own end-of-segment checkpoint, which replays exactly) and
is scored after every segment with the same evaluator, prompts and seeds as benchmarks/toy_quality.py. Runs are
given as `name:key=value,...` with DistillConfig fields; several sweeps can share one GPU as separate processes.

  python benchmarks/toy_sweep.py --runs "a:lr_g=1e-5,lr_fake=1e-5,kappa=2" --milestones 50,100,200 --file s.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import RESULTS, record  # noqa: E402
from toy_quality import eval_set, evaluate, parse_runs  # noqa: E402

from sidflow.config import override  # noqa: E402
from sidflow.toy import evaluator, shapes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="examples/toy-teacher")
    p.add_argument("--evaluators", default=None, help="comma-separated evaluator directories (default: "
                   "<teacher>/evaluator, the demo's)")
    p.add_argument("--runs", required=True, help="'name:key=value,...;name2:...' DistillConfig overrides")
    p.add_argument("--milestones", default="25,50,100,200", help="kimg at which each run is scored")
    p.add_argument("--n", type=int, default=2000, help="images per score")
    p.add_argument("--file", default="toy_sweep.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from sidflow.generator import load_generator, sample
    from sidflow.stages.distill import DistillConfig, run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = args.evaluators.split(",") if args.evaluators else [str(Path(args.teacher) / "evaluator")]
    models = [evaluator.load(path, device) for path in paths]
    prompts, reference, seeds = eval_set(args.n)
    work = Path(tempfile.mkdtemp(prefix="sidflow-sweep-"))
    (work / "prompts.txt").write_text("\n".join(sorted({shapes.caption(*c) for c in shapes.combos("train")})))
    curves = {}
    for name, overrides in parse_runs(args.runs):
        base = DistillConfig(teacher=args.teacher, prompts=str(work / "prompts.txt"), output=str(work / name),
                             batch=1024, micro_batch=1024, lr_g=1e-5, lr_fake=1e-5, ema_halflife_kimg=20)
        base = override(base, overrides)
        curves[name] = {"overrides": overrides, "points": []}
        start = time.time()
        for kimg in [float(m) for m in args.milestones.split(",")]:
            result = run(override(base, {"kimg": kimg, "checkpoint_kimg": kimg, "resume": True}))
            if result.interrupted:  # SIGTERM: no model of this milestone was exported, so there is nothing to score
                print(json.dumps({"run": name, "interrupted_at_kimg": result.kimg}), flush=True)
                break
            minutes = (time.time() - start) / 60
            gen, info = load_generator(result.model_uri, device)
            scores, _ = evaluate(models, lambda caps: sample(gen, info, caps, seeds, batch=512), prompts, reference)
            point = {"kimg": result.kimg, "minutes": round(minutes, 2), **scores,
                     "loss_g": result.metrics.get("loss_g"), "loss_fake": result.metrics.get("loss_fake"),
                     "images_per_s": result.metrics.get("images_per_s")}
            curves[name]["points"].append(point)
            print(json.dumps({"run": name, **point}), flush=True)
            record("toy_sweep", args.file, 1 if device == "cuda" else 0, {"curves": curves}, vars(args),
                   Path(args.out), final=False)
    record("toy_sweep", args.file, 1 if device == "cuda" else 0, {"curves": curves}, vars(args), Path(args.out))


if __name__ == "__main__":
    main()
