"""The training-free baseline every converted model must beat: its teacher, untrained, with exact softmax over the
first S tokens and the last W (StreamingLLM; `--attention streaming`), W chosen so that its decoding state takes
as many bytes as the converted model's. A conversion earns its place only by doing better at equal memory."""

import copy

import torch

from ..generate.decoding import Decoder
from ..device import model_device
from ..layers.linear_attention import attention_preset
from ..models.linearized import LinearizedForCausalLM


def refill_steps(model) -> int:
    """Decoding steps after which a state has been at its largest: a sparse cache holds its M keys plus the keys
    that left the window since the last selection, up to `cache_every` of them (ops/sparse_cache/); 0 for a
    state that is full after any prompt longer than its window (a KV cache, a window, sinks, a memory)."""
    if not isinstance(model, LinearizedForCausalLM):
        return 0
    return max([m.config.cache_every for m in model.attention_modules() if m.config.cache] or [0])


def state_bytes(model, context: int) -> int:
    """Bytes of the decoding state after a `context`-token prompt (random tokens: the size depends on shapes only),
    the largest it reaches over the next refill_steps(model) decoding steps: what serving it must reserve."""
    ids = torch.randint(model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    dec = Decoder(model)
    logits = dec.prefill(ids.to(model_device(model)))
    most = dec.cache_bytes()
    for _ in range(refill_steps(model)):
        logits = dec.step(logits.argmax(-1, keepdim=True))
        most = max(most, dec.cache_bytes())
    return most


def streaming_baseline(teacher, student, sinks: int = 4, context: int = 2048):
    """(the teacher as a StreamingLLM model with the student's state bytes, its window, its state bytes, the
    student's state bytes). The teacher is copied: its attention modules are swapped in the copy only.
    The bytes of one more window token are measured (window 2 minus window 1), so a teacher's own local layers
    (Gemma 3: their sliding-window KV, the same in both) count as the fixed part they are; `context` must exceed
    their window."""
    target = state_bytes(student, context)

    def streaming(window: int):  # on a fresh copy: from_teacher must see the teacher's own attention modules
        return LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), attention_preset(
            "streaming", window=window, sinks=sinks)).eval()

    one = state_bytes(streaming(1), context)
    per_token = state_bytes(streaming(2), context) - one  # keys and values of one token, every streaming layer
    fixed = one - (1 + sinks) * per_token  # the local layers' own windows
    window = max(1, (target - fixed) // per_token - sinks)
    baseline = streaming(window)
    return baseline, window, state_bytes(baseline, context), target


def kv_cache_bytes(config, context: int, element_size: int) -> int:
    """Bytes of a teacher's KV cache (keys and values, every layer) after `context` tokens, from its config: a
    sliding-window layer (config.layer_types: Gemma 3) holds the last sliding_window - 1 tokens only (what
    transformers' sliding-window cache keeps: the new token completes the window)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or context
    tokens = sum(min(context, window - 1) if t == "sliding_attention" else context for t in types)
    return 2 * config.num_key_value_heads * head_dim * tokens * element_size
