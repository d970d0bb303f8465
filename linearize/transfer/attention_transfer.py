"""Stage 1, attention transfer: teach each LinearAttention to reproduce its teacher layer's softmax output.

One teacher forward (no grad) per batch; a forward hook on every teacher attention module runs the student
attention on the very same input (the teacher's own hidden states), takes the output MSE, and backpropagates
right away, so only one layer's graph is alive at a time. Only feature maps and mixing factors train.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers.linear_attention import LinearAttention
from ..loading.architectures import architecture_of
from ..training import TrainResult, train


def transfer_state(students: list[LinearAttention], layers=None) -> dict[str, torch.Tensor]:
    """{"{layer}.{name}": parameter} of what transfer trains, for all layers or only `layers`."""
    layers = range(len(students)) if layers is None else layers
    return {f"{i}.{n}": p for i in layers
            for n, p in students[i].named_parameters() if n.startswith(LinearAttention.TRANSFER_PARAMETERS)}


def load_transfer_state(students: list[LinearAttention], tensors: dict[str, torch.Tensor], layers=None) -> None:
    params = transfer_state(students, layers)
    missing = set(params) - set(tensors)
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)[:3]}...")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


class _TransferHooks:
    """Forward hooks that train student i on teacher attention i's input/output; collects per-layer losses.
    `layers`: hook only these layers (default all); the others keep loss 0."""

    def __init__(self, teacher, students: list[LinearAttention], layers=None):
        self.students = students
        self.losses = [0.0] * len(students)
        self.powers = [0.0] * len(students)  # mean square of each teacher layer's output (the last batch)
        attn = architecture_of(teacher.config).attention_modules(teacher)
        layers = range(len(attn)) if layers is None else layers
        self.projected = {i: {} for i in layers}  # the teacher's own q/k/v projections, reused by the student
        self.handles = []
        for i in layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                self.handles.append(getattr(attn[i], name).register_forward_hook(self._keep(i, name)))
            self.handles.append(attn[i].register_forward_hook(self._hook(i), with_kwargs=True))

    def _keep(self, i, name):
        def keep(module, args, output):
            self.projected[i][name] = output

        return keep

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            student = self.students[i]
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            kept = self.projected[i]
            reuse = (kept.pop("q_proj"), kept.pop("k_proj"), kept.pop("v_proj")) if len(kept) == 3 else None
            with torch.no_grad():
                streams = student.project(x, kwargs["position_embeddings"], reuse)  # q, k, v, log gate
            with torch.enable_grad():
                y = student.attend(streams)
                out = student.o_proj(y.transpose(1, 2).reshape(*x.shape[:2], -1))
                loss = F.mse_loss(out, output[0].detach())
                if loss.requires_grad:  # a layer with nothing to train (exact softmax) only reports its error
                    loss.backward()
            self.losses[i] = loss.item()
            self.powers[i] = output[0].detach().float().square().mean().item()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def layer_transfer_errors(teacher, students: list[LinearAttention], sequences: torch.Tensor,
                          relative: bool = False) -> list[float]:
    """Mean output MSE per layer (no training) over sequences (N, T): the quantity transfer minimises.
    relative: divided by the mean square of the teacher layer's output over the same rows (layers compare)."""
    hooks = _TransferHooks(teacher, students)
    totals, powers = [0.0] * len(students), [0.0] * len(students)
    try:
        device = next(teacher.parameters()).device
        for row in sequences:
            with torch.no_grad():
                teacher.get_decoder()(row[None].to(device))
            totals = [t + l for t, l in zip(totals, hooks.losses)]
            powers = [t + p for t, p in zip(powers, hooks.powers)]
    finally:
        hooks.remove()
    if relative:
        return [t / p for t, p in zip(totals, powers)]
    return [t / len(sequences) for t in totals]


def attention_transfer(
    teacher,
    students: list[LinearAttention],
    sequences: torch.Tensor,
    lr: float = 1e-2,
    mix_lr: float | None = None,
    batch_size: int = 1,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    layers: list[int] | None = None,
    data_parallel=None,
    forward=None,
    window_dropout=None,
) -> TrainResult:
    """Train the students' feature maps (and mixing factors) on sequences (N, T) of token ids. mix_lr: the mixing
    factors' learning rate (None: lr).
    layers: train only these students (default all). data_parallel: a transfer.distributed.RankGroup; each
    rank then runs its shard of every batch and gradients are averaged (see transfer/distributed.py).
    forward(batch): what runs the teacher attention modules on a batch; default the teacher's decoder on token
    ids (transfer/blockwise.py replays one block of layers on stored hidden states instead).
    window_dropout: a transfer.window_dropout.WindowDropout: at each step some layers train without their window."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = list(range(len(students))) if layers is None else layers
    params = [p for i in layers for p in students[i].trainable_transfer_parameters()]
    for p in params:
        p.requires_grad_(True)
    mixes = [students[i].mix_logit for i in layers if students[i].mix_logit is not None]
    groups = params
    if mix_lr is not None and mix_lr != lr and mixes:
        mix_ids = {id(m) for m in mixes}
        groups = [{"params": [p for p in params if id(p) not in mix_ids]}, {"params": mixes, "lr": mix_lr}]
    hooks = _TransferHooks(teacher, students, layers)
    decoder = teacher.get_decoder()  # no lm_head: transfer needs no logits
    device = next(teacher.parameters()).device
    forward = forward or (lambda batch: decoder(batch.to(device)))

    def step(batch):
        if data_parallel is not None:
            batch = data_parallel.shard(batch)
        with torch.no_grad():
            forward(batch)
        losses = list(hooks.losses)
        if data_parallel is not None:
            losses = data_parallel.average_gradients(params, losses)
        return {"loss": sum(losses), "layer_mse": losses}

    try:
        return train("stage 1: attention transfer", sequences, step, groups,
                     state_fn=lambda: transfer_state(students, layers),
                     restore_fn=lambda t: load_transfer_state(students, t, layers),
                     lr=lr, batch_size=batch_size, checkpoint_dir=checkpoint_dir, progress=progress,
                     write_checkpoints=data_parallel is None or data_parallel.rank == 0,
                     on_step=None if window_dropout is None else (
                         lambda step, total: window_dropout.set(students, step, total)))
    finally:
        hooks.remove()
        if window_dropout is not None:
            window_dropout.clear(students)
