"""linearize: turn a pretrained causal LM into a linear-attention LLM (attention transfer + LoRA).

    import linearize
    model, tokenizer = linearize.load("runs/smollm2")
    print(linearize.generate_text(model, tokenizer, "Tell me about owls."))
"""

from .errors import LinearizeError
from .generate.decoding import generate_ids, generate_text
from .layers.linear_attention import ATTENTION_PRESETS, LinearAttention, LinearAttentionConfig, attention_preset
from .models.linearized import LinearizedConfig, LinearizedForCausalLM
from .loading.student import load

__version__ = "0.1.0"

__all__ = ["load", "generate_ids", "generate_text", "LinearizeError", "LinearAttention", "LinearAttentionConfig",
           "LinearizedConfig", "LinearizedForCausalLM", "ATTENTION_PRESETS", "attention_preset"]
