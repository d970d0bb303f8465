"""Crash-safe checkpoints: safetensors only (no pickle), every file written to a temporary name and renamed.

A checkpoint is a folder of `tensors.safetensors` (module parameters), `optimizer.safetensors` (optimizer
state, flattened) and `meta.json` (step, history, optimizer param_groups). It is written as NAME.tmp and then
swapped in, so a checkpoint on disk is always complete: either the old one or the new one.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .run_folder import META, OPTIMIZER, TENSORS, load_tensors, read_json


def _optimizer_to_flat(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    flat = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            flat[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat, sd["param_groups"]


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], param_groups: list) -> None:
    state: dict[int, dict] = {}
    for name, value in flat.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | dict,
                    meta: dict) -> None:
    """optimizer: the optimizer or its state_dict()."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
    flat, groups = _optimizer_to_flat(optimizer)
    save_file({k: v.contiguous().cpu() for k, v in flat.items()}, str(tmp / OPTIMIZER))
    (tmp / META).write_text(json.dumps({**meta, "optimizer_param_groups": groups}, indent=2))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer | None = None):
    """Returns (tensors, meta) of the last complete checkpoint in `folder` (or None if there is none) and
    restores the optimizer state into `optimizer`."""
    folder = Path(folder)
    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # crashed between the two renames
    meta = read_json(folder / META, fix=f"delete {folder} to start that stage again")
    if meta is None:
        return None
    tensors = load_tensors(folder / TENSORS)
    if optimizer is not None:
        _optimizer_from_flat(optimizer, load_tensors(folder / OPTIMIZER), meta.pop("optimizer_param_groups"))
    return tensors, meta
