"""linearize: turn a pretrained causal LM into a linear-attention LLM (attention transfer + LoRA).

    import linearize
    model, tokenizer = linearize.load("runs/smollm2")
    print(linearize.generate_text(model, tokenizer, "Tell me about owls."))
"""

from pathlib import Path

from .errors import LinearizeError
from .generate import generate_ids, generate_text
from .layers.linear_attention import ATTENTION_PRESETS, LinearAttention, LinearAttentionConfig, attention_preset
from .models.linearized import LinearizedConfig, LinearizedForCausalLM

__version__ = "0.1.0"


def load(path: str | Path, dtype=None):
    """Load a converted model folder -> (LinearizedForCausalLM in eval mode, tokenizer or None).
    Weights come from model.safetensors only (never pickle); a corrupt file gives a clear LinearizeError."""
    import json

    import torch
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LinearizeError(f"{path} is not a converted model folder (no config.json); run `linearize convert` first")
    if json.loads(config_file.read_text()).get("model_type") != LinearizedConfig.model_type:
        raise LinearizeError(f"{path} holds a plain model, not a linearized one; convert it with `linearize convert --model {path}`")
    if not (path / "model.safetensors").is_file():
        raise LinearizeError(f"{path} has no model.safetensors")
    try:
        model = LinearizedForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LinearizeError(f"could not read {path / 'model.safetensors'} ({str(e).splitlines()[0][:200]}); "
                             "the file is corrupt or incomplete: re-run `linearize convert`") from e
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer


__all__ = ["load", "generate_ids", "generate_text", "LinearizeError", "LinearAttention", "LinearAttentionConfig",
           "LinearizedConfig", "LinearizedForCausalLM", "ATTENTION_PRESETS", "attention_preset"]
