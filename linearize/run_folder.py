"""The run folder: the one module that knows its file names, reads them, writes them (atomically) and loads
the models of a run. `linearize convert --out DIR` writes it; eval, bench, report and compare read it.

    DIR/config.json, model.safetensors, tokenizer files   the converted model (save_pretrained)
    DIR/progress.json     settings and the results of each finished step (what --resume continues)
    DIR/convert.json      settings, tokens, wall time, tokens/s and perplexity per stage
    DIR/curves.json       loss histories and per-layer transfer error (for the report)
    DIR/eval.json         `linearize eval`;  DIR/bench.json: `linearize bench`
    DIR/report.html, report/*.png   `linearize report`
    DIR/checkpoints/transfer/, checkpoints/lora/   crash-safe checkpoints (checkpoint.py):
                          tensors.safetensors, optimizer.safetensors, meta.json
    OUT/compare.json, compare.md   `linearize compare` (OUT/NAME are run folders)

Every file is written to NAME.tmp and renamed, so a reader sees the old file or the new one, never half of one.
"""

import json
import os
from pathlib import Path

from .errors import LinearizeError

CONFIG = "config.json"  # also what marks a Hugging Face model folder
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer_config.json"
PROGRESS = "progress.json"
CONVERT = "convert.json"
CURVES = "curves.json"
EVAL = "eval.json"
BENCH = "bench.json"
COMPARE = "compare.json"
COMPARE_TABLE = "compare.md"
REPORT = "report.html"  # `linearize report`, its figures in DIR/report/
REPORT_FIGURES = "report"
CHECKPOINTS = "checkpoints"  # one folder per stage: "transfer", "lora"
TENSORS = "tensors.safetensors"  # inside a checkpoint folder
OPTIMIZER = "optimizer.safetensors"
META = "meta.json"


def student_ppl(results: dict) -> float:
    """The held-out perplexity of the saved model from convert.json (or progress.json's results): with its sparse
    cache when one was switched on after training, else after the last stage that ran."""
    return results.get("saved_ppl", results.get("stage2_ppl", results.get("stage1_ppl")))


def transfer_tensors(run: str | Path) -> Path:
    """The stage 1 result of a run (what `convert --transfer-state` loads)."""
    return Path(run) / CHECKPOINTS / "transfer" / TENSORS


# --- writing: one write-then-rename helper -----------------------------------------------------------------------

def write_atomic(path: str | Path, write) -> None:
    """write(tmp_path) to PATH.tmp, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(obj, path: str | Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def write_text(text: str, path: str | Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """{name: tensor} -> a safetensors file (tensors moved to the CPU, made contiguous)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def save_model(model, tokenizer, out: Path) -> None:
    """save_pretrained into a temporary folder, then rename each file into `out`."""
    import shutil

    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


# --- reading: one place for a missing or broken file -------------------------------------------------------------

def read_json(path: str | Path, fix: str = "re-run the command that writes it"):
    """The parsed file, or None when it does not exist; a LinearizeError naming the file and `fix` when it is
    not valid JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LinearizeError(f"{path} is not valid JSON ({e}); {fix}") from e


def load_tensors(path: str | Path) -> dict:
    """safetensors.load_file with a clear error for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LinearizeError(f"weights file {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LinearizeError(f"{path} is not a valid safetensors file ({e}); re-create it or restore a good copy") from e


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def check_converted(path: str | Path) -> Path:
    """`path` as a Path, once it is known to hold a converted model."""
    path = Path(path)
    if not is_model_folder(path):
        raise LinearizeError(f"{path} is not a converted model folder (no {CONFIG}); run `linearize convert` first")
    return path


def convert_settings(run: str | Path, fix: str = "re-run `linearize convert`") -> dict:
    """The settings a run was converted with ({} when it has no convert.json)."""
    return (read_json(Path(run) / CONVERT, fix) or {}).get("settings", {})


def teacher_spec(run: str | Path, override: str | None = None) -> str | None:
    """The teacher of a run: `override`, else convert.json's settings.model (None = bundled SmolLM2)."""
    return override or convert_settings(run, fix="pass the teacher with --teacher").get("model")


def training_data(run: str | Path) -> str | None:
    """The run's training source, for its held-out split (None = bundled ShareGPT)."""
    return convert_settings(run).get("data")


# --- the models of a run ----------------------------------------------------------------------------------------

def load(path: str | Path, dtype=None):
    """Load a converted model folder -> (LinearizedForCausalLM in eval mode, tokenizer or None).
    Weights come from model.safetensors only (never pickle); a corrupt file gives a clear LinearizeError."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from .models.linearized import LinearizedConfig, LinearizedForCausalLM

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


def load_student(path: str | Path, device="cpu", dtype=None, **training_free):
    """(LinearizedForCausalLM on `device` in `dtype` (default float32), tokenizer); the folder must hold
    tokenizer files. training_free: heavy, cache, cache_every, memory_cap, cache_position changed without training
    (models.linearized.set_training_free; None: as converted)."""
    from .models.linearized import set_training_free

    model, tokenizer = load(path, dtype=dtype)
    if tokenizer is None:
        raise LinearizeError(f"{path} has no tokenizer files; re-run `linearize convert`")
    return set_training_free(model, **training_free).to(device), tokenizer


def load_teacher_of(path: str | Path, override: str | None = None, device="cpu", dtype=None):
    """(teacher model with SDPA attention on `device` in `dtype` (default float32), its spec as given to
    load_teacher)."""
    import torch

    from .loading.teacher import load_teacher

    spec = teacher_spec(path, override)
    teacher, _ = load_teacher(spec, dtype=dtype or torch.float32)
    teacher.set_attn_implementation("sdpa")
    return teacher.to(device), spec
