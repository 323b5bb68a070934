"""Tier 1: the SiD math against independent formulas and the analytic Gaussian-mixture teacher (method.md §10)."""

import subprocess
import sys

import pytest
import torch

from sidflow.method import sid
from sidflow.method.guidance import drop_prompts, guided_eps, kappas
from sidflow.method.vp import (
    VP,
    add_noise,
    at,
    sample_t,
    scaled_linear_alphas_cumprod,
    step_times,
    vp_tables,
    x0_from_eps,
)
from sidflow.stages.distill import DistillConfig
from sidflow.toy.gmm import TOY_RUN, analytic_teacher, distill, energy_distance, one_step_samples, six_point_gmm
from sidflow.toy.mutants import installed

A, S = vp_tables(scaled_linear_alphas_cumprod())


def test_schedule_values_match_method_md():
    # method.md §1 [calc]: ᾱ625 = 0.13777, a = 0.3712, s = 0.9286, σ_VE(625) = 2.50; σ(20) = 0.138, σ(979) = 12.97.
    assert A[625] ** 2 == pytest.approx(0.13777, abs=1e-5)
    assert (A[625], S[625]) == (pytest.approx(0.3712, abs=1e-4), pytest.approx(0.9286, abs=1e-4))
    assert (S / A)[[20, 625, 979]].tolist() == pytest.approx([0.138, 2.5017, 12.97], rel=1e-3)
    assert step_times(t_init=625, K=4) == [625, 468, 312, 156]
    assert step_times(t_init=625, K=2) == [625, 312] and step_times(t_init=625, K=1) == [625]


def test_t_is_uniform_on_20_to_979():
    t = sample_t(200_000, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 979
    assert t.float().mean() == pytest.approx((20 + 979) / 2, abs=2)


def _inputs(seed=0, shape=(4, 3, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.2])
def test_generator_loss_equals_expanded_form(alpha):
    # §4: Σ (y_r − y_f)[(y_r − x_g) − α(y_r − y_f)] / w = [(1 − α)‖y_r − y_f‖² + ⟨y_r − y_f, y_f − x_g⟩] / w.
    x_g, y_r, y_f = _inputs()
    d = y_r - y_f
    w = (x_g - y_r).abs().mean(dim=(1, 2, 3)).clamp(min=1e-5)
    expected = ((1 - alpha) * d.square().sum((1, 2, 3)) + (d * (y_f - x_g)).sum((1, 2, 3))) / w
    loss = sid.sid_generator_loss(x_g, y_r, y_f, alpha=alpha)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # A flipped α sign gives a different loss (unless d = 0): the check above catches it.
    assert not torch.allclose(sid.sid_generator_loss(x_g, y_r, y_f, alpha=-alpha), expected)


def test_normaliser_is_the_only_detached_term():
    # ∂L/∂x_g with w held constant, computed independently; an attached w would add a term.
    x_g, y_r, y_f = (v.requires_grad_() for v in _inputs(1))
    sid.sid_generator_loss(x_g, y_r, y_f, alpha=1.0).sum().backward()
    w = (x_g - y_r).abs().mean(dim=(1, 2, 3)).clamp(min=1e-5).detach().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_g.grad, -(y_r - y_f).detach() / w)
    torch.testing.assert_close(y_r.grad, ((y_r - x_g) - 2 * (y_r - y_f) + (y_r - y_f)).detach() / w)  # α = 1
    assert y_f.grad is not None and y_f.grad.abs().sum() > 0  # y_f keeps its graph (§4)


def test_fake_loss_is_per_sample_sum_of_squares():
    eps_pred, eps, _ = _inputs(2)
    torch.testing.assert_close(sid.fake_score_loss(eps_pred, eps), ((eps_pred - eps) ** 2).flatten(1).sum(1))


