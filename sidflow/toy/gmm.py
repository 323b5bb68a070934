"""The analytic teacher: a class-conditional 2-D Gaussian mixture under the SD VP schedule (method.md §10).

Its x0 predictor is closed form, so the SiD method can be checked against ground truth: `distill` trains with
the shipped loop (`sidflow.train.loop.train`, the one the distill stage runs) on MLP networks that start as the
teacher plus a zero-initialised residual (as UNet copies start equal to the teacher), one-hot classes standing
in for prompt embeddings.
"""

import dataclasses
import math
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sidflow.method.sid import generate
from sidflow.method.vp import VP, at, eps_from_x0, scaled_linear_alphas_cumprod, vp_tables


@dataclass
class GMM:
    """Components k with means mu[k], shared isotropic std sigma, class labels cls[k], equal weights."""

    mu: Tensor  # [K, 2]
    cls: Tensor  # [K] class of each component
    sigma: float
    n_classes: int

    def x0(self, x_t: Tensor, a_t: Tensor, s_t: Tensor, c: Tensor) -> Tensor:
        """Return E[x0 | x_t, c] [B, 2]; c [B, n_classes] one-hot, a zero row means unconditional (∅)."""
        var = a_t**2 * self.sigma**2 + s_t**2  # [B, 1]  variance of x_t given a component
        d2 = ((x_t[:, None, :] - a_t[:, None] * self.mu[None]) ** 2).sum(-1)  # [B, K]
        logp = -d2 / (2 * var) - math.log(2 * math.pi) - torch.log(var)  # [B, K]  (2-D: log of var^(d/2))
        member = c[:, self.cls] if c.ndim == 2 else None  # [B, K] 1 for the class's components
        uncond = c.sum(-1, keepdim=True) == 0  # [B, 1]
        member = torch.where(uncond, torch.ones_like(member), member)
        r = torch.softmax(logp.masked_fill(member == 0, -torch.inf), dim=-1)  # [B, K] responsibilities
        mean = self.mu[None] + (a_t * self.sigma**2 / var)[:, None] * (x_t[:, None] - a_t[:, None] * self.mu[None])
        return (r[..., None] * mean).sum(1)  # [B, 2]

    def sample(self, n: int, label: int | None, generator: torch.Generator) -> Tensor:
        """Return n samples [n, 2] of one class (or of the whole mixture when label is None)."""
        ks = torch.arange(len(self.mu)) if label is None else torch.nonzero(self.cls == label).flatten()
        k = ks[torch.randint(len(ks), (n,), generator=generator)]
        return self.mu[k] + self.sigma * torch.randn(n, 2, generator=generator)

    def class_log_prob(self, x: Tensor, label: int) -> Tensor:
        """Return log p(c = label | x) [n] under the data distribution (t = 0), equal class priors."""
        logp = -((x[:, None] - self.mu[None]) ** 2).sum(-1) / (2 * self.sigma**2)  # [n, K]
        per_class = torch.stack([torch.logsumexp(logp[:, self.cls == c], -1) for c in range(self.n_classes)], -1)
        return per_class[:, label] - torch.logsumexp(per_class, -1)


