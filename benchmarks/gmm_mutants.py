"""SiD on the analytic Gaussian-mixture teacher, correct and with deliberately broken losses (CPU, a few minutes).

Energy distance of one-step samples to each class's true mixture (mean over the 3 classes), at the start
(G = teacher used in one step) and after training with the shipped loop. Mirrors the bounds in tests/test_method.py.

  python benchmarks/gmm_mutants.py --iters 1500
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import RESULTS, record  # noqa: E402

from sidflow.method.vp import scaled_linear_alphas_cumprod, vp_tables  # noqa: E402
from sidflow.stages.distill import DistillConfig  # noqa: E402
from sidflow.toy.gmm import TOY_RUN, analytic_teacher, distill, energy_distance, one_step_samples, six_point_gmm  # noqa: E402
from sidflow.toy.mutants import MUTANTS, installed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    gmm = six_point_gmm(args.sigma)
    a, s = vp_tables(scaled_linear_alphas_cumprod())

    def energy(G) -> float:
        g = torch.Generator().manual_seed(5)
        return sum(energy_distance(one_step_samples(G, gmm, a, s, 600, c), gmm.sample(600, c, g)) for c in range(3)) / 3

    cfg = DistillConfig(**TOY_RUN, kimg=args.iters * 0.256)
    rows = {"start": energy(analytic_teacher(gmm, a, s))}
    rows["correct"] = energy(distill(gmm, cfg)[0])
    for name in MUTANTS:
        with installed(name):
            rows[name] = energy(distill(gmm, cfg)[0])
    metrics = {"energy_distance": {k: round(v, 4) for k, v in rows.items()},
               "ratio_to_start": {k: round(v / rows["start"], 3) for k, v in rows.items()}}
    record("gmm_mutants", "gmm_mutants.json", 0, metrics, vars(args), Path(args.out))


if __name__ == "__main__":
    main()
