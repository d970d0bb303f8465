"""Where models run: one helper for the --device / --dtype options of convert, eval, bench and bench-transfer,
plus the few device-generic utilities the measurements need (clock, device name)."""

import os
import time

import torch

from .errors import LinearizeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = (*DTYPES, "fp32", "bf16", "fp16")  # what --dtype accepts in every command (and "auto")
SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """--dtype float32 | bfloat16 | float16 (or fp32 | bf16 | fp16) -> torch dtype; "auto" is placement's."""
    if name not in DTYPE_NAMES:
        raise LinearizeError(f"--dtype {name!r} is not supported; choose auto, {', '.join(DTYPE_NAMES)}")
    return DTYPES[SHORT_NAMES.get(name, name)]


def placement(device: str = "auto", dtype: str = "auto", distributed: bool = False) -> tuple[torch.device, torch.dtype]:
    """--device auto (CUDA when torch sees one, else CPU) | cpu | cuda | cuda:N and --dtype auto (bfloat16 on
    CUDA, float32 on CPU) | one of DTYPE_NAMES -> (torch.device, torch.dtype). Under torchrun on GPUs each rank takes
    cuda:LOCAL_RANK. A clear LinearizeError for a bad name, or CUDA asked for where torch sees none."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        where = torch.device(name)
    except RuntimeError:
        raise LinearizeError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if where.type not in ("cpu", "cuda"):
        raise LinearizeError(f"--device {device!r}: only cpu and cuda are supported")
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise LinearizeError(f"--device {device} but torch sees no CUDA device (a CPU build of torch, "
                                 "or no GPU visible); use --device cpu")
        if distributed:
            where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        elif where.index is not None and where.index >= torch.cuda.device_count():
            raise LinearizeError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dtype == "auto":
        return where, torch.bfloat16 if where.type == "cuda" else torch.float32
    return where, torch_dtype(dtype)


def model_device(model) -> torch.device:
    """The device of a model's (first) parameters: where its inputs must go."""
    return next(model.parameters()).device


def now(device: torch.device) -> float:
    """time.perf_counter() after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_name(device: torch.device) -> str:
    """"NVIDIA H200"-style card name on CUDA, "cpu" otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
