"""Where recall is lost: switch layers of a converted model back to its teacher's exact softmax attention (training
free) and rank the layers by what that does to retrieval.

    with teacher_attention(student, teacher, [3, 17]):   # layers 3 and 17 run the teacher's own attention:
        ...                                               # its q/k/v/o (shared, not copied), causal softmax, KV cache
    order, gains = rank_layers_for_recall(student, teacher, tokenizer)

A switched layer is the teacher's layer: the teacher's projections (not the student's, which stage 2 may have
changed with LoRA) in a FULL_SOFTMAX LinearAttention, so its decoding state is a KV cache. Every linearized layer
switched, and the model is the teacher again, unless stage 2 put LoRA on the MLPs (--lora-targets attention+mlp)
or on a teacher's own local-window layers (Gemma 3), which are not switched.

The recall ranking: for each linearized layer alone, switched, the gain in log-probability of the right answer on
a few probe prompts (a number stated once in filler text, asked at the end). The probes' wording, names and
filler are their own, unlike the eval's passkey / multikey prompts (evaluate/passkey.py).
"""

import random
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..device import model_device
from ..errors import LinearizeError
from ..loading.architectures import architecture_of
from ..models.linearized import exact_softmax_attention, linearized_layers, swap_attention
from .passkey import hide, token_ids

PROBE_FILLER = ("Rain fell on the old harbour town. A cat slept by the bakery door. The evening train left on "
                "time. Somebody whistled a tune in the street. ")
PROBE_NEEDLE = "Note to self: my locker combination is {key}. "
PROBE_QUESTION = "\nQuick check: my locker combination is"


@contextmanager
def teacher_attention(student, teacher, layers):
    """Inside the block, the student's `layers` (linearized ones) run the teacher's exact softmax attention;
    the student's own attention modules are back afterwards."""
    arch = architecture_of(student.model.config)
    own = student.attention_modules()
    candidates = linearized_layers(own)
    if wrong := sorted(set(layers) - set(candidates)):
        raise LinearizeError(f"layers {wrong} have no linear part to switch; choose from the {len(candidates)} "
                             f"linearized layers {candidates[0]}..{candidates[-1]}")
    switched, teachers = list(own), arch.attention_modules(teacher)
    for i in set(layers):
        switched[i] = exact_softmax_attention(teachers[i], own[i], student.model.config)
    swap_attention(student.model, switched)
    try:
        yield student
    finally:
        swap_attention(student.model, own)


def probe_prompts(tokenizer, n: int = 4, length: int = 1024, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (prompt ids (1, T), answer ids (1, A)) pairs: a 5-digit number stated at depth (i + 0.5) / n of about
    `length` tokens of PROBE_FILLER, asked at the end."""
    rng, probes = random.Random(f"recall-probe-{seed}"), []
    for i in range(n):
        key = rng.randint(10000, 99999)
        text = hide(tokenizer, "", [PROBE_NEEDLE.format(key=key)], [(i + 0.5) / n], PROBE_QUESTION, length,
                    filler=PROBE_FILLER)
        probes.append((token_ids(tokenizer, text + PROBE_QUESTION), token_ids(tokenizer, f" {key}")))
    return probes


@torch.no_grad()
def answer_logprob(model, probes) -> float:
    """Mean over probes of log p(answer tokens | prompt) (nats, summed over the answer's tokens; teacher forcing)."""
    device, total = model_device(model), 0.0
    for prompt, answer in probes:
        ids = torch.cat([prompt, answer], dim=1).to(device)
        logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float()
        total += -F.cross_entropy(logits, answer[0].to(device), reduction="sum").item()
    return total / len(probes)


def rank_layers_for_recall(student, teacher, tokenizer, probes: int = 4, length: int = 1024,
                           progress: bool = True) -> tuple[list[int], dict[int, float]]:
    """(the linearized layers, most useful first; {layer: gain}), gain = answer_logprob with that layer alone
    switched to the teacher's attention minus without (nats per probe)."""
    prompts = probe_prompts(tokenizer, probes, length)
    base = answer_logprob(student, prompts)
    gains = {}
    for i in tqdm(linearized_layers(student.attention_modules()), desc="recall probe per layer", disable=not progress,
                  leave=False):
        with teacher_attention(student, teacher, [i]):
            gains[i] = answer_logprob(student, prompts) - base
    return sorted(gains, key=lambda i: -gains[i]), gains
