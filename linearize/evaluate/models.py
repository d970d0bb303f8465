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


def load_student(path: str | Path):
    """(LinearizedForCausalLM, tokenizer); the folder must hold tokenizer files."""
    import linearize

    model, tokenizer = linearize.load(path)
    if tokenizer is None:
        raise LinearizeError(f"{path} has no tokenizer files; re-run `linearize convert`")
    return model, tokenizer


def load_teacher_of(path: str | Path, override: str | None = None):
    """(teacher model with SDPA attention, its spec as given to load_teacher)."""
    from ..load.teacher import load_teacher

    spec = teacher_spec(path, override)
    teacher, _ = load_teacher(spec)
    teacher.set_attn_implementation("sdpa")
    return teacher, spec
