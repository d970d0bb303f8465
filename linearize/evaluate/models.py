"""Load a converted model folder together with its teacher (the model it was converted from)."""

import json
from pathlib import Path

from ..errors import LinearizeError


def teacher_spec(path: str | Path, override: str | None = None) -> str | None:
    """The teacher of a converted folder: `override`, else convert.json's settings.model (None = bundled SmolLM2)."""
    if override:
        return override
    info = Path(path) / "convert.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text()).get("settings", {}).get("model")
    except json.JSONDecodeError as e:
        raise LinearizeError(f"{info} is not valid JSON ({e}); pass the teacher with --teacher") from e


def load_student(path: str | Path, device="cpu", dtype=None):
    """(LinearizedForCausalLM on `device` in `dtype` (default float32), tokenizer); the folder must hold
    tokenizer files."""
    import linearize

    model, tokenizer = linearize.load(path, dtype=dtype)
    if tokenizer is None:
        raise LinearizeError(f"{path} has no tokenizer files; re-run `linearize convert`")
    return model.to(device), tokenizer


def load_teacher_of(path: str | Path, override: str | None = None, device="cpu", dtype=None):
    """(teacher model with SDPA attention on `device` in `dtype` (default float32), its spec as given to
    load_teacher)."""
    import torch

    from ..load.teacher import load_teacher

    spec = teacher_spec(path, override)
    teacher, _ = load_teacher(spec, dtype=dtype or torch.float32)
    teacher.set_attn_implementation("sdpa")
    return teacher.to(device), spec
