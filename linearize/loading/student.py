"""Load the student of a run: the converted model that `linearize convert --out DIR` saved in DIR (run_folder.py
names its files). The run's teacher: loading/teacher.py's load_teacher_of.
"""

from pathlib import Path

from ..errors import LinearizeError
from ..run_folder import CONFIG, TOKENIZER, WEIGHTS, check_converted, read_json
from ..training_free import TrainingFree


def load(path: str | Path, dtype=None):
    """Load a converted model folder -> (LinearizedForCausalLM in eval mode, tokenizer or None).
    Weights come from model.safetensors only (never pickle); a corrupt file gives a clear LinearizeError."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from ..models.linearized import LinearizedConfig, LinearizedForCausalLM

    path = check_converted(path)
    if read_json(path / CONFIG).get("model_type") != LinearizedConfig.model_type:
        raise LinearizeError(f"{path} holds a plain model, not a linearized one; convert it with `linearize convert --model {path}`")
    if not (path / WEIGHTS).is_file():
        raise LinearizeError(f"{path} has no {WEIGHTS}")
    try:
        model = LinearizedForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LinearizeError(f"could not read {path / WEIGHTS} ({str(e).splitlines()[0][:200]}); "
                             "the file is corrupt or incomplete: re-run `linearize convert`") from e
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / TOKENIZER).exists() else None
    # from_pretrained leaves the teacher skeleton built inside __init__ in float32: every weight in `dtype`
    return model.to(dtype or torch.float32).eval(), tokenizer


def load_student(path: str | Path, device="cpu", dtype=None, training_free: TrainingFree | None = None):
    """(LinearizedForCausalLM on `device` in `dtype` (default float32), tokenizer); the folder must hold
    tokenizer files. training_free: settings changed without training (training_free.TrainingFree; None, or a
    setting None: as converted)."""
    model, tokenizer = load(path, dtype=dtype)
    if tokenizer is None:
        raise LinearizeError(f"{path} has no tokenizer files; re-run `linearize convert`")
    if training_free is not None:
        training_free.apply(model)
    return model.to(device), tokenizer
