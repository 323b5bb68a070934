"""Tier 1: the Diffusion-GAN term of few-step SiD (method.md §6.2) against independent formulas and autograd."""

import pytest
import torch
import torch.nn.functional as F

from sidflow.method import adversarial, sid
from sidflow.method.vp import VP, add_noise, at, scaled_linear_alphas_cumprod, vp_tables

A, S = vp_tables(scaled_linear_alphas_cumprod())
VP_SD = VP(A, S)


def _maps(seed=0, shape=(4, 1, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return [6 * torch.randn(shape, generator=g) for _ in range(2)]


def test_discriminator_loss_is_half_the_two_cross_entropies_times_the_sample_size():
    real, fake = _maps()
    # BCE(ℓ, 1) = softplus(−ℓ), BCE(ℓ, 0) = softplus(ℓ), each on ℓ clamped to ±10 and averaged over the map.
    r, f = real.clamp(-10, 10), fake.clamp(-10, 10)
    expected = 0.5 * (F.softplus(-r).mean((1, 2, 3)) + F.softplus(f).mean((1, 2, 3))) * 64
    torch.testing.assert_close(adversarial.discriminator_loss(real, fake, scale=64), expected)
    # Real and fake exchanged is a different loss (a swapped target would pass no test otherwise).
    assert not torch.allclose(adversarial.discriminator_loss(fake, real, scale=64), expected)


def test_logits_are_clamped_and_carry_no_gradient_beyond_the_clamp():
    logits = torch.tensor([[-30.0, -3.0, 3.0, 30.0]], requires_grad=True)
    w = torch.ones(1)
    adversarial.adversarial_loss(logits, w, scale=1.0).sum().backward()
    expected = -torch.sigmoid(-torch.tensor([-3.0, 3.0])) / 4  # d softplus(−ℓ)/dℓ over a 4-element mean
    torch.testing.assert_close(logits.grad[0, 1:3], expected)
    assert logits.grad[0, 0] == 0 and logits.grad[0, 3] == 0


def test_adversarial_loss_is_divided_by_the_sid_normaliser():
    logits, _ = _maps(1)
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    expected = F.softplus(-logits.clamp(-10, 10)).mean((1, 2, 3)) * 16 / w
    torch.testing.assert_close(adversarial.adversarial_loss(logits, w, scale=16), expected)


def _linear_disc(seed=2):
    g = torch.Generator().manual_seed(seed)
    W, U = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    calls = []

    def disc(x_t, t, c):
        calls.append((x_t.detach().clone(), c.clone()))
        return (x_t @ W + c.to(x_t) @ U)[:, None]  # [B, 1]

    return disc, calls


def test_the_discriminator_step_noises_real_and_generated_samples_alike_and_leaves_g_alone():
    disc, calls = _linear_disc()
    g = torch.Generator().manual_seed(3)
    x_g = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x_real = torch.randn(4, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, generator=g, dtype=torch.float64)
    c, c_real, t = torch.eye(3)[[0, 1, 2, 0]], torch.eye(3)[[2, 2, 1, 0]], torch.tensor([30, 300, 600, 900])
    loss = adversarial.disc_step_loss(disc, x_g, c, x_real, c_real, t, eps, VP(A.double(), S.double()))
    a_t, s_t = at(A.double(), t, x_g), at(S.double(), t, x_g)
    (xr, cr), (xf, cf) = calls
    torch.testing.assert_close(xr, add_noise(x_real, eps, a_t, s_t))  # the same t and ε for both (§6.2)
    torch.testing.assert_close(xf, add_noise(x_g.detach(), eps, a_t, s_t))
    assert torch.equal(cr, c_real) and torch.equal(cf, c)  # each scored with its own text
    assert not loss.requires_grad  # the discriminator's loss never reaches G


def test_the_generator_term_reaches_x_g_through_the_discriminator():
    # ∂L_adv/∂x_g by autograd equals −σ(−ℓ)·a_t·W·scale/w (ℓ = W·x_t + U·c, x_t = a_t x_g + s_t ε), w held fixed.
    disc, _ = _linear_disc()
    W = torch.randn(2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x_g = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(4, 2, generator=g, dtype=torch.float64)
    c, t = torch.eye(3)[[0, 1, 2, 0]], torch.tensor([30, 300, 600, 900])
    a, s = A.double(), S.double()
    a_t, s_t = at(a, t, x_g), at(s, t, x_g)
    x_t = add_noise(x_g, eps, a_t, s_t)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    adversarial.generator_adv_loss(disc, x_t, t, c, w).sum().backward()
    logit = disc(x_t.detach(), t, c)[:, 0]
    expected = -torch.sigmoid(-logit)[:, None] * a_t * W[None] * 2 / w[:, None]
    torch.testing.assert_close(x_g.grad, expected)


def test_generator_step_terms_share_the_loss_and_return_its_detached_normaliser():
    g = torch.Generator().manual_seed(5)
    x_g = torch.randn(3, 2, generator=g, requires_grad=True)
    eps, c, null = torch.randn(3, 2, generator=g), torch.eye(3), torch.zeros(1, 3)
    t = torch.tensor([100, 500, 900])

    def teacher(x, t, c):
        return torch.tanh(x) + c[:, :2]

    def fake(x, t, c):
        return 0.5 * x

    kw = dict(kappa_2=1.5, kappa_4=2.0, alpha=1.0)
    loss, w, x_t = sid.generator_step_terms(teacher, fake, x_g, c, null, t, eps, VP_SD, **kw)
    torch.testing.assert_close(loss, sid.generator_step_loss(teacher, fake, x_g, c, null, t, eps, VP_SD, **kw))
    a_t, s_t = at(A, t, x_g), at(S, t, x_g)
    torch.testing.assert_close(x_t, add_noise(x_g, eps, a_t, s_t))
    assert x_t.requires_grad and not w.requires_grad  # x_t keeps the graph to x_g; w is the detached normaliser
    assert w.shape == (3,) and (w > 0).all()


@pytest.mark.parametrize("guidance, kappa", [("zero_cfg", 1.0), ("anti_cfg", -1.0), ("lsg", 1.5)])
def test_the_gan_branch_keeps_the_text_in_every_guidance_mode(guidance, kappa, monkeypatch):
    # Through the shipped loop on the analytic toy: the discriminator sees the prompts' own conditions in both of its
    # uses even where the fake's score branch is unconditional (Zero-CFG) or prompts are dropped (§6.3).
    from sidflow.stages.distill import DistillConfig
    from sidflow.toy import gmm
    from sidflow.train import loop

    seen = []
    real_disc, real_adv = loop.disc_step_loss, loop.generator_adv_loss

    def spy_disc(disc, x_g, c, x_real, c_real, *args):
        seen.append(("disc", bool((c.sum(-1) == 1).all()), bool((c_real.sum(-1) == 1).all())))
        return real_disc(disc, x_g, c, x_real, c_real, *args)

    def spy_adv(disc, x_t, t, c, w):
        seen.append(("adv", bool((c.sum(-1) == 1).all()), True))
        return real_adv(disc, x_t, t, c, w)

    monkeypatch.setattr(loop, "disc_step_loss", spy_disc)
    monkeypatch.setattr(loop, "generator_adv_loss", spy_adv)
    mix = gmm.six_point_gmm(0.3)
    cfg = DistillConfig(**{**gmm.TOY_RUN, "batch": 64, "micro_batch": 32, "kappa": kappa}, kimg=0.064 * 3,
                        guidance=guidance)
    gmm.distill(mix, cfg, real=mix, n_real=256)
    assert len(seen) == 3 * 2 * 2 and all(text and real_text for _, text, real_text in seen), seen


def _energy_to(G, mix):
    from sidflow.toy.gmm import energy_distance, one_step_samples

    g = torch.Generator().manual_seed(5)
    return sum(energy_distance(one_step_samples(G, mix, A, S, 600, c), mix.sample(600, c, g)) for c in range(3)) / 3


def test_real_data_pulls_the_student_of_a_biased_teacher_past_it():
    # The method's claim (method.md §6.2) on data we control: the teacher is the mixture on a circle of radius 1.2, the
    # real data the one on radius 1.5. After 1,500 iterations the student ends closer to the real data with the
    # adversarial term than without it, and than the teacher's own distribution (energy distance 0.189). With the
    # generator's term detached it ends where the plain run does. (At 1,000 iterations the margins were 0.84 and 0.69:
    # too close to the bounds to hold across seeds.)
    from sidflow.stages.distill import DistillConfig
    from sidflow.toy.gmm import TOY_RUN, distill, energy_distance, six_point_gmm

    true, biased = six_point_gmm(0.1), six_point_gmm(0.1, radius=1.2)
    g = torch.Generator().manual_seed(9)
    teacher = sum(energy_distance(biased.sample(600, c, g), true.sample(600, c, g)) for c in range(3)) / 3
    # Both runs at the stage's default guidance (κ = 1.5), where these margins were measured; at κ = 1 the student
    # with the term ends 0.81-0.84× the teacher's distance (600-1,000 iterations): real, but too close to a bound.
    cfg = DistillConfig(**{**TOY_RUN, "kappa": 1.5}, kimg=1500 * 0.256)
    plain = _energy_to(distill(biased, cfg)[0], true)
    adv = _energy_to(distill(biased, cfg, real=true)[0], true)
    assert adv < 0.9 * plain and adv < 0.7 * teacher, (teacher, plain, adv)
