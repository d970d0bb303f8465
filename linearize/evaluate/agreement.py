"""How close the student is to its teacher on the same tokens: perplexity of both, KL and top-1 agreement."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..device import model_device


@torch.no_grad()
def agreement(teacher, student, sequences: torch.Tensor, progress: bool = True, desc: str = "teacher vs student") -> dict:
    """sequences (N, T) -> {"tokens", "teacher_ppl", "student_ppl", "kl", "top1"} over the N * (T - 1)
    next-token predictions (both models on the same device). kl: mean KL(teacher || student) in nats; top1: fraction where the argmaxes agree."""
    teacher.eval(), student.eval()
    nll_t = nll_s = kl = agree = 0.0
    count = 0
    device = model_device(teacher)
    for row in tqdm(sequences, desc=desc, disable=not progress, leave=False):
        row = row.to(device)
        ids, targets = row[None, :-1], row[1:]
        logp_t = F.log_softmax(teacher(input_ids=ids).logits[0].float(), dim=-1)  # (T-1, V)
        logp_s = F.log_softmax(student(input_ids=ids).logits[0].float(), dim=-1)
        nll_t -= logp_t.gather(-1, targets[:, None]).sum().item()
        nll_s -= logp_s.gather(-1, targets[:, None]).sum().item()
        kl += (logp_t.exp() * (logp_t - logp_s)).sum().item()
        agree += (logp_t.argmax(-1) == logp_s.argmax(-1)).sum().item()
        count += len(targets)
    return {"tokens": count, "teacher_ppl": math.exp(nll_t / count), "student_ppl": math.exp(nll_s / count),
            "kl": kl / count, "top1": agree / count}
