"""The run folder: the one module that knows its file names, reads them and writes them (atomically).
`linearize convert --out DIR` writes it; eval, bench, report and compare read it. Loading the models of a run:
loading/student.py (load, load_student) and loading/teacher.py (load_teacher_of).

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
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # nothing half-written is left behind
        tmp.unlink(missing_ok=True)
        raise


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

