"""`linearize convert --minutes N`: token counts for both stages from a wall-clock budget.

A short throughput probe on the loaded teacher times one forward pass (what perplexity and the teacher view of the
distillation loss cost per row) and one real stage-1 step on throw-away student attention (what attention transfer
costs per row). A stage-2 step is priced from them: the teacher's forward (kl loss only) plus the student's forward
and backward, counted as LORA_STEP_IN_TRANSFER_STEPS stage-1 steps. What is left of the budget after loading,
probing and the held-out evaluations is split between the stages by TRANSFER_SHARE of the training time. The
plan is recorded in the run's progress.json, so `--resume` keeps it (whatever the machine's speed on resume).
Before stage 2 starts, time_lora_step times real stage-2 steps and the pipeline re-divides stage 2's seconds by
the time of one (recorded too), so a model whose stage 2 costs more than the estimate still ends on time.
"""

import gc
import math
from dataclasses import asdict, dataclass

import torch

from ..device import now
from ..errors import LinearizeError

TRANSFER_SHARE = 1 / 3  # of the training time: stage 1 (attention transfer); the rest goes to stage 2 (LoRA)
# a LoRA step (forward + backward through the model) in stage-1 steps, besides the teacher's forward: 1.7 measured
# on the 2-core CPU (window 256: 6.6 s per stage-1 row, 14.8 s per stage-2 row, 3.5 s per teacher row); 2 leaves
# room for a slower stage 2 elsewhere
LORA_STEP_IN_TRANSFER_STEPS = 2.0
EVALUATIONS = 3  # held-out perplexity passes of the student model: after stage 1, after stage 2, and the layer errors
SAVE_S = 10.0  # writing the model and the run files


@dataclass
class Plan:
    transfer_tokens: int
    lora_tokens: int
    teacher_row_s: float  # one held-out row through the teacher (no grad)
    transfer_row_s: float  # one stage-1 step on one row
    lora_row_s: float  # one stage-2 step on one row (estimate)
    overhead_s: float  # spent before planning + evaluations + saving
    budget_s: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def probe(teacher, row: torch.Tensor, attention) -> tuple[float, float]:
    """(seconds of one teacher forward, seconds of one stage-1 step) on one row (T,); the stage-1 step trains
    throw-away student modules (the teacher's weights are shared, untouched)."""
    from ..models.linearized import make_student_attention
    from ..transfer.attention_transfer import attention_transfer

    device = next(teacher.parameters()).device
    ids = row[None].to(device)
    with torch.no_grad():
        teacher(input_ids=ids[:, :8])  # warm-up
        t0 = now(device)
        teacher(input_ids=ids)
        teacher_s = now(device) - t0
    students = make_student_attention(teacher, attention)
    t0 = now(device)
    attention_transfer(teacher, students, row[None], progress=False)
    return teacher_s, now(device) - t0


def time_lora_step(model, rows: torch.Tensor, settings, lr: float) -> float:
    """Seconds of one stage-2 step (LoRA forward + backward + update, the teacher view's forward for a kl loss),
    run on a copy of `model` (the model itself is left as it is) over rows (n, T), one row a step: the last step's
    time, so with two rows the first step's one-off costs (about a third more on the 2-core CPU) are not counted."""
    import copy

    from ..finetune.lora import finetune_lora

    probe_model = copy.deepcopy(model)
    _, result = finetune_lora(probe_model, rows, settings, lr=lr, progress=False)
    del probe_model, _
    gc.collect()  # the copy, its adapters and optimizer state go before stage 2 allocates its own
    elapsed = [h["tokens"] / h["tokens_per_s"] for h in result.history]  # seconds since the first step began
    return elapsed[-1] - (elapsed[-2] if len(elapsed) > 1 else 0.0)


def plan(minutes: float, elapsed_s: float, teacher_s: float, transfer_s: float, eval_rows: int, seq_len: int,
         kl: bool, transfer_share: float = TRANSFER_SHARE, after_rows: int = 0) -> Plan:
    """Token counts that fit `minutes` of wall time, `elapsed_s` of which are already spent (loading, probing).
    transfer_share 0: no stage 1 (--skip-transfer, --transfer-state), all the training time goes to stage 2.
    after_rows: teacher forwards of seq_len tokens spent after training (fitting the cache's learned score)."""
    budget = minutes * 60
    lora_s = (teacher_s if kl else 0.0) + LORA_STEP_IN_TRANSFER_STEPS * transfer_s
    overhead = elapsed_s + (eval_rows * (1 + EVALUATIONS) + after_rows) * teacher_s + SAVE_S
    training = budget - overhead
    n1 = math.floor(training * transfer_share / transfer_s) if training > 0 else 0
    n2 = math.floor(training * (1 - transfer_share) / lora_s) if training > 0 else 0
    if (transfer_share and n1 < 1) or n2 < 1:
        need = overhead + (transfer_s / transfer_share if transfer_share else 0.0) + lora_s / (1 - transfer_share)
        raise LinearizeError(f"--minutes {minutes:g} is too small for one training step of each stage on this "
                             f"machine: loading and evaluation take about {overhead:.0f} s, a stage-1 step "
                             f"{transfer_s:.1f} s and a stage-2 step about {lora_s:.1f} s (seq-len {seq_len}); "
                             f"give at least --minutes {math.ceil(need / 60)}, or fewer --eval-tokens / a shorter "
                             "--seq-len")
    return Plan(n1 * seq_len, n2 * seq_len, teacher_s, transfer_s, lora_s, overhead, budget)
