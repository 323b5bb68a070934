"""The VP-DDPM noise parameterisation shared by SD1.5, SD2.1-base and SDXL (method.md §1).

All functions are pure: tensors in, tensors out. `a` and `s` are the tables a_t = sqrt(alpha_bar_t) and
s_t = sqrt(1 - alpha_bar_t) indexed by integer t; `VP` holds the pair and gathers both at t.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VP:
    """The schedule's tables a [T] and s [T] (from `vp_tables`), passed as one value."""

    a: Tensor
    s: Tensor

    def at(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (a_t, s_t), each shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
        return at(self.a, t, x), at(self.s, t, x)

    def to(self, device) -> "VP":
        return VP(self.a.to(device), self.s.to(device))


def vp_tables(alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Return (a, s), each [T]: a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t). method.md §1."""
    alphas_cumprod = alphas_cumprod.double()
    return alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()


def scaled_linear_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Return alpha_bar [T] of the SD `scaled_linear` schedule (betas linear in sqrt space). method.md §1."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def at(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Return table[t] shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return table[t.to(table.device)].to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: Tensor, eps: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    """Return x_t = a_t x0 + s_t eps, same shape as x0 (diffusers `add_noise`). method.md §1."""
    return a_t * x0 + s_t * eps


def x0_from_eps(x_t: Tensor, eps: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    """Return f = (x_t - s_t eps) / a_t, the x0 prediction (`pred_original_sample`, no clipping). method.md §1."""
    return (x_t - s_t * eps) / a_t


def eps_from_x0(x_t: Tensor, x0: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    """Return eps = (x_t - a_t x0) / s_t, the inverse of `x0_from_eps`."""
    return (x_t - a_t * x0) / s_t


def sample_t(batch: int, *, t_min: int = 20, t_max: int = 980, generator: torch.Generator) -> Tensor:
    """Return t [B] ~ UniformInt[t_min, t_max), i.e. {20..979} by default, drawn per sample. method.md §1."""
    return torch.randint(t_min, t_max, (batch,), generator=generator, device=generator.device)


def step_times(*, t_init: int, K: int) -> list[int]:
    """Return [t_0, ..., t_{K-1}] with t_k = floor(t_init (1 - k/K)): 625 → [625] (K=1), [625, 312] (K=2). §1."""
    return [int(t_init * (K - k) // K) for k in range(K)]
