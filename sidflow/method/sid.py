"""The SiD losses: fake-score regression and the SiD generator loss (method.md §3, §4, §9).

Losses return per-sample tensors [B]; the training loop divides by the global batch b_tot in one place.
"""

from typing import Any, Callable

import torch
from torch import Tensor

from sidflow.method.guidance import ScoreNet, guided_eps
from sidflow.method.vp import VP, add_noise, step_times, x0_from_eps


def _pix(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))  # every dim but batch: latents [B, C, H, W] or toy points [B, 2]


def sid_generator_loss(x_g: Tensor, y_r: Tensor, y_f: Tensor, *, alpha: float = 1.0) -> Tensor:
    """Return the per-sample SiD generator loss [B]. method.md §4; pseudocode §9 (α = 1.0 for SD).

    Σ_pix (y_r − y_f) ⊙ [(y_r − x_g) − α (y_r − y_f)] / w, with w = max(1e-5, mean |x_g − y_r|).
    """
    w = sid_normaliser(x_g, y_r)  # [B]  the only detached term (§4)
    d = y_r - y_f  # [B, ...]  y_r and y_f keep their graphs w.r.t. x_t, hence x_g
    return (d * ((y_r - x_g) - alpha * d)).sum(dim=_pix(x_g)) / w  # [B]


def sid_normaliser(x_g: Tensor, y_r: Tensor) -> Tensor:
    """Return w = max(1e-5, mean_pix |x_g − y_r|) per sample [B], detached (method.md §4; §6.2 reuses it)."""
    return (x_g - y_r).abs().mean(dim=_pix(x_g)).clamp(min=1e-5).detach()


def fake_score_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Return Σ_pix ‖ε̂ − ε‖² per sample, shape [B]: uniform weight in t (method.md §3 step 4)."""
    return (eps_pred - eps).square().sum(dim=_pix(eps))


def fake_step_loss(
    fake: ScoreNet, x_g: Tensor, c: Tensor, null: Tensor, t: Tensor, eps: Tensor, vp: VP, *, kappa_1: float,
) -> Tensor:
    """Return the fake-score loss [B] on generator samples x_g (no grad to G). method.md §3.

    c has already had prompt dropout applied; the regression target is the plain ε (κ1 acts on the fake only).
    """
    a_t, s_t = vp.at(t, x_g)
    x_t = add_noise(x_g.detach(), eps, a_t, s_t)  # [B, ...]  x_g is data here: no grad to G (§3 step 2)
    return fake_score_loss(guided_eps(fake, x_t, t, c, null, kappa=kappa_1), eps)


def generator_step_loss(
    teacher: ScoreNet, fake: ScoreNet, x_g: Tensor, c: Tensor, null: Tensor, t: Tensor, eps: Tensor, vp: VP, *,
    kappa_2: float, kappa_4: float, alpha: float = 1.0,
) -> Tensor:
    """Return the SiD generator loss [B]; gradients flow through both UNets into x_g. method.md §4, §9.

    The guidance scales are keyword-only: κ2 (the fake's) and κ4 (the teacher's) are easy to swap by position.
    """
    return generator_step_terms(teacher, fake, x_g, c, null, t, eps, vp, kappa_2=kappa_2, kappa_4=kappa_4,
                                alpha=alpha)[0]


def generator_step_terms(
    teacher: ScoreNet, fake: ScoreNet, x_g: Tensor, c: Tensor, null: Tensor, t: Tensor, eps: Tensor, vp: VP, *,
    kappa_2: float, kappa_4: float, alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (the SiD generator loss [B], its normaliser w [B], the noised sample x_t it was taken at); the
    adversarial term (method.md §6.2) is divided by the same w and scores the same x_t."""
    a_t, s_t = vp.at(t, x_g)
    x_t = add_noise(x_g, eps, a_t, s_t)  # [B, ...]  keeps the graph to x_g
    y_r = x0_from_eps(x_t, guided_eps(teacher, x_t, t, c, null, kappa=kappa_4), a_t, s_t)  # teacher x0, CFG κ4
    y_f = x0_from_eps(x_t, guided_eps(fake, x_t, t, c, null, kappa=kappa_2), a_t, s_t)  # fake x0, CFG κ2 (= κ3)
    return sid_generator_loss(x_g, y_r, y_f, alpha=alpha), sid_normaliser(x_g, y_r), x_t


