"""The one training loop both stages share: batches -> step_fn (forward + backward) -> optimizer step,
with a progress bar (tokens/s, loss, ETA), a loss history, and periodic crash-safe checkpoints to resume from.

The trained parameters may be FSDP shards (DTensors, see transfer/distributed.py RankGroup.fsdp). Checkpoints
then still hold whole tensors in the single-process layout: saving is a collective (every rank gathers each
tensor, rank 0 writes), and resuming loads the whole tensors on every rank and keeps each rank's shard.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint


LR_FLOOR = 0.1  # the cosine schedule ends at this fraction of the peak learning rate
WARMUP_DIVISOR = 20  # linear warm-up over the first 1/20 of the steps (at least one)
CHECKPOINT_EVERY_S = 120.0  # seconds between checkpoints


@dataclass
class TrainResult:
    steps: int  # all steps of the stage, resumed ones included
    tokens: int  # tokens trained in this process (a resumed run counts only its own)
    seconds: float  # wall time of the steps run in this process
    history: list = field(default_factory=list)  # [{"step", "tokens", "loss", ...}]
    stage_tokens: int = 0  # tokens of the whole stage, resumed steps included (what convert.json records)


def cosine_with_warmup(total_steps: int, warmup: int, floor: float = LR_FLOOR) -> Callable[[int], float]:
    """step -> learning-rate factor: linear warm-up to 1 over `warmup` steps, then cosine down to `floor`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard -> the whole tensor (a collective: every rank calls it, in the same order); else t."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    sd = optimizer.state_dict()
    return {**sd, "state": {i: {k: full_tensor(v) for k, v in s.items()} for i, s in sd["state"].items()}}


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole tensors: keep this rank's shard of each moment of a DTensor parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def _rank0_says(flag: bool) -> bool:
    """Rank 0's value of flag on every rank."""
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(
    name: str,
    sequences: torch.Tensor,
    step_fn: Callable[[torch.Tensor], dict],
    params: list[torch.nn.Parameter] | list[dict],
    state_fn: Callable[[], dict[str, torch.Tensor]],
    restore_fn: Callable[[dict[str, torch.Tensor]], None],
    lr: float,
    batch_size: int = 1,
    checkpoint_dir: Path | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    progress: bool = True,
    write_checkpoints: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train `params` (parameters, or AdamW parameter groups {"params", "lr"}) over `sequences` (N, T), one pass.
    step_fn(batch) must run forward and backward and return {"loss": float, ...}. state_fn/restore_fn give/take the
    tensors a checkpoint must hold.
    With checkpoint_dir, resumes from the last checkpoint there and saves one every checkpoint_every_s
    (write_checkpoints=False: resume only, never write; for the ranks other than 0 of a data-parallel run).
    With FSDP-sharded params every rank must call train alike: state_fn may return shards (they are gathered),
    restore_fn gets whole tensors (copied into a DTensor parameter they fill this rank's shard), rank 0's clock
    decides when to checkpoint, and an interrupt keeps the last periodic checkpoint (no save: the ranks stop at
    different points, so a gather could hang). on_step(step, total_steps), if given, runs before each step (a
    schedule that must resume where it stopped: transfer/window_dropout.py)."""
    total_steps = len(sequences) // batch_size
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    sharded = any(isinstance(p, DTensor) for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    start, history = 0, []
    if checkpoint_dir is not None and (found := load_checkpoint(checkpoint_dir, optimizer)) is not None:
        tensors, meta = found
        with implicit_replication() if sharded else nullcontext():
            restore_fn(tensors)
        if sharded:
            _shard_optimizer_state(optimizer)
        start, history = meta["step"], meta["history"]
    factor = cosine_with_warmup(total_steps, max(1, total_steps // WARMUP_DIVISOR))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s + start))
    tokens_per_step = batch_size * sequences.shape[1]

    def save(step):
        if checkpoint_dir is None or not (write_checkpoints or sharded):
            return
        tensors = {k: full_tensor(v) for k, v in state_fn().items()}
        optimizer_state = _full_optimizer_state(optimizer) if sharded else optimizer.state_dict()
        if write_checkpoints:
            save_checkpoint(checkpoint_dir, tensors, optimizer_state, {"step": step, "history": history})

    bar = tqdm(total=total_steps * tokens_per_step, initial=start * tokens_per_step, desc=name, unit="tok",
               unit_scale=True, disable=not progress, dynamic_ncols=True)
    t0 = last_save = time.perf_counter()
    done = start
    try:
        for step in range(start, total_steps):
            batch = sequences[step * batch_size : (step + 1) * batch_size]
            if on_step is not None:
                on_step(step, total_steps)
            metrics = step_fn(batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            done = step + 1
            elapsed = time.perf_counter() - t0
            history.append({"step": done, "tokens": done * tokens_per_step, "lr": schedule.get_last_lr()[0],
                            "tokens_per_s": (done - start) * tokens_per_step / elapsed, **metrics})
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            due = time.perf_counter() - last_save > checkpoint_every_s and done < total_steps
            if sharded:
                due = _rank0_says(due)  # the gather needs every rank
            if due:
                save(done)
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        if not sharded:
            save(done)  # finished steps survive an interrupt
        raise
    finally:
        bar.close()
    save(total_steps)
    return TrainResult(total_steps, (total_steps - start) * tokens_per_step, time.perf_counter() - t0, history,
                       stage_tokens=total_steps * tokens_per_step)
