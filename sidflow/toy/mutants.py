"""Deliberately wrong SiD generator losses: the analytic-teacher checks must reject every one of them.

Used by tests/test_method.py and benchmarks/gmm_mutants.py to show that the math tests can fail: `installed`
puts one in the shipped loop in place of the real loss.
"""

import contextlib

from sidflow.method import sid
from sidflow.method.guidance import guided_eps
from sidflow.method.vp import add_noise, x0_from_eps


def swapped(teacher, fake, *args, **kwargs):
    """Teacher and fake exchanged in the generator loss."""
    return sid.generator_step_loss(fake, teacher, *args, **kwargs)


def alpha_flipped(teacher, fake, *args, kappa_2, kappa_4, alpha):
    """α's sign flipped."""
    return sid.generator_step_loss(teacher, fake, *args, kappa_2=kappa_2, kappa_4=kappa_4, alpha=-alpha)


def normaliser_attached(teacher, fake, x_g, c, null, t, eps, vp, *, kappa_2, kappa_4, alpha):
    """The per-sample normaliser w left attached to the graph."""
    a_t, s_t = vp.at(t, x_g)
    x_t = add_noise(x_g, eps, a_t, s_t)
    y_r = x0_from_eps(x_t, guided_eps(teacher, x_t, t, c, null, kappa=kappa_4), a_t, s_t)
    y_f = x0_from_eps(x_t, guided_eps(fake, x_t, t, c, null, kappa=kappa_2), a_t, s_t)
    w = (x_g - y_r).abs().flatten(1).mean(1).clamp(min=1e-5)  # the mutation: no .detach()
    d = y_r - y_f
    return (d * ((y_r - x_g) - alpha * d)).flatten(1).sum(1) / w


MUTANTS = {"teacher-fake-swapped": swapped, "alpha-sign-flipped": alpha_flipped,
           "normaliser-attached": normaliser_attached}


@contextlib.contextmanager
def installed(name: str):
    """Run the training loop with mutant `name` as its generator loss inside the block."""
    from sidflow.train import loop

    real = loop.generator_step_loss
    loop.generator_step_loss = MUTANTS[name]
    try:
        yield
    finally:
        loop.generator_step_loss = real