def six_point_gmm(sigma: float = 0.1, radius: float = 1.5) -> GMM:
    """Return 3 classes × 2 components on a circle (class k owns angles 120k° and 120k° + 60°)."""
    angles = torch.arange(6) * math.pi / 3
    mu = radius * torch.stack([angles.cos(), angles.sin()], -1)
    return GMM(mu=mu, cls=torch.arange(6) // 2, sigma=sigma, n_classes=3)


class Residual(nn.Module):
    """net(x_t, t, c) = teacher ε̂ + MLP(x_t, t, c), the MLP's last layer zero-initialised."""

    def __init__(self, teacher, n_classes: int, width: int = 128):
        super().__init__()
        self.teacher = teacher
        self.mlp = nn.Sequential(nn.Linear(2 + 2 + n_classes, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _inputs(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        tt = (t.float() / 1000)[:, None]
        return torch.cat([x_t, tt, tt.square(), c], -1)

    def forward(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.teacher(x_t, t, c) + self.mlp(self._inputs(x_t, t, c))

    def logits(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """The network's encoder as discriminator, no new parameters: the mean of its last hidden layer [B, 1]."""
        return self.mlp[:-1](self._inputs(x_t, t, c)).mean(-1, keepdim=True)


def analytic_teacher(gmm: GMM, a: Tensor, s: Tensor):
    """Return the teacher as a score network net(x_t, t, c) -> ε̂ [B, 2]."""

    def net(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        a_t, s_t = at(a, t, x_t), at(s, t, x_t)
        return eps_from_x0(x_t, gmm.x0(x_t, a_t, s_t, c), a_t, s_t)

    return net


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Return the energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| between two point sets."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


# The DistillConfig values of an analytic-teacher run (the stage's defaults otherwise: t ~ U{20..979}, Adam
# β = (0, 0.999), the gradient guard): a toy's batch and learning rates, fp32, no EMA, no checkpoints, and no
# guidance (κ = 1), because the checks compare the samples with the data distribution, which is what SiD reaches at
# κ = 1 (the stage's default κ = 1.5 aims at a sharper one). kimg = iterations × 0.256. The fake learns 4× faster
# than G, which keeps converging past 600 iterations where equal rates of 1e-3 stall.
TOY_RUN = dict(batch=256, micro_batch=256, lr_g=5e-4, lr_fake=2e-3, kappa=1.0, precision="fp32",
               ema_halflife_kimg=0.0, checkpoints=False, resume=False, log_every=100)


def distill(gmm: GMM, cfg, real: GMM | None = None, adv_weight: float = 1.0, disc_weight: float = 1.0,
            start_kimg: float = 0.0, n_real: int = 20_000):
    """Distill the analytic teacher of `gmm` into a generator with the shipped loop under cfg (a DistillConfig,
    e.g. of TOY_RUN; its output is replaced by a scratch directory); return (G, teacher, a, s).

    With `real`, the adversarial term is on: n_real labelled samples of that mixture are the real data."""
    from sidflow.train.loop import GAN, Conditions, Networks, train

    a, s = vp_tables(scaled_linear_alphas_cumprod())
    teacher = analytic_teacher(gmm, a, s)
    torch.manual_seed(cfg.seed)  # the residual MLPs' initial weights
    G, fake = Residual(teacher, gmm.n_classes), Residual(teacher, gmm.n_classes)
    exported = {}
    nets = Networks(G=G, fake=fake, teacher=teacher, score=lambda net: net, vp=VP(a, s),
                    null=torch.zeros(1, gmm.n_classes), shape=(2,),
                    export=lambda net, *_: exported.update(G=net), disc=lambda net: net.logits)
    onehot = torch.eye(gmm.n_classes)
    classes = Conditions(gmm.n_classes, lambda idx: onehot[idx])  # [b, n_classes]
    gan = None
    if real is not None:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        labels = torch.randint(real.n_classes, (n_real,), generator=g)
        points = torch.stack([real.sample(1, int(y), g)[0] for y in labels])  # [n_real, 2]
        gan = GAN(real=lambda idx: (points[idx], onehot[labels[idx]]), size=n_real, adv_weight=adv_weight,
                  disc_weight=disc_weight, gan_start_kimg=start_kimg)
    output = tempfile.mkdtemp(prefix="sidflow-gmm-")  # the loop writes its logs there
    try:
        train(dataclasses.replace(cfg, output=output), nets, classes, gan)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    return exported["G"], teacher, a, s


@torch.no_grad()
def one_step_samples(G, gmm: GMM, a: Tensor, s: Tensor, n: int, label: int, seed: int = 123) -> Tensor:
    """Return n one-step samples [n, 2] of class `label`."""
    g = torch.Generator().manual_seed(seed)
    c = torch.eye(gmm.n_classes)[label].expand(n, -1)
    return generate(G, torch.randn(n, 2, generator=g), c, VP(a, s))
