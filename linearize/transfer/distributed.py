"""Both stages on several processes with torch.distributed, launched by torchrun (gloo on CPU, nccl on GPU).

    torchrun --nproc-per-node 2 -m linearize.cli convert --distributed layers ...

Stage 1 (attention transfer) splits one of two ways; both reproduce a single-process run:
- "layers": rank r trains the students of layers i with i % world == r. Every rank runs the whole teacher
  forward but only its own hooks train. Layers learn independently (each from the teacher's own inputs, with
  per-parameter AdamW), so the result equals the single-process run with the same batches. Each rank
  checkpoints its own layers (checkpoint_dir/rank{r}-of-{world}); at the end each owner broadcasts its layers,
  so every rank holds all of them, and rank 0 writes the merged checkpoint to checkpoint_dir.
- "data": each rank runs 1/world of every batch and the gradients are all-reduced (averaged) before the
  optimizer step: equal to one process with the same global batch. Rank 0 alone writes checkpoints.
Stage 2 (LoRA) is data parallel: each rank runs 1/world of every batch (finetune_lora(..., data_parallel=group)),
with either
- DDP (modes "layers" and "data"): every rank holds the whole model; gradients are all-reduced; or
- FSDP (mode "fsdp", finetune_lora(..., fsdp=True)): torch's fully_shard (FSDP2) per decoder layer and on the
  root, so every rank holds 1/world of each weight (frozen base and LoRA adapters alike) and all-gathers one
  layer at a time. Checkpoints gather the whole trainable state (rank 0 writes it in the single-process layout),
  and after training every rank gathers the whole model to merge the adapters. Stage 1 in mode "fsdp" runs
  as "data" (every rank holds the whole teacher).
"""

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import LinearizeError
from ..layers.linear_attention import LinearAttention
from ..training import TrainResult, full_tensor
from .attention_transfer import attention_transfer, load_transfer_state, transfer_state

TRANSFER_MODES = ("layers", "data")
DISTRIBUTED_MODES = ("layers", "data", "fsdp")  # `convert --distributed`; "fsdp" runs stage 1 as "data"


@dataclass
class RankGroup:
    """This process's place in the torch.distributed group."""

    rank: int
    world: int

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B / world, T): this rank's contiguous rows of a global batch."""
        if len(batch) % self.world:
            raise LinearizeError(f"batch of {len(batch)} sequences does not split over {self.world} ranks; "
                                 f"use a batch size that is a multiple of {self.world}")
        n = len(batch) // self.world
        return batch[self.rank * n : (self.rank + 1) * n]

    def average_gradients(self, params: list[torch.Tensor], losses: list[float]) -> list[float]:
        """All-reduce (mean) the gradients of params and the per-layer losses in one flat buffer."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad.flatten() for p in params]
        flat = torch.cat(grads + [torch.tensor(losses, dtype=grads[0].dtype, device=grads[0].device)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return flat[offset:].tolist()

    def owned_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if i % self.world == self.rank]

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wrap for data-parallel training (gradients of trainable parameters averaged in backward)."""
        device_ids = [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def fsdp(self, module: torch.nn.Module, blocks: list[torch.nn.Module]) -> Callable[[], torch.nn.Module]:
        """Shard `module` in place with FSDP2 (fully_shard on each of `blocks`, the decoder layers, then on the
        root): its parameters become DTensors holding this rank's 1/world of each tensor, a block's weights are
        all-gathered while it runs, and gradients are reduce-scattered (averaged). Returns `gather`, a collective
        that gives every rank a plain, unsharded copy of the module as trained so far."""
        def meta(t):  # same class and shape, no storage
            empty = torch.empty_like(t, device="meta")
            return torch.nn.Parameter(empty, t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty

        # the module's structure (the same classes, tied weights included), to refill from the shards later
        skeleton = copy.deepcopy(module, {id(t): meta(t) for t in (*module.parameters(), *module.buffers())})
        mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (self.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)

        @torch.no_grad()
        def gather() -> torch.nn.Module:
            memo = {id(m): torch.nn.Parameter(full_tensor(p.detach()), p.requires_grad)
                    for m, p in zip(skeleton.parameters(), module.parameters())}
            memo.update({id(m): b for m, b in zip(skeleton.buffers(), module.buffers())})
            return copy.deepcopy(skeleton, memo)

        return gather

    def barrier(self):
        dist.barrier()

    def close(self):
        dist.barrier()
        dist.destroy_process_group()


def init_distributed(backend: str | None = None) -> RankGroup:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    backend: None picks nccl when CUDA is present (and selects cuda:LOCAL_RANK), else gloo."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LinearizeError("--distributed needs torchrun's environment; launch with "
                             "`torchrun --nproc-per-node N -m linearize.cli convert --distributed ...`")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return RankGroup(dist.get_rank(), dist.get_world_size())


def broadcast_students(students: list[LinearAttention], group: RankGroup) -> None:
    """Every layer's transfer parameters from its owner (layer i % world) to all ranks."""
    for i, student in enumerate(students):
        for p in student.trainable_transfer_parameters():
            dist.broadcast(p.data, src=i % group.world)


def _merge_layer_histories(history: list[dict], group: RankGroup) -> list[dict]:
    """Each rank logged only its own layers' losses (0 elsewhere): sum them over ranks."""
    if not history:
        return history
    mse = torch.tensor([h["layer_mse"] for h in history], dtype=torch.float64)
    dist.all_reduce(mse)
    return [{**h, "layer_mse": row, "loss": sum(row)} for h, row in zip(history, mse.tolist())]


def distributed_transfer(
    teacher,
    students: list[LinearAttention],
    sequences: torch.Tensor,
    group: RankGroup,
    mode: str = "layers",
    lr: float = 1e-2,
    batch_size: int = 1,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    window_dropout=None,
) -> TrainResult:
    """attention_transfer over the ranks of `group` (every rank calls it with the same arguments); afterwards
    every rank holds all trained students. batch_size is the global batch."""
    if mode not in TRANSFER_MODES:
        raise LinearizeError(f"unknown --distributed mode {mode!r}; choose one of {TRANSFER_MODES}")
    progress = progress and group.rank == 0
    args = dict(lr=lr, batch_size=batch_size, progress=progress, window_dropout=window_dropout)
    if mode == "data":
        return attention_transfer(teacher, students, sequences, checkpoint_dir=checkpoint_dir, data_parallel=group,
                                  **args)
    if group.world > len(students):
        raise LinearizeError(f"{group.world} ranks but only {len(students)} layers; use --distributed data "
                             f"or at most {len(students)} processes")
    total_steps = len(sequences) // batch_size
    if checkpoint_dir is not None and (found := load_checkpoint(checkpoint_dir)) and found[1]["step"] == total_steps:
        load_transfer_state(students, found[0])  # finished and merged earlier
        return TrainResult(total_steps, 0, 0.0, found[1]["history"])
    own_dir = Path(checkpoint_dir) / f"rank{group.rank}-of-{group.world}" if checkpoint_dir else None
    result = attention_transfer(teacher, students, sequences, checkpoint_dir=own_dir,
                                layers=group.owned_layers(len(students)), **args)
    broadcast_students(students, group)
    result.history = _merge_layer_histories(result.history, group)
    if checkpoint_dir is not None:
        if group.rank == 0:  # the merged result, in the single-process layout (no optimizer moments)
            all_params = [p for s in students for p in s.trainable_transfer_parameters()]
            save_checkpoint(checkpoint_dir, transfer_state(students), torch.optim.AdamW(all_params),
                            {"step": result.steps, "history": result.history})
        group.barrier()
    return result
