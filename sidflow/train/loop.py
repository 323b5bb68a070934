"""The one SiD training loop: fake-score step, generator step, EMA, checkpoints (method.md §3, §4, §9).

One-step SiD-LSG is the K = 1 case. Each process draws everything for iteration i from generators seeded by
(seed, i, rank), so a resumed run replays exactly the draws of an uninterrupted one.

The loop trains what it is given: the distill stage hands it UNet copies of a diffusers teacher and the prompts'
text embeddings; the analytic-teacher tests hand it small MLPs and one-hot classes (sidflow.toy.gmm).
"""

import copy
import functools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sidflow import failpoints, storage
from sidflow.config import to_dict
from sidflow.launch import main_thread
from sidflow.method.adversarial import disc_step_loss, generator_adv_loss
from sidflow.method.guidance import ScoreNet, drop_prompts, resolved_kappas
from sidflow.method.sid import (
    fake_step_loss,
    generate,
    generator_step_loss,
    generator_step_split,
    generator_step_terms,
)
from sidflow.method.vp import VP, sample_t
from sidflow.train import checkpoint
from sidflow.train.ema import ema_beta, update_ema
from sidflow.train.result import DistillResult, total_images
from sidflow.train.sharding import Placement, local


@dataclass
class Networks:
    """What the loop trains, built on this process's device (`device()`) by the caller (method.md §2)."""

    G: nn.Module  # the generator; starts as a copy of the teacher
    fake: nn.Module  # the fake score network; starts as a copy of the teacher
    teacher: ScoreNet  # the frozen teacher
    score: Callable[[nn.Module], ScoreNet]  # G, fake, G's EMA (or their DDP wrappers) as net(x_t, t, c) -> ε̂
    vp: VP  # the teacher's schedule, on the device
    null: Tensor  # [1, ...] the condition ∅ (for CFG and prompt dropout)
    shape: tuple[int, ...]  # one sample's shape: (C, H, W) of a latent
    export: Callable[[nn.Module, int, str, dict], None]  # publish(generator, nimg, "ema" | "raw", metrics)
    fingerprint: str | None = None  # the teacher's content, recorded in every checkpoint for the resume check
    template: nn.Module | None = None  # the class and config a generator sharded by FSDP is gathered into
    disc: Callable[[nn.Module], ScoreNet] | None = None  # the fake as discriminator: disc(x_t, t, c) -> logits


@dataclass
class Conditions:
    """The training conditions: `size` of them; `encode(indices)` returns their batch [b, ...] (on any device)."""

    size: int
    encode: Callable[[Tensor], Tensor]


@dataclass
class GAN:
    """The adversarial term of few-step SiD with real data (method.md §6.2); the loop runs without it when given none.
    The discriminator is nets.disc, the fake score network's encoder."""

    real: Callable[[Tensor], tuple[Tensor, Tensor]]  # indices -> (real samples [b, ...], their conditions [b, ...])
    size: int  # real pairs to draw from
    adv_weight: float  # λ_adv: the generator's loss is ½ L_SiD + ½ λ_adv L_adv while the term is on
    disc_weight: float  # λ_D: the fake step's loss is the score loss + λ_D L_D while the term is on
    gan_start_kimg: float = 0.0  # both terms are on from this many kimg (the fake first fits the generator)
    adv_rampup_kimg: float = 0.0  # λ_adv rises linearly from 0 over this many kimg after gan_start_kimg
    gan_clip: float = 1.0  # gradient value clip of the fake step while the terms are on (§6.2)

    def adv_weight_at(self, nimg: int) -> float:
        """λ_adv after `nimg` generator images (0 before gan_start_kimg, then the linear ramp-up)."""
        if nimg < self.gan_start_kimg * 1000:
            return 0.0
        if self.adv_rampup_kimg <= 0:
            return self.adv_weight
        return self.adv_weight * min(1.0, (nimg - self.gan_start_kimg * 1000) / (self.adv_rampup_kimg * 1000))

    def indices(self, seed: int, it: int, batch: int) -> Tensor:
        """The real pairs iteration `it` draws [batch]: the next `batch` of a walk through one permutation of the
        pairs per epoch, so every pair is seen once an epoch, whatever the number of GPUs (the caller splits them
        by rank), and a resumed run draws what an uninterrupted one would."""
        pos = torch.arange(it * batch, (it + 1) * batch)
        epochs = pos // self.size
        out = torch.empty(batch, dtype=torch.long)
        for e in epochs.unique().tolist():
            perm = torch.randperm(self.size, generator=_gen(seed, e, 3, 0, "cpu"))
            sel = epochs == e
            out[sel] = perm[pos[sel] % self.size]
        return out


