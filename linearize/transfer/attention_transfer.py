"""Stage 1, attention transfer: teach each LinearAttention to reproduce its teacher layer's softmax output.

One teacher forward (no grad) per batch; a forward hook on every teacher attention module runs the student
attention on the very same input (the teacher's own hidden states), takes the output MSE, and backpropagates
right away, so only one layer's graph is alive at a time. Only feature maps and mixing factors train.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers.linear_attention import LinearAttention
from ..load.architectures import architecture_of
from ..training import TrainResult, train


def transfer_state(students: list[LinearAttention]) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p for i, s in enumerate(students)
            for n, p in s.named_parameters() if n.startswith(("feature_map_", "mix_logit"))}


def load_transfer_state(students: list[LinearAttention], tensors: dict[str, torch.Tensor]) -> None:
    params = transfer_state(students)
    missing = set(params) - set(tensors)
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)[:3]}...")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


class _TransferHooks:
    """Forward hooks that train student i on teacher attention i's input/output; collects per-layer losses."""

    def __init__(self, teacher, students: list[LinearAttention]):
        self.students = students
        self.losses = [0.0] * len(students)
        attn = architecture_of(teacher.config).attention_modules(teacher)
        self.handles = [a.register_forward_hook(self._hook(i), with_kwargs=True) for i, a in enumerate(attn)]

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            student = self.students[i]
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                q, k, v = student.project(x, kwargs["position_embeddings"])
            with torch.enable_grad():
                y = student.attend(q, k, v)
                out = student.o_proj(y.transpose(1, 2).reshape(*x.shape[:2], -1))
                loss = F.mse_loss(out, output[0].detach())
                loss.backward()
            self.losses[i] = loss.item()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def layer_transfer_errors(teacher, students: list[LinearAttention], sequences: torch.Tensor) -> list[float]:
    """Mean output MSE per layer (no training) over sequences (N, T): the quantity transfer minimises."""
    hooks = _TransferHooks(teacher, students)
    totals = [0.0] * len(students)
    try:
        for row in sequences:
            with torch.no_grad():
                teacher.get_decoder()(row[None])
            totals = [t + l for t, l in zip(totals, hooks.losses)]
    finally:
        hooks.remove()
    return [t / len(sequences) for t in totals]


def attention_transfer(
    teacher,
    students: list[LinearAttention],
    sequences: torch.Tensor,
    lr: float = 1e-2,
    batch_size: int = 1,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the students' feature maps (and mixing factors) on sequences (N, T) of token ids."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for s in students for p in s.trainable_transfer_parameters()]
    for p in params:
        p.requires_grad_(True)
    hooks = _TransferHooks(teacher, students)
    decoder = teacher.get_decoder()  # no lm_head: transfer needs no logits

    def step(batch):
        with torch.no_grad():
            decoder(batch)
        return {"loss": sum(hooks.losses), "layer_mse": list(hooks.losses)}

    try:
        return train("stage 1: attention transfer", sequences, step, params,
                     state_fn=lambda: transfer_state(students),
                     restore_fn=lambda t: load_transfer_state(students, t),
                     lr=lr, batch_size=batch_size, checkpoint_dir=checkpoint_dir, progress=progress)
    finally:
        hooks.remove()
