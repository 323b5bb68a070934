"""EMA of the generator with the EDM/SiD half-life ramp (method.md §5)."""

import torch


def ema_beta(batch: int, nimg: int, halflife_kimg: float, rampup: float | None) -> float:
    """Return β = 0.5^(batch / half-life_n), half-life_n = min(half-life, rampup · images seen). method.md §5."""
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """Set ema ← β ema + (1 − β) net over all parameters in one multi-tensor op (buffers copied).

    Under FSDP both are sharded alike, so each process updates its own shards.
    """
    from sidflow.train.sharding import local

    torch._foreach_lerp_([local(p) for p in ema.parameters()], [local(p.detach()) for p in net.parameters()], 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        local(b_ema).copy_(local(b))
