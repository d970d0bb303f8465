"""The training-free baseline every converted model must beat: its teacher, untrained, with exact softmax over the
first S tokens and the last W (StreamingLLM; `--attention streaming`), W chosen so that its decoding state takes
as many bytes as the converted model's. A conversion earns its place only by doing better at equal memory."""

import copy

import torch

from ..decoding import Decoder
from ..device import model_device
from ..layers.linear_attention import attention_preset
from ..models.linearized import LinearizedForCausalLM


def state_bytes(model, context: int) -> int:
    """Bytes of the decoding state after a `context`-token prompt (random tokens: the size depends on shapes only)."""
    ids = torch.randint(model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    dec = Decoder(model)
    dec.prefill(ids.to(model_device(model)))
    return dec.cache_bytes()


def streaming_baseline(teacher, student, sinks: int = 4, context: int = 2048):
    """(the teacher as a StreamingLLM model with the student's state bytes, its window, its state bytes, the
    student's state bytes). The teacher is copied: its attention modules are swapped in the copy only."""
    target = state_bytes(student, context)
    probe = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), attention_preset("streaming", window=1,
                                                                                      sinks=sinks))
    per_token = state_bytes(probe, context) // (1 + sinks)  # keys and values of one token, every layer
    window = max(1, target // per_token - sinks)
    baseline = LinearizedForCausalLM.from_teacher(probe.model, attention_preset("streaming", window=window,
                                                                                sinks=sinks)).eval()
    return baseline, window, state_bytes(baseline, context), target


def kv_cache_bytes(config, context: int, element_size: int) -> int:
    """Bytes of a teacher's KV cache (keys and values, every layer) after `context` tokens, from its config: what a
    DynamicCache holds when every layer attends globally (no sliding-window layers)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * element_size
