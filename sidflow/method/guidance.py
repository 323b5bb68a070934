"""Classifier-free guidance on ε, and the κ settings of LSG, Zero-CFG and Anti-CFG (method.md §3, §6.3).

A score network here is any callable `net(x_t, t, c) -> ε̂` with the batch on dim 0; `c` is a batch of text
embeddings (or class codes for the analytic teacher) and `null` the embedding of the empty prompt `""`.
"""

from typing import Callable

import torch
from torch import Tensor

ScoreNet = Callable[[Tensor, Tensor, Tensor], Tensor]


def cfg(eps_null: Tensor, eps_cond: Tensor, *, kappa: float) -> Tensor:
    """Return ε^κ = ε(∅) + κ (ε(c) − ε(∅)), shape of the inputs. method.md §3 (CFG formula)."""
    return eps_null + kappa * (eps_cond - eps_null)


def guided_eps(net: ScoreNet, x_t: Tensor, t: Tensor, c: Tensor, null: Tensor, *, kappa: float) -> Tensor:
    """Return ε̂^κ(x_t, t, c), shape of x_t. method.md §3.

    κ = 1 is one conditional forward and κ = 0 one forward on ∅ (Zero-CFG's unconditional fake, §6.3);
    any other κ runs [∅; c] as one doubled batch, and gradients reach both branches.
    """
    if kappa == 1:
        return net(x_t, t, c)
    if kappa == 0:
        return net(x_t, t, null.expand_as(c))
    eps_null, eps_cond = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null.expand_as(c), c])).chunk(2)
    return cfg(eps_null, eps_cond, kappa=kappa)


def drop_prompts(c: Tensor, null: Tensor, p: float, *, generator: torch.Generator) -> Tensor:
    """Return c [B, ...] with each row replaced by ∅ with probability p (fake step only, method.md §3)."""
    if p == 0:
        return c
    keep = torch.rand(c.shape[0], generator=generator, device=generator.device) >= p  # [B]
    keep = keep.to(c.device).reshape(-1, *([1] * (c.ndim - 1)))
    return torch.where(keep, c, null.expand_as(c))


def resolved_kappas(cfg) -> dict[str, float]:
    """Return κ1, κ2 (= κ3), κ4 of a config (guidance, kappa, kappa_1, kappa_2, kappa_4): the preset's values with
    any explicit override applied."""
    out = kappas(cfg.guidance, kappa=cfg.kappa)
    for k in out:
        if getattr(cfg, k) is not None:
            out[k] = getattr(cfg, k)
    return out


def kappas(mode: str, *, kappa: float) -> dict[str, float]:
    """Return {kappa_1, kappa_2, kappa_4} for a guidance preset. method.md §3 (issue #6) and §6.3.

    κ3 of the method is κ2: the reference code ties the two, so it has no name of its own here.

    long: teacher-only CFG (κ4 = κ); short: fake-training CFG only (κ1 = κ, meant for κ < 1);
    lsg: the same κ everywhere; zero_cfg: unguided teacher, unconditional fake (κ1 = κ2 = 0);
    anti_cfg: unguided teacher, negative CFG κ < 0 on the fake when evaluated (κ2 = κ).
    """
    table = {
        "lsg": (kappa, kappa, kappa),
        "long": (1.0, 1.0, kappa),
        "short": (kappa, 1.0, 1.0),
        "zero_cfg": (0.0, 0.0, 1.0),
        "anti_cfg": (1.0, kappa, 1.0),
    }
    if mode not in table:
        raise ValueError(f"guidance mode {mode!r} is not one of {sorted(table)}")
    return dict(zip(("kappa_1", "kappa_2", "kappa_4"), table[mode]))