def generator_step_split(
    teacher: ScoreNet, fake: ScoreNet, x_g: Tensor, c: Tensor, null: Tensor, t: Tensor, eps: Tensor, vp: VP, *,
    kappa_2: float, kappa_4: float, alpha: float = 1.0,
    objective: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Any]],
) -> tuple[Tensor, Any]:
    """Return (∂J/∂x_g, aux) for J, aux = objective(loss [B], w [B], x_t) of `generator_step_terms`' three values,
    with one UNet graph alive at a time instead of both (method.md §4).

    The gradient stops at x_g: the caller runs G's backward once with it. The network whose guided evaluation is
    cheaper runs twice: first without a graph, for its x0 y_2 as a leaf; J is then differentiated with respect to x_g
    and y_2, which backpropagates through the other network and frees its graph; then the cheaper one runs again,
    with its graph, and takes ∂J/∂y_2 back to x_t. Only w is detached, as in the joint path, so both give the same
    gradient, for one more forward of that network (two on a doubled CFG batch). On a tie the teacher runs twice: it
    is frozen and without dropout, so its second forward computes its first, which the fake in train mode need not.
    """
    a_t, s_t = vp.at(t, x_g)
    x = x_g.detach().requires_grad_()  # [B, ...]  a leaf: G's graph waits for the summed gradient

    def x0(net: ScoreNet, kappa: float, x_t: Tensor) -> Tensor:
        return x0_from_eps(x_t, guided_eps(net, x_t, t, c, null, kappa=kappa), a_t, s_t)

    teacher_twice = _evaluations(kappa_4) <= _evaluations(kappa_2)
    twice, once = ((teacher, kappa_4), (fake, kappa_2)) if teacher_twice else ((fake, kappa_2), (teacher, kappa_4))
    x_t = add_noise(x, eps, a_t, s_t)  # [B, ...]
    with torch.no_grad():
        y_2 = x0(*twice, x_t).requires_grad_()  # [B, ...]  its value, as a leaf
    y_1 = x0(*once, x_t)  # [B, ...]  with its graph
    y_r, y_f = (y_2, y_1) if teacher_twice else (y_1, y_2)
    J, aux = objective(sid_generator_loss(x, y_r, y_f, alpha=alpha), sid_normaliser(x, y_r), x_t)
    g_x, g_2 = torch.autograd.grad(J, [x, y_2])  # the direct term and the once-run network's; frees its graph
    # x_t again: that backward freed the graph of its add_noise
    (g_x_2,) = torch.autograd.grad(x0(*twice, add_noise(x, eps, a_t, s_t)), x, g_2)
    return g_x + g_x_2, aux


def _evaluations(kappa: float) -> int:
    return 1 if kappa in (0, 1) else 2  # guided_eps: κ = 0 or 1 is one forward, any other κ a doubled batch


def generate(
    G: ScoreNet, z: Tensor, c: Tensor, vp: VP, *, t_init: int = 625, K: int = 1, k_stop: int | None = None,
    grad_last: bool = False, generator: torch.Generator | list[torch.Generator] | None = None,
) -> Tensor:
    """Return the generator's sample D_k [B, ...] after k_stop of its K steps. method.md §2, §6.1, §9.

    D_0 = 0; step j feeds x = a_{t_j} D_j + s_{t_j} n_j (n_0 = z, fresh noise after) at t_j = ⌊t_init (1 − j/K)⌋
    and takes D_{j+1} = x0(G(x, t_j, c)). Only the last step may carry grad (stop-gradient between steps).
    K = 1 gives x_g = (s z − s ε̂_θ(s z, t_init, c)) / a at t_init, the one-step generator. The fresh noise comes
    from `generator`, or row i's from generator[i] (sampling: an image then depends on its own seed only).
    """
    k_stop = K if k_stop is None else k_stop
    D = torch.zeros_like(z)
    for j, t_j in enumerate(step_times(t_init=t_init, K=K)[:k_stop]):
        n = z if j == 0 else _noise(z, generator)
        t = torch.full((z.shape[0],), t_j, device=z.device, dtype=torch.long)
        a_t, s_t = vp.at(t, z)
        x = add_noise(D, n, a_t, s_t)  # [B, ...]  D is detached: no backprop through the trajectory (§6.1)
        with torch.set_grad_enabled(grad_last and j == k_stop - 1 and torch.is_grad_enabled()):
            D = x0_from_eps(x, G(x, t, c), a_t, s_t)
    return D


def _noise(z: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    if isinstance(generator, list):  # one stream per row, drawn where the generator lives
        rows = [torch.randn(z.shape[1:], generator=g, device=g.device, dtype=z.dtype) for g in generator]
        return torch.stack(rows).to(z.device)
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
