"""The analytic teacher: a class-conditional 2-D Gaussian mixture under the SD VP schedule (method.md §10).

Its x0 predictor is closed form, so the SiD losses in `sidflow.method` can be checked against ground truth:
`train_sid` runs the same fake-step and generator-step functions the UNet loop runs, on MLP networks that
start as the teacher plus a zero-initialised residual (as UNet copies start equal to the teacher).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sidflow.method.guidance import drop_prompts, kappas
from sidflow.method.sid import fake_step_loss, generate, generator_step_loss
from sidflow.method.vp import VP, at, eps_from_x0, sample_t, scaled_linear_alphas_cumprod, vp_tables


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


def six_point_gmm(sigma: float = 0.1) -> GMM:
    """Return 3 classes × 2 components on the unit circle (class k owns angles 120k° and 120k° + 60°)."""
    angles = torch.arange(6) * math.pi / 3
    mu = 1.5 * torch.stack([angles.cos(), angles.sin()], -1)
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

    def forward(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        tt = (t.float() / 1000)[:, None]
        return self.teacher(x_t, t, c) + self.mlp(torch.cat([x_t, tt, tt.square(), c], -1))


def analytic_teacher(gmm: GMM, a: Tensor, s: Tensor):
    """Return the teacher as a score network net(x_t, t, c) -> ε̂ [B, 2]."""

    def net(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        a_t, s_t = at(a, t, x_t), at(s, t, x_t)
        return eps_from_x0(x_t, gmm.x0(x_t, a_t, s_t, c), a_t, s_t)

    return net


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Return the energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| between two point sets."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def train_sid(gmm: GMM, iters: int = 1500, batch: int = 256, lr: float = 1e-3, guidance: str = "lsg",
              kappa: float = 1.0, alpha: float = 1.0, seed: int = 0, generator_loss=None):
    """Distill the analytic teacher into a one-step generator; return (G, teacher, a, s).

    `generator_loss` replaces `generator_step_loss` (tests pass deliberately broken variants to prove the
    checks catch them).
    """
    torch.manual_seed(seed)
    a, s = vp_tables(scaled_linear_alphas_cumprod())
    vp = VP(a, s)
    teacher = analytic_teacher(gmm, a, s)
    G, fake = Residual(teacher, gmm.n_classes), Residual(teacher, gmm.n_classes)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(fake.parameters(), lr=lr, betas=(0.0, 0.999))
    k = kappas(guidance, kappa)
    p_drop = 0.1 if (k["kappa_1"] != 1 or k["kappa_2"] != 1) and (k["kappa_1"] != 0 or k["kappa_2"] != 0) else 0.0
    null = torch.zeros(1, gmm.n_classes)
    g = torch.Generator().manual_seed(seed)
    gen_loss = generator_loss or generator_step_loss
    onehot = torch.eye(gmm.n_classes)

    def draw():
        c = onehot[torch.randint(gmm.n_classes, (batch,), generator=g)]
        return c, torch.randn(batch, 2, generator=g), torch.randn(batch, 2, generator=g), sample_t(batch, generator=g)

    for _ in range(iters):
        c, z, eps, t = draw()  # fake step
        c = drop_prompts(c, null, p_drop, generator=g)
        with torch.no_grad():
            x_g = generate(G, z, c, vp)
        fake_step_loss(fake, x_g, c, null, t, eps, vp, kappa_1=k["kappa_1"]).sum().div(batch).backward()
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        c, z, eps, t = draw()  # generator step
        fake.requires_grad_(False)
        x_g = generate(G, z, c, vp, grad_last=True)
        loss = gen_loss(teacher, fake, x_g, c, null, t, eps, vp, kappa_2=k["kappa_2"], kappa_4=k["kappa_4"],
                        alpha=alpha)
        loss.sum().div(batch).backward()
        fake.requires_grad_(True)
        torch.nn.utils.clip_grad_value_(G.parameters(), 1e5)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    return G, teacher, a, s


@torch.no_grad()
def one_step_samples(G, gmm: GMM, a: Tensor, s: Tensor, n: int, label: int, seed: int = 123) -> Tensor:
    """Return n one-step samples [n, 2] of class `label`."""
    g = torch.Generator().manual_seed(seed)
    c = torch.eye(gmm.n_classes)[label].expand(n, -1)
    return generate(G, torch.randn(n, 2, generator=g), c, VP(a, s))
