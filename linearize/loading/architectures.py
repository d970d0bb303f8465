"""Which teacher architectures can be converted, and where their attention lives.

Llama-style families share one attention layout (q/k/v/o projections, GQA through num_key_value_heads,
rotary via the modeling module's apply_rotary_pos_emb with the (cos, sin) the decoder layer passes in, optional
q_norm/k_norm, the softmax scale in `attn.scaling`). An Architecture says where the decoder layers are and
which layers are local (sliding-window) ones; everything else is shared.

- Qwen3, Gemma 3: q_norm / k_norm on each head before RoPE (LinearAttention.project applies them).
- Gemma 3: scale query_pre_attn_scalar**-0.5 (read from attn.scaling); per-layer rope (the model computes one
  (cos, sin) per layer type and hands each layer its own); sliding-window and global layers interleaved.
- Local layers (attn.sliding_window set, in a model that also has global ones): the student keeps them as the
  teacher's exact sliding-window softmax (same window, no linear part, no new parameters): they already decode
  in constant memory. Only global layers are linearized.
- Mistral: a window applied to every layer (Mistral-7B-v0.1) is treated as full attention, as LoLCATs did.
"""

from dataclasses import dataclass

import torch.nn as nn

from ..errors import LinearizeError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers_path: str = "model.layers"  # attribute path from the CausalLM to its decoder layers
    attention_attr: str = "self_attn"  # attribute of a decoder layer holding the attention module
    window_attr: str | None = None  # attribute of the attention module with its sliding window (None: all global)
    unsupported: tuple[str, ...] = ()  # config flags that must be unset/False, e.g. logit soft-capping

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention_attr) for layer in self.decoder_layers(model)]

    def local_window(self, attn: nn.Module) -> int | None:
        """The teacher layer's sliding window (it keys i - W < j <= i), or None for a global layer."""
        return getattr(attn, self.window_attr, None) if self.window_attr else None

    def rope_frequencies(self, model: nn.Module, layer_idx: int):
        """() -> the inverse RoPE frequencies (head_dim / 2,) the model's rotary module gives layer `layer_idx`
        (Gemma 3: one set per layer type), or None where the model has none that this can read. A function, read
        when called: transformers fills the rotary buffers in after loading the weights."""
        rotary = getattr(getattr(model, self.layers_path.split(".")[0], model), "rotary_emb", None)
        name = "inv_freq"
        if not hasattr(rotary, name) and getattr(model.config, "layer_types", None):  # one set per layer type
            name = f"{model.config.layer_types[layer_idx]}_inv_freq"
        return lambda: getattr(rotary, name, None)

    def check(self, config) -> None:
        for flag in self.unsupported:
            if getattr(config, flag, None):
                raise LinearizeError(f"{self.model_type} models with {flag}={getattr(config, flag)!r} are not "
                                     f"supported; use a checkpoint without {flag}")


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("mistral"),
    "qwen2": Architecture("qwen2", window_attr="sliding_window"),
    "qwen3": Architecture("qwen3", window_attr="sliding_window"),
    "gemma3_text": Architecture("gemma3_text", window_attr="sliding_window",
                                unsupported=("attn_logit_softcapping", "use_bidirectional_attention")),
}


def architecture_of(config) -> Architecture:
    """The Architecture for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":
        raise LinearizeError("multimodal gemma3 checkpoints are not supported; load the text model "
                             "(Gemma3ForCausalLM, model_type gemma3_text)")
    if model_type not in ARCHITECTURES:
        raise LinearizeError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    ARCHITECTURES[model_type].check(config)
    return ARCHITECTURES[model_type]