def test_generator_step_uses_teacher_with_kappa4_and_fake_with_kappa2():
    # Two different linear "networks" so a swap or a wrong κ changes the value.
    gmm = six_point_gmm(0.3)
    teacher = analytic_teacher(gmm, A, S)

    def fake(x, t, c):
        return 0.7 * teacher(x, t, c) + 0.1 * x

    g = torch.Generator().manual_seed(0)
    x_g, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    c, null = torch.eye(3)[torch.arange(64) % 3], torch.zeros(1, 3)
    t = sample_t(64, generator=g)
    a_t, s_t = at(A, t, x_g), at(S, t, x_g)
    x_t = add_noise(x_g, eps, a_t, s_t)
    nulls = null.expand_as(c)
    y_r = x0_from_eps(x_t, teacher(x_t, t, nulls) + 2.0 * (teacher(x_t, t, c) - teacher(x_t, t, nulls)), a_t, s_t)
    y_f = x0_from_eps(x_t, fake(x_t, t, nulls) + 1.5 * (fake(x_t, t, c) - fake(x_t, t, nulls)), a_t, s_t)
    expected = sid.sid_generator_loss(x_g, y_r, y_f, alpha=1.0)
    got = sid.generator_step_loss(teacher, fake, x_g, c, null, t, eps, VP(A, S), kappa_2=1.5, kappa_4=2.0)
    torch.testing.assert_close(got, expected)
    swapped = sid.generator_step_loss(fake, teacher, x_g, c, null, t, eps, VP(A, S), kappa_2=1.5, kappa_4=2.0)
    assert not torch.allclose(swapped, expected)


def test_guided_eps_branches():
    gmm = six_point_gmm(0.3)
    net = analytic_teacher(gmm, A, S)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 2, generator=g), sample_t(8, generator=g)
    c, null = torch.eye(3)[torch.arange(8) % 3], torch.zeros(1, 3)
    e_c, e_0 = net(x, t, c), net(x, t, null.expand_as(c))
    torch.testing.assert_close(guided_eps(net, x, t, c, null, kappa=1.0), e_c)
    torch.testing.assert_close(guided_eps(net, x, t, c, null, kappa=0.0), e_0)
    torch.testing.assert_close(guided_eps(net, x, t, c, null, kappa=2.5), e_0 + 2.5 * (e_c - e_0))


def test_dropout_rate_and_determinism():
    c, null = torch.ones(20_000, 3), torch.zeros(1, 3)
    dropped = drop_prompts(c, null, 0.1, generator=torch.Generator().manual_seed(0))
    assert (dropped.sum(1) == 0).float().mean() == pytest.approx(0.1, abs=0.01)
    again = drop_prompts(c, null, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)


def test_kappa_presets():
    assert kappas("lsg", kappa=2.0) == {"kappa_1": 2.0, "kappa_2": 2.0, "kappa_4": 2.0}
    assert kappas("long", kappa=2.0) == {"kappa_1": 1.0, "kappa_2": 1.0, "kappa_4": 2.0}
    assert kappas("zero_cfg", kappa=2.0) == {"kappa_1": 0.0, "kappa_2": 0.0, "kappa_4": 1.0}
    with pytest.raises(ValueError, match="guidance mode"):
        kappas("strong", kappa=2.0)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_generator_sampler_one_step_formula_and_stop_gradient(K):
    # K = 1: x_g = (s z − s ε̂(s z, 625)) / a (§2). K > 1: only the last step carries grad (§6.1).
    w = torch.nn.Parameter(torch.tensor(0.3))

    def G(x, t, c):
        return w * x

    z, c = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(5, 3)
    out = sid.generate(G, z, c, VP(A, S), t_init=625, K=K, grad_last=True, generator=torch.Generator().manual_seed(1))
    if K == 1:
        torch.testing.assert_close(out, (S[625] * z - S[625] * 0.3 * S[625] * z) / A[625])
    out.sum().backward()
    t_last = step_times(t_init=625, K=K)[-1]
    # d out / d w = −s_t x / a_t at the last step only, its input x detached.
    assert w.grad is not None
    again = sid.generate(G, z, c, VP(A, S), t_init=625, K=K, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.detach(), again)  # same generator ⇒ same sample
    assert t_last == step_times(t_init=625, K=K)[K - 1]


