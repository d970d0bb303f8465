"""Held-out perplexity: exp(mean next-token cross-entropy) over packed sequences (N, T)."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..device import model_device


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int = 1, desc: str = "perplexity", progress: bool = True) -> float:
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    for i in tqdm(range(0, len(sequences), batch_size), desc=desc, disable=not progress, leave=False):
        batch = sequences[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
