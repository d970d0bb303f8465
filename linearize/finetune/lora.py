"""Stage 2, LoRA: recover quality with low-rank adapters (peft) on q/k/v/o (optionally the MLP too).

The loss: next-token cross-entropy ("ce"), distillation from the teacher's logits ("kl": KL(teacher || student)
over the whole vocabulary at a temperature), or their sum ("kl+ce"). The teacher's logits come from the same model
(teacher_view: adapters off, exact softmax in every linearized layer), so no second copy of the weights is held.
The student's own attention parameters (feature maps, mixing factors, delta-rule strengths) stay frozen unless
train_attention. With no target modules (LORA_TARGETS["none"]) there are no adapters: stage 2 trains those
attention parameters alone, end to end, and the teacher's projections stay as they are, so the exact part of every
layer (window + sinks) stays the teacher's own attention. `init="pissa"` starts the adapters from the principal
singular directions of each weight (PiSSA), deterministically (full SVD), so a resumed run rebuilds the same split.
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from ..errors import LinearizeError
from ..layers.linear_attention import LinearAttention
from ..loading.architectures import architecture_of
from ..training import TrainResult, train

LORA_INITS = ("default", "pissa")
LORA_LOSSES = ("ce", "kl", "kl+ce")
LORA_TARGETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "attention+mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "none": ()}  # no adapters: stage 2 trains the attention's own parameters (train_attention)


def has_adapters(lora_targets: str) -> bool:
    """Whether a --lora-targets name puts LoRA adapters on any module (an unknown name counts as adapters: the
    settings check refuses it with its own message)."""
    return bool(LORA_TARGETS.get(lora_targets, True))


def stage2_name(adapters: bool) -> str:
    """The name of stage 2 in tables and progress bars: with LoRA adapters, or the attention alone."""
    return "stage 2: LoRA" if adapters else "stage 2: attention only"


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    init: str = "default"  # "default" (B = 0) or "pissa"
    target_modules: tuple[str, ...] = LORA_TARGETS["attention"]
    train_attention: bool = False  # also train LinearAttention.TRANSFER_PARAMETERS (feature maps, mixing, beta)
    loss: str = "ce"  # "ce" | "kl" | "kl+ce" (`linearize convert` defaults to "kl": ConvertSettings.lora_loss)
    temperature: float = 1.0  # of the distillation loss

    @property
    def adapters(self) -> bool:
        return bool(self.target_modules)

    def __post_init__(self):
        if not self.adapters and not self.train_attention:
            raise LinearizeError("--lora-targets none with --no-lora-train-attention leaves nothing to train in stage "
                                 "2: drop --no-lora-train-attention (stage 2 then trains the feature maps and mixing "
                                 "factors alone), or give --lora-targets attention")
        if not self.adapters and self.init != "default":
            raise LinearizeError(f"--lora-init {self.init} initialises adapters, and --lora-targets none (the "
                                 "default) has none: add --lora-targets attention, or drop --lora-init")
        if self.init not in LORA_INITS:
            raise LinearizeError(f"unknown --lora-init {self.init!r}; choose one of {LORA_INITS}")
        if self.loss not in LORA_LOSSES:
            raise LinearizeError(f"unknown --lora-loss {self.loss!r}; choose one of {', '.join(LORA_LOSSES)}")
        if self.init == "pissa" and "kl" in self.loss:  # pissa moves the principal part of W into the adapters,
            # so "adapters off" is no longer the teacher (see teacher_view)
            raise LinearizeError("--lora-loss kl needs --lora-init default (with pissa, turning the adapters off does "
                                 "not give back the teacher)")
        if self.temperature <= 0:
            raise LinearizeError(f"--lora-temperature must be > 0 (got {self.temperature})")
        if self.rank < 1:
            raise LinearizeError(f"--lora-rank must be >= 1 (got {self.rank})")


def add_lora(model, settings: LoraSettings):
    """Wrap `model` (a LinearizedForCausalLM) with peft LoRA adapters; returns the PeftModel (`model` itself when
    settings name no target modules)."""
    peft_model = model
    if settings.adapters:
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                            target_modules=list(settings.target_modules),
                            init_lora_weights=True if settings.init == "default" else "pissa")
        peft_model = get_peft_model(model, config)
    if settings.train_attention:
        for m in peft_model.modules():
            if isinstance(m, LinearAttention):
                for p in m.trainable_transfer_parameters():
                    p.requires_grad_(True)
    return peft_model


@contextmanager
def teacher_view(peft_model):
    """Inside, the LoRA-wrapped student computes its teacher's logits: adapters off and exact causal softmax in
    every layer that approximates it (LinearAttention.approximates_teacher; the projections, norms and MLPs are the
    teacher's own, shared)."""
    attention = [m for m in peft_model.modules() if isinstance(m, LinearAttention)]
    with peft_model.disable_adapter() if isinstance(peft_model, PeftModel) else nullcontext():
        for m in attention:
            m.exact_softmax = True
        try:
            yield
        finally:
            for m in attention:
                m.exact_softmax = False


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between the softmaxes at `temperature`, times temperature**2
    (so the gradient scale does not depend on it). Logits (B, T, V)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _trainable_state(peft_model) -> dict[str, torch.Tensor]:
    state = dict(get_peft_model_state_dict(peft_model)) if isinstance(peft_model, PeftModel) else {}
    state.update({n: p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n})
    return state


def _load_trainable_state(peft_model, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(peft_model, PeftModel):
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

    losses = settings.loss.split("+")

    def step(batch):
        if data_parallel is not None:
            batch = data_parallel.shard(batch)
        batch = batch.to(device)
        metrics = {}
        if "kl" in losses:
            t0 = time.perf_counter()
            with torch.no_grad(), teacher_view(peft_model):
                teacher_logits = forward(input_ids=batch).logits
            metrics["teacher_s"] = time.perf_counter() - t0
        out = forward(input_ids=batch, labels=batch if "ce" in losses else None)
        parts = {}
        if "kl" in losses:
            parts["kl"] = distillation_loss(out.logits, teacher_logits, settings.temperature)
        if "ce" in losses:
            parts["ce"] = out.loss
        loss = sum(parts.values())
        loss.backward()
        for name, value in {"loss": loss, **parts}.items():
            value = value.detach().clone()
            if data_parallel is not None:  # report the global mean, as one process would
                torch.distributed.all_reduce(value)
                value /= data_parallel.world
            metrics[name] = value.item()
        return metrics

    params = [p for p in peft_model.parameters() if p.requires_grad]
    result: TrainResult = train(stage2_name(settings.adapters), sequences, step, params,
                                state_fn=lambda: _trainable_state(peft_model),
                                restore_fn=lambda t: _load_trainable_state(peft_model, t),
                                lr=lr, batch_size=batch_size, checkpoint_dir=checkpoint_dir, progress=progress,
                                checkpoint_every_s=checkpoint_every_s,
                                write_checkpoints=data_parallel is None or data_parallel.rank == 0)
    if gather is not None:
        peft_model = gather()  # the whole trained model on every rank, unsharded, to merge as one process would
    merged = (peft_model.merge_and_unload() if isinstance(peft_model, PeftModel) else peft_model).eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged, result