def test_method_imports_only_torch():
    # sidflow.method never imports accelerate, boto3, kfp, logging or the config layer.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('accelerate', 'boto3', 'kfp', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sidflow.method.sid, sidflow.method.guidance, sidflow.method.vp\n"
        "assert 'sidflow.config' not in sys.modules and 'logging' not in [m for m in sys.modules if m == 'x']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------
# Analytic teacher: distillation must reach the true mixture; broken losses must not.

GMM = six_point_gmm(0.1)
# The runs go through the shipped loop (sidflow.train.loop.train), so these tests exercise the code the distill stage
# runs: its draws, gradient guard and optimizer settings. After 600 iterations of TOY_RUN (κ = 1) the energy is
# 0.22-0.23× its start (0.43) over seeds 0-2; w attached ends at 1.02×, teacher and fake swapped at > 1e4×
# (benchmarks/results/gmm_mutants.json); 0.5× lies between.
ITERS = 600
BOUND = 0.5


def _run(gmm, iters=ITERS, **kw):
    return distill(gmm, DistillConfig(**{**TOY_RUN, "kimg": iters * 0.256, **kw}))


def _energy(G):
    g = torch.Generator().manual_seed(5)
    return sum(energy_distance(one_step_samples(G, GMM, A, S, 600, c), GMM.sample(600, c, g)) for c in range(3)) / 3


@pytest.fixture(scope="module")
def start_energy():
    teacher = analytic_teacher(GMM, A, S)
    return _energy(teacher)  # G starts as a copy of the teacher used in one step


def test_distillation_reaches_the_mixture(start_energy):
    G, *_ = _run(GMM)
    energy = _energy(G)
    assert start_energy > 0.3
    assert energy < BOUND * start_energy, (start_energy, energy)
    # Every mixture component receives samples.
    for label in range(3):
        x = one_step_samples(G, GMM, A, S, 1000, label)
        nearest = torch.cdist(x, GMM.mu).argmin(1)
        share = torch.bincount(nearest, minlength=6)[GMM.cls == label].float() / len(x)
        assert (share > 0.2).all(), (label, share)


@pytest.mark.parametrize("name", ["teacher-fake-swapped", "normaliser-attached"])
def test_broken_losses_fail_the_same_bound(name, start_energy):
    # α's sign flip is caught by test_generator_loss_equals_expanded_form: on this toy it still converges
    # (benchmarks/results/gmm_mutants.json).
    with installed(name):
        G, *_ = _run(GMM)
    energy = _energy(G)
    assert not energy < BOUND * start_energy, energy


def test_guidance_raises_class_likelihood():
    # Overlapping classes (σ = 0.45): LSG κ = 2 pulls each class's samples toward its modes (method.md §10), above
    # the class likelihood of the data itself, which κ = 1 approaches (data [-0.13, -0.11, -0.13]; after 500
    # iterations κ = 1 gives [-0.20, -0.21, -0.21], κ = 2 [-0.009, -0.009, -0.005]; after 1,000, κ = 1 gives
    # [-0.10, -0.16, -0.13] and κ = 2 [-0.004, -0.006, -0.002]).
    gmm = six_point_gmm(0.45)
    g = torch.Generator().manual_seed(7)
    data = torch.tensor([gmm.class_log_prob(gmm.sample(4000, c, g), c).mean() for c in range(3)])

    def class_logp(kappa):
        G, *_ = _run(gmm, 500, kappa=kappa)
        return torch.tensor([gmm.class_log_prob(one_step_samples(G, gmm, A, S, 1000, c), c).mean() for c in range(3)])

    k1, k2 = class_logp(1.0), class_logp(2.0)
    assert (k2 > data + 0.1).all() and (k2 > k1).all(), (data, k1, k2)


# Pins on the loop's math: each of these mutants passed the tests before (an independent audit). ------------------


def _nets64():
    # Two different smooth networks in float64, so finite differences resolve every term of the gradient.
    g = torch.Generator().manual_seed(3)
    W1, W2 = torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
    U1, U2 = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)

    def teacher(x, t, c):
        return torch.tanh(x @ W1 + c.to(x) @ U1)

    def fake(x, t, c):
        return 0.5 * torch.tanh(x @ W2 + c.to(x) @ U2) + 0.1 * x

    return teacher, fake