def device() -> torch.device:
    """Return the device this process trains on (one GPU per process; the CPU when there is none)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).device


def _finite_grads(params, clip: float | None) -> None:
    # NaN → 0, ±inf → ±1e5 on every grad (method.md §8.4); value clipping only when asked.
    grads = [local(p.grad) for p in params if p.grad is not None]  # a sharded grad: this process's shard
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip is not None and grads:
        torch._foreach_clamp_min_(grads, -clip)
        torch._foreach_clamp_max_(grads, clip)


def _drop_nan(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Samples whose loss is not finite are dropped from the batch and counted (method.md §8.4).
    ok = torch.isfinite(loss)
    return torch.where(ok, loss, torch.zeros_like(loss)), (~ok).sum()


def _generator_objective(loss_sid: Tensor, w: Tensor, x_t: Tensor, *, disc, t: Tensor, c: Tensor, b_tot: int,
                         adv_weight: float | None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
    # What the generator step backpropagates, and (its per-sample loss after the NaN drop, the drop count, L_adv)
    # for the logs; the same in both backward paths. With the GAN term on (adv_weight given) the loss is
    # ½ L_SiD + ½ λ_adv L_adv, both over the same w; L_adv reaches x_g through the encoder at x_t (§6.2).
    loss_adv = generator_adv_loss(disc, x_t, t, c, w) if adv_weight is not None else None
    loss = loss_sid if loss_adv is None else 0.5 * loss_sid + 0.5 * adv_weight * loss_adv
    loss, nan = _drop_nan(loss)  # before the backward: a dropped sample contributes no gradient
    return loss.sum() / b_tot, (loss.detach(), nan, None if loss_adv is None else loss_adv.detach())


def _gen(seed: int, it: int, phase: int, mb: int, device) -> torch.Generator:
    # One independent stream per (iteration, phase, micro-batch): resume needs no RNG state at all.
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + it) * 4 + phase) * 1_000_003 + mb)


def train(cfg, nets: Networks, data: Conditions, gan: GAN | None = None) -> DistillResult:
    """Train nets.G and nets.fake per cfg (a DistillConfig) on data, with the adversarial term when `gan` is given;
    export the generator; return the result."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = True  # fixed shapes every round: let cuDNN pick its fastest kernels
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    rounds = cfg.batch // (world * cfg.micro_batch)  # gradient-accumulation rounds per phase
    b_tot = cfg.batch // world  # per-process share of the global batch: the loss normaliser (§3 step 4)
    k = resolved_kappas(cfg)
    guided_fake = k["kappa_1"] != 1 or k["kappa_2"] != 1
    conditional_fake = k["kappa_1"] != 0 or k["kappa_2"] != 0  # Zero-CFG's fake never sees c (§6.3)
    # Dropout only when the fake is guided, and never for an unconditional fake: it would fit G(z, ∅), which G is
    # never trained on (§3).
    p_drop = cfg.fake_dropout if guided_fake and conditional_fake else 0.0

    G, fake = nets.G, nets.fake
    G.requires_grad_(True).train()
    fake.requires_grad_(True).train()
    ema = copy.deepcopy(G).requires_grad_(False).eval() if cfg.ema_halflife_kimg > 0 else None
    place = Placement(cfg.sharding, acc)
    for net in (G, fake, ema):  # optimizers are built after sharding: FSDP replaces the parameters by shards
        if net is not None:
            place.shard(net)
    if place.sharded:
        acc.print(f"fsdp: G, fake{', EMA' if ema is not None else ''} sharded over {world} processes")
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    fused = device.type == "cuda"  # one kernel for the whole update instead of several per parameter
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=betas, eps=cfg.adam_eps, fused=fused)
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg.lr_fake, betas=betas, eps=cfg.adam_eps, fused=fused)
    vp, null = nets.vp, nets.null

    # Resume from the newest checkpoint that loads (a damaged newest one falls back to the one before it).
    nimg, it, metrics = 0, 0, {}
    found = checkpoint.load_latest(cfg.output) if cfg.resume and place.reads_checkpoint() else None
    last, state = found if found is not None else (None, {})
    (last,) = place.share([last])  # under FSDP only rank 0 reads; the others follow its choice
    if last is not None:  # full state dicts, whatever the placement that wrote them
        place.load_full_state(G, state.get("G"), opt_g)
        place.load_full_state(fake, state.get("fake"), opt_f)
        if ema is not None:
            place.load_full_state(ema, state.get("ema"))
        nimg, it, metrics = place.share([state.get("nimg"), state.get("iteration"), state.get("metrics") or {}])
        acc.print(f"resumed from {last} at {nimg / 1000:.3f} kimg")
    del state, found
    G_ddp, fake_ddp = place.wrap(G), place.wrap(fake)
    net_t, net_g, net_f = nets.teacher, nets.score(G), nets.score(fake)
    net_g_ddp, net_f_ddp = nets.score(G_ddp), nets.score(fake_ddp)
    # The discriminator runs on the fake module itself: its gradients join the score loss's in the same backward.
    disc = nets.disc(fake) if gan is not None else None

    # SIGTERM (preemption, a pod's end) and SIGINT (Ctrl-C) both checkpoint and end the run; the same command resumes.
    stop = {"flag": False}
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: stop.update(flag=True)) for sig in signals} if main_thread() else {}
    logdir = Path(tempfile.mkdtemp(prefix="sidflow-logs-"))
    if last is not None and acc.is_main_process and storage.listdir(storage.join(cfg.output, "logs")):
        storage.download_dir(storage.join(cfg.output, "logs"), str(logdir))  # keep the pre-resume metrics
    writer = _tensorboard(logdir) if acc.is_main_process else None
    total = total_images(cfg)
    next_ckpt = (nimg // int(cfg.checkpoint_kimg * 1000) + 1) * int(cfg.checkpoint_kimg * 1000)
    bar = _progress(total, nimg, acc.is_main_process)
    shape = nets.shape
    stop_now = False  # a run resumed at its end goes straight to the export

    def draw(phase: int, r: int, dropout: float):
        # Everything a micro-batch draws comes from generators keyed by its global index (phase, rank·rounds + r):
        # the run is the same whatever the number of GPUs, and a resumed run replays it exactly.
        mb = rank * rounds + r
        g_cpu, g_dev = _gen(cfg.seed, it, phase, mb, "cpu"), _gen(cfg.seed, it, phase, mb, device)
        c = c_text = data.encode(idx[phase, rank, r]).to(device)  # [b, 77, D] for prompts
        if dropout:
            c = drop_prompts(c, null, dropout, generator=g_cpu)
        z = torch.randn((cfg.micro_batch, *shape), generator=g_dev, device=device)  # [b, C, H, W]
        eps = torch.randn((cfg.micro_batch, *shape), generator=g_dev, device=device)
        t = sample_t(cfg.micro_batch, t_min=cfg.t_min, t_max=cfg.t_max, generator=g_cpu).to(device)
        return c, z, eps, t, g_dev, c_text

    while nimg < total:
        tick = time.perf_counter()
        # Prompts: a global draw of 2·batch indices per iteration, split by rank, so the data seen does not
        # depend on the number of GPUs.
        g_shared = _gen(cfg.seed, it, 2, 0, "cpu")  # the same on every rank
        idx = torch.randint(data.size, (2, world, rounds, cfg.micro_batch), generator=g_shared)
        k_step = int(torch.randint(1, cfg.steps + 1, (1,), generator=g_shared))  # one k per iteration (§6.1)
        gan_on = gan is not None and nimg >= gan.gan_start_kimg * 1000
        if gan_on:  # real pairs: a global draw as for the prompts
            idx_real = gan.indices(cfg.seed, it, cfg.batch).reshape(world, rounds, cfg.micro_batch)
            adv_weight = gan.adv_weight_at(nimg)
        sums = torch.zeros(7, device=device)  # loss_fake, loss_g, nan_fake, nan_g, stop requests, loss_d, loss_adv
        phases = _Phases(cfg.profile, device)

        # Fake score step.
        for r in range(rounds):
            c, z, eps, t, g_dev, c_text = draw(0, r, p_drop)
            with torch.no_grad(), acc.autocast():
                x_g = generate(net_g, z, c, vp, t_init=cfg.t_init, K=cfg.steps, k_stop=k_step, generator=g_dev)
            with place.no_sync(fake_ddp, r == rounds - 1), acc.autocast():
                loss = fake_step_loss(net_f_ddp, x_g, c, null, t, eps, vp, kappa_1=k["kappa_1"])
                sums[0] += _drop_nan(loss.detach())[0].sum()  # the score loss alone: L_D is logged as loss_disc
                if gan_on:  # the real pairs and x_g noised with this step's t and ε; the text kept (§6.2, §6.3)
                    x_real, c_real = gan.real(idx_real[rank, r])
                    loss_d = disc_step_loss(disc, x_g, c_text, x_real.to(device), c_real.to(device), t, eps, vp)
                    sums[5] += loss_d.detach().nan_to_num().sum()
                    loss = loss + gan.disc_weight * loss_d
                loss, nan = _drop_nan(loss)
                acc.backward(loss.sum() / b_tot)
            sums[2] += nan
        phases.mark("fake_step")
        _finite_grads(fake.parameters(), gan.gan_clip if gan_on else cfg.clip_grad_value)
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        phases.mark("fake_optimizer")

        # Generator step: fresh draws, no dropout; grads flow through teacher and fake into x_g (§4).
        fake.requires_grad_(False)
        for r in range(rounds):
            c, z, eps, t, g_dev, _ = draw(1, r, 0.0)
            with place.no_sync(G_ddp, r == rounds - 1), acc.autocast():
                x_g = generate(net_g_ddp, z, c, vp, t_init=cfg.t_init, K=cfg.steps, k_stop=k_step, grad_last=True,
                               generator=g_dev)
                kw = dict(kappa_2=k["kappa_2"], kappa_4=k["kappa_4"], alpha=cfg.alpha)
                objective = functools.partial(_generator_objective, disc=disc, t=t, c=c, b_tot=b_tot,
                                              adv_weight=adv_weight if gan_on else None)
                if cfg.generator_backward == "split":  # the same gradient, one network's graph at a time (§4)
                    grad, (loss, nan, loss_adv) = generator_step_split(net_t, net_f, x_g, c, null, t, eps, vp, **kw,
                                                                       objective=objective)
                    acc.backward((x_g * grad).sum())  # its gradient at x_g is grad: one backward through G
                else:
                    terms = (generator_step_terms(net_t, net_f, x_g, c, null, t, eps, vp, **kw) if gan_on else
                             (generator_step_loss(net_t, net_f, x_g, c, null, t, eps, vp, **kw), None, None))
                    J, (loss, nan, loss_adv) = objective(*terms)
                    acc.backward(J)
            if loss_adv is not None:
                sums[6] += loss_adv.nan_to_num().sum()
            sums[1] += loss.sum()
            sums[3] += nan
        phases.mark("generator_step")
        fake.requires_grad_(True)
        _finite_grads(G.parameters(), cfg.clip_grad_value)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        nimg += cfg.batch
        it += 1

        # Update EMA.
        if ema is not None:
            update_ema(ema, G, ema_beta(cfg.batch, nimg, cfg.ema_halflife_kimg, cfg.ema_rampup))
        phases.mark("generator_optimizer_ema")

        # Maintenance: metrics, checkpoint, preemption.
        sums[4] = float(stop["flag"])
        # One small all-reduce and one host sync per iteration: the losses and whether any rank was asked to stop.
        v = acc.reduce(sums, reduction="sum").tolist()
        stop_now = v[4] > 0
        if it % cfg.log_every == 0 or nimg >= total:
            metrics = {"kimg": nimg / 1000, "iteration": it, "loss_fake": v[0] / cfg.batch, "loss_g": v[1] / cfg.batch,
                       "nan_dropped": int(v[2] + v[3]), "images_per_s": cfg.batch / (time.perf_counter() - tick),
                       **phases.seconds()}
            if gan is not None:
                metrics |= {"loss_disc": v[5] / cfg.batch, "loss_adv": v[6] / cfg.batch}
            if device.type == "cuda":  # this process's peak, which is what must fit on a GPU
                metrics["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if acc.is_main_process:
                _log(logdir, writer, metrics)
                bar.set_postfix(loss_f=f"{metrics['loss_fake']:.4g}", loss_g=f"{metrics['loss_g']:.4g}",
                                img_s=f"{metrics['images_per_s']:.2f}")
        bar.update(cfg.batch)
        if cfg.checkpoints and (nimg >= next_ckpt or stop_now or nimg >= total):
            state = {"G": place.full_state(G, opt_g), "fake": place.full_state(fake, opt_f),  # collective under FSDP
                     "ema": place.full_state(ema) if ema is not None else None}
            if acc.is_main_process:
                checkpoint.save(cfg.output, nimg, {**state, "nimg": nimg, "iteration": it, "metrics": metrics},
                                {"config": to_dict(cfg), "teacher_fingerprint": nets.fingerprint, "nimg": nimg},
                                keep=cfg.keep_checkpoints)
                storage.upload_dir(str(logdir), storage.join(cfg.output, "logs"))
            failpoints.hit("train:checkpoint")
            acc.wait_for_everyone()
            next_ckpt += int(cfg.checkpoint_kimg * 1000)
        if stop_now:
            break
    bar.close()
    if acc.is_main_process:
        storage.upload_dir(str(logdir), storage.join(cfg.output, "logs"))
    shutil.rmtree(logdir, ignore_errors=True)
    for sig, handler in previous.items():
        signal.signal(sig, handler)

    model_uri = storage.join(cfg.output, "model")
    # Export the generator (EMA weights when EMA is on), gathered whole onto rank 0.
    export = None if stop_now else place.gather(ema if ema is not None else G, nets.template or G)
    if export is not None and acc.is_main_process:
        failpoints.hit("train:export")
        nets.export(export, nimg, "ema" if ema is not None else "raw", metrics)
    acc.wait_for_everyone()
    return DistillResult(model_uri=model_uri, kimg=nimg / 1000, iterations=it, interrupted=stop_now, metrics=metrics)


class _Phases:
    """Per-phase wall time of one iteration; synchronizes the GPU at each mark, so only on when profiling."""

    def __init__(self, enabled: bool, device):
        self.enabled, self.device, self.times = enabled, device, {}
        self.last = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[name], self.last = now - self.last, now

    def seconds(self) -> dict:
        return {f"phase_{k}_s": v for k, v in self.times.items()}


def _progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="img", disable=not enabled or os.environ.get("SIDFLOW_NO_BAR") == "1",
                desc="distill", dynamic_ncols=True)


def _tensorboard(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time; metrics.jsonl is always written
        return None
    return SummaryWriter(str(logdir))


def _log(logdir: Path, writer, metrics: dict) -> None:
    with open(logdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            if key not in ("kimg", "iteration"):
                writer.add_scalar(key, value, int(metrics["kimg"] * 1000))
        writer.flush()
