"""How the trained networks (G, the fake score network, G's EMA) are spread over the processes (docs/sizing.md says
which placement each teacher type gets).

`ddp` keeps a full replica of each network per GPU and all-reduces gradients; `fsdp` shards parameters,
gradients and Adam state with FSDP2 (`fully_shard`, one unit per UNet block), which is what fits SDXL. With one
process both are the plain single-GPU program. Checkpoints and the exported generator are full (unsharded) state
dicts in both modes, so a run can resume in the other mode or on another number of GPUs.
"""

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU


class Placement:
    """The networks' placement for one run: `mode` is 'ddp' or 'fsdp'; `world` the number of processes."""

    def __init__(self, mode: str, acc):
        self.acc, self.world = acc, acc.num_processes
        self.sharded = mode == "fsdp" and self.world > 1
        self.mesh = None
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(acc.device.type, (self.world,))

    def shard(self, unet: nn.Module) -> nn.Module:
        """Shard `unet` in place (FSDP) and return it; a no-op for DDP and single-process runs."""
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            unet.to(memory_format=torch.contiguous_format)  # FSDP shards contiguous parameters only (not NHWC)
            # One FSDP unit per UNet block: each block's parameters are all-gathered just before it runs and freed
            # after, so peak memory is one block's full weights plus every block's shard.
            for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                if block is not None:
                    fully_shard(block, mesh=self.mesh)
            fully_shard(unet, mesh=self.mesh)
        return unet

    def wrap(self, unet: nn.Module) -> nn.Module:
        """Return the module to call in training: the DDP wrapper, or the (already sharded) module itself."""
        return unet if self.sharded else self.acc.prepare_model(unet)

    def no_sync(self, model: nn.Module, last_round: bool):
        """Reduce gradients across processes on the last accumulation round only (method.md §8.2)."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            model.set_requires_gradient_sync(last_round)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last_round else self.acc.no_sync(model)

    def full_state(self, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict | None:
        """Return the full state dict of `model` (and of `opt` under key 'opt') on rank 0, None elsewhere; under FSDP
        a collective call that gathers the shards onto rank 0's CPU."""
        if not self.sharded:
            if not self.acc.is_main_process:  # every replica holds the same state
                return None
            out = {"model": model.state_dict()}
            if opt is not None:
                out["opt"] = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            return out
        out = {"model": get_model_state_dict(model, options=FULL)}
        if opt is not None:
            out["opt"] = get_optimizer_state_dict(model, opt, options=FULL)
        return out

    def reads_checkpoint(self) -> bool:
        """Whether this process reads the checkpoint file: every DDP replica does; under FSDP only rank 0, which
        broadcasts it into the shards (8 full copies of an SDXL checkpoint would not fit in one node's memory)."""
        return not self.sharded or self.acc.is_main_process

    def load_full_state(self, model: nn.Module, state: dict | None, opt: torch.optim.Optimizer | None = None) -> None:
        """Load a full state dict (from `full_state`, in either mode) into `model` and `opt`; a collective call.
        Under FSDP only rank 0 passes `state` (the others None)."""
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.sharded)
        state = state or {"model": {}, "opt": {}}
        set_model_state_dict(model, state["model"], options=options)
        if opt is not None:
            set_optimizer_state_dict(model, opt, optim_state_dict=state["opt"], options=options)

    def share(self, values: list) -> list:
        """Return rank 0's `values` (plain Python objects) on every process."""
        if self.sharded:
            torch.distributed.broadcast_object_list(values, src=0)
        return values

    def gather(self, model: nn.Module, like: nn.Module) -> nn.Module | None:
        """Return an unsharded CPU copy of `model` built like `like` on rank 0 (None elsewhere); collective."""
        if not self.sharded:
            return model
        state = get_model_state_dict(model, options=FULL)
        if not self.acc.is_main_process:
            return None
        with torch.device("meta"):  # no random init of weights that are overwritten next
            full = type(like).from_config(like.config)
        full.load_state_dict(state, assign=True)
        left = [name for name, t in [*full.named_parameters(), *full.named_buffers()] if t.is_meta]
        if left:  # a non-persistent buffer is not in the state dict: it would be exported empty
            raise RuntimeError(f"gathered {type(like).__name__} has no values for {', '.join(left[:3])}")
        return full.float()


def local(t: torch.Tensor) -> torch.Tensor:
    """Return this process's shard of a DTensor (elementwise ops on shards are the global op), else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t
