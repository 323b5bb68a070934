"""SiD on the analytic Gaussian-mixture teacher, correct and with deliberately broken losses (CPU, ~1 min).

Energy distance of one-step samples to each class's true mixture (mean over the 3 classes), at the start
(G = teacher used in one step) and after training. Mirrors the bounds in tests/test_method.py.

  python benchmarks/gmm_mutants.py --iters 1500
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import RESULTS, record  # noqa: E402

from sidflow.method.vp import scaled_linear_alphas_cumprod, vp_tables  # noqa: E402
from sidflow.toy.gmm import analytic_teacher, energy_distance, one_step_samples, six_point_gmm, train_sid  # noqa: E402
from sidflow.toy.mutants import MUTANTS  # noqa: E402


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

    rows = {"start": energy(analytic_teacher(gmm, a, s))}
    rows["correct"] = energy(train_sid(gmm, iters=args.iters)[0])
    for name, loss in MUTANTS.items():
        rows[name] = energy(train_sid(gmm, iters=args.iters, generator_loss=loss)[0])
    metrics = {"energy_distance": {k: round(v, 4) for k, v in rows.items()},
               "ratio_to_start": {k: round(v / rows["start"], 3) for k, v in rows.items()}}
    record("gmm_mutants", "gmm_mutants.json", 0, metrics, vars(args), Path(args.out))


if __name__ == "__main__":
    main()