@pytest.mark.parametrize("kappa_2, kappa_4", [(1.0, 1.0), (1.5, 2.0), (0.0, 1.0), (-0.5, 1.0)])
def test_generator_gradient_flows_through_teacher_and_fake(kappa_2, kappa_4):
    # ∂L/∂x_g by autograd equals central differences of the §4 loss with w held at its value: only w is detached.
    # A detached teacher x0 (y_r) or fake x0 (y_f), or an attached w, changes the autograd side.
    teacher, fake = _nets64()
    g = torch.Generator().manual_seed(4)
    a, s = A.double(), S.double()
    x_g = torch.randn(3, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, generator=g, dtype=torch.float64)
    c, null, t = torch.eye(3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), torch.tensor([50, 400, 900])
    kw = dict(kappa_2=kappa_2, kappa_4=kappa_4, alpha=1.0)
    x = x_g.clone().requires_grad_()
    sid.generator_step_loss(teacher, fake, x, c, null, t, eps, VP(a, s), **kw).sum().backward()

    def y(net, kappa, xg):
        a_t, s_t = at(a, t, xg), at(s, t, xg)
        x_t = add_noise(xg, eps, a_t, s_t)
        return x0_from_eps(x_t, guided_eps(net, x_t, t, c, null, kappa=kappa), a_t, s_t)

    w = (x_g - y(teacher, kappa_4, x_g)).abs().mean(1)  # held fixed below

    def loss(xg):
        d = y(teacher, kappa_4, xg) - y(fake, kappa_2, xg)
        return ((d * ((y(teacher, kappa_4, xg) - xg) - d)).sum(1) / w).sum()

    h, fd = 1e-6, torch.zeros_like(x_g)
    for i in range(x_g.numel()):
        e = torch.zeros_like(x_g).view(-1)
        e[i] = h
        fd.view(-1)[i] = (loss(x_g + e.view_as(x_g)) - loss(x_g - e.view_as(x_g))) / (2 * h)
    torch.testing.assert_close(x.grad, fd, rtol=1e-6, atol=1e-7)


def _tiny_unets():
    # G, the fake and the teacher: three tiny SD-layout UNets with different seeds, so y_r − y_f is far from 0.
    from diffusers import UNet2DConditionModel

    from sidflow.toy.tiny import tiny_configs

    out = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        out.append(UNet2DConditionModel(**tiny_configs()["unet"]))
    G, fake, teacher = out
    fake.requires_grad_(False)  # as in the loop's generator step: input gradients only
    teacher.requires_grad_(False).eval()
    return G, fake, teacher


