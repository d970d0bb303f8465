"""Which teacher architectures can be converted, and where their attention lives.

Llama-style families share one attention layout (q/k/v/o projections, GQA through num_key_value_heads,
rotary via the modeling module's apply_rotary_pos_emb, optional q_norm/k_norm). An Architecture says where
the decoder layers are and checks the teacher matches that layout.
"""

from dataclasses import dataclass

import torch.nn as nn

from ..errors import LinearizeError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers_path: str = "model.layers"  # attribute path from the CausalLM to its decoder layers
    attention_attr: str = "self_attn"  # attribute of a decoder layer holding the attention module

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention_attr) for layer in self.decoder_layers(model)]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama"),
}


def architecture_of(config) -> Architecture:
    """The Architecture for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise LinearizeError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]
