"""Stage 2, LoRA: recover quality with low-rank adapters on q/k/v/o (peft), next-token cross-entropy.

Feature maps stay frozen by default. `init="pissa"` starts the adapters from the principal singular
directions of each weight (PiSSA), deterministically (full SVD), so a resumed run rebuilds the same split.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from ..errors import LinearizeError
from ..loading.architectures import architecture_of
from ..training import TrainResult, train

LORA_INITS = ("default", "pissa")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    init: str = "default"  # "default" (B = 0) or "pissa"
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_feature_maps: bool = False

    def __post_init__(self):
        if self.init not in LORA_INITS:
            raise LinearizeError(f"unknown --lora-init {self.init!r}; choose one of {LORA_INITS}")
        if self.rank < 1:
            raise LinearizeError(f"--lora-rank must be >= 1 (got {self.rank})")


def add_lora(model, settings: LoraSettings):
    """Wrap `model` (a LinearizedForCausalLM) with peft LoRA adapters; returns the PeftModel."""
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                        target_modules=list(settings.target_modules),
                        init_lora_weights=True if settings.init == "default" else "pissa")
    peft_model = get_peft_model(model, config)
    if settings.train_feature_maps:
        for name, p in peft_model.named_parameters():
            if "feature_map_" in name or "mix_logit" in name:
                p.requires_grad_(True)
    return peft_model


def _trainable_state(peft_model) -> dict[str, torch.Tensor]:
    state = dict(get_peft_model_state_dict(peft_model))
    state.update({n: p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n})
    return state


def _load_trainable_state(peft_model, tensors: dict[str, torch.Tensor]) -> None:
    set_peft_model_state_dict(peft_model, {k: v for k, v in tensors.items() if "lora_" in k})
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if "lora_" not in k:
                params[k].copy_(v)


def finetune_lora(
    model,
    sequences: torch.Tensor,
    settings: LoraSettings = LoraSettings(),
    lr: float = 1e-3,
    batch_size: int = 1,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    data_parallel=None,
    fsdp: bool = False,
    checkpoint_every_s: float = 120.0,
):
    """LoRA-finetune `model` on sequences (N, T); returns (merged plain model, TrainResult).
    data_parallel: a transfer.distributed.RankGroup; each rank then runs its shard of every batch (batch_size is
    the global batch) under torch DDP, or with fsdp=True sharded by FSDP (RankGroup.fsdp, one unit per decoder
    layer; every rank gets the whole merged model back). Only rank 0 writes checkpoints."""
    if fsdp and data_parallel is None:
        raise LinearizeError("fsdp=True shards over the ranks of data_parallel; pass data_parallel=init_distributed()")
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, settings)
    peft_model.train()
    forward, gather = peft_model, None
    if data_parallel is not None and fsdp:
        teacher = model.model  # the LinearizedForCausalLM's teacher skeleton
        gather = data_parallel.fsdp(peft_model, list(architecture_of(teacher.config).decoder_layers(teacher)))
    elif data_parallel is not None:
        forward = data_parallel.ddp(peft_model)
    device = next(peft_model.parameters()).device

    def step(batch):
        if data_parallel is not None:
            batch = data_parallel.shard(batch)
        batch = batch.to(device)
        loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        if data_parallel is not None:  # report the global mean, as one process would
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= data_parallel.world
        return {"loss": loss.item()}

    params = [p for p in peft_model.parameters() if p.requires_grad]
    result: TrainResult = train("stage 2: LoRA", sequences, step, params,
                                state_fn=lambda: _trainable_state(peft_model),
                                restore_fn=lambda t: _load_trainable_state(peft_model, t),
                                lr=lr, batch_size=batch_size, checkpoint_dir=checkpoint_dir, progress=progress,
                                checkpoint_every_s=checkpoint_every_s,
                                write_checkpoints=data_parallel is None or data_parallel.rank == 0)
    if gather is not None:
        peft_model = gather()  # the whole trained model on every rank, unsharded, to merge as one process would
    merged = peft_model.merge_and_unload().eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged, result