# κ2 ≠ κ4 so that swapped scales show; (1.5, 2.0) runs the teacher twice, (1.0, 2.0) the fake (one forward, not two).
@pytest.mark.parametrize("kappa_2, kappa_4", [(1.5, 2.0), (1.0, 2.0)])
@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_split_generator_backward_gives_the_joint_loss_and_gradients(kappa_2, kappa_4, adversarial, precision):
    # method.md §4: one network's graph at a time, the same loss and the same gradients of G's parameters as one
    # backward through both. The objective is the loop's: drop non-finite rows, divide by the batch; with the
    # adversarial term it also scores x_t with the fake's encoder over the same w (§6.2).
    from sidflow.method.adversarial import generator_adv_loss
    from sidflow.teacher import score_net, unet_logits

    G, fake, teacher = _tiny_unets()
    g = torch.Generator().manual_seed(5)
    z, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    c, null = torch.randn(3, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    t, vp = torch.tensor([100, 500, 900]), VP(A, S)
    kw = dict(kappa_2=kappa_2, kappa_4=kappa_4, alpha=1.2)
    net_t, net_f, disc = score_net(teacher), score_net(fake), unet_logits(fake)

    def objective(loss, w, x_t):
        if adversarial:
            loss = 0.5 * loss + 0.5 * 0.3 * generator_adv_loss(disc, x_t, t, c, w)
        loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
        return loss.sum() / 4, loss.detach()

    def step(split: bool):
        G.zero_grad(set_to_none=True)
        x_g = sid.generate(score_net(G), z, c, vp, t_init=625, K=1, grad_last=True)
        if split:
            grad, loss = sid.generator_step_split(net_t, net_f, x_g, c, null, t, eps, vp, **kw, objective=objective)
            (x_g * grad).sum().backward()
        else:
            J, loss = objective(*sid.generator_step_terms(net_t, net_f, x_g, c, null, t, eps, vp, **kw))
            J.backward()
        return loss, {n: p.grad.clone() for n, p in G.named_parameters()}

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # the loop's autocast
        (loss_joint, joint), (loss_split, split) = step(False), step(True)
    torch.testing.assert_close(loss_split, loss_joint, rtol=1e-5, atol=0)
    assert all(p.grad is None for p in [*fake.parameters(), *teacher.parameters()])
    worst = max(float((split[n] - joint[n]).abs().max() / joint[n].abs().max().clamp(min=1e-12)) for n in joint)
    assert worst < 1e-4, worst  # of each tensor's largest gradient


@pytest.mark.parametrize("K", [2, 4])
def test_few_step_gradient_stops_between_steps(K):
    # §6.1: only the last step carries grad, its input detached: with G(x) = w·x, ∂ out/∂w = −Σ s x_last / a at the
    # last step's t, where x_last = a D_{K−1} + s n is built from the first K−1 steps as data. Backprop through the
    # trajectory would add the terms through D_{K−1}.
    w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def G(x, t, c):
        return w * x

    z, c = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), torch.zeros(5, 3)
    a, s = A.double(), S.double()
    out = sid.generate(G, z, c, VP(a, s), t_init=625, K=K, grad_last=True, generator=torch.Generator().manual_seed(1))
    out.sum().backward()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # draws the noise of steps 1..K−2
        D = sid.generate(G, z, c, VP(a, s), t_init=625, K=K, k_stop=K - 1, generator=gen)
    n = torch.randn(z.shape, generator=gen, dtype=z.dtype)  # the last step's fresh noise
    t_last = step_times(t_init=625, K=K)[-1]
    x_last = a[t_last] * D + s[t_last] * n
    torch.testing.assert_close(w.grad, (-s[t_last] * x_last / a[t_last]).sum())


def _k_step_energy(G, K: int, k_stop: int | None) -> float:
    # Energy distance of D_k (k = k_stop, or the uniform mixture over k = 1..K when None) to the data, per class.
    from sidflow.method.vp import VP

    g, total = torch.Generator().manual_seed(6), 0.0
    for label in range(3):
        ks = [k_stop] * 600 if k_stop else [1 + i % K for i in range(600)]
        parts = []
        with torch.no_grad():
            for k in sorted(set(ks)):
                n = ks.count(k)
                c = torch.eye(GMM.n_classes)[label].expand(n, -1)
                parts.append(sid.generate(G, torch.randn(n, 2, generator=g), c, VP(A, S), K=K, k_stop=k, generator=g))
        total += energy_distance(torch.cat(parts), GMM.sample(600, label, g))
    return total / 3


@pytest.mark.parametrize("K", [2, 4])
def test_few_step_distillation_reaches_the_mixture_at_every_step(K, start_energy):
    # §6.1: one k ~ U{1..K} per iteration trains the one fake score on the mixture of the steps' outputs; with an
    # optimal teacher each step's output should reach the data, so both the final output and the mixture of outputs
    # end inside the one-step test's bound. After ITERS iterations they end at 0.17× / 0.18× the start (K = 2: final,
    # mixture) and 0.07× / 0.13× (K = 4).
    G, *_ = _run(GMM, steps=K)
    final, mixture = _k_step_energy(G, K, K), _k_step_energy(G, K, None)
    assert final < BOUND * start_energy and mixture < BOUND * start_energy, (start_energy, final, mixture)
