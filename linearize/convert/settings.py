"""`linearize convert`'s settings (ConvertSettings): every flag of the command, checked before anything loads, and the
attention they mean (the preset, the flags, and training_free.CONVERT_DEFAULT where they leave it open)."""

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..device import placement, torch_dtype
from ..errors import LinearizeError
from ..finetune.lora import LORA_TARGETS, LoraSettings, has_adapters
from ..layers.linear_attention import attention_preset
from ..training_free import CONVERT_DEFAULT, TrainingFree, memory_cap_for_training_length, with_convert_defaults


def resolve_train_attention(lora_targets: str, lora_train_attention: bool | None) -> bool:
    """ConvertSettings.lora_train_attention, None resolved: on exactly without adapters (lora_targets "none")."""
    if lora_train_attention is None:
        return not has_adapters(lora_targets)
    return lora_train_attention


@dataclass
class ConvertSettings:
    model: str | None = None  # None: bundled SmolLM2-135M-Instruct
    data: str | None = None  # None: bundled ShareGPT
    attention: str = "lolcats"
    window: int | None = None  # override the preset's window
    sinks: int | None = None  # override the preset's attention sinks
    feature_map: str | None = None  # override the preset's feature map
    feature_dim: int | None = None  # override the feature map's projection width (None: head_dim)
    # cache, cache_every, cache_position, heavy, memory_cap: the training-free settings (training_free.TrainingFree); None:
    # training_free.CONVERT_DEFAULT where it has one (with_convert_defaults), else the preset's
    cache: int | None = None  # the sparse cache (exact keys per KV head; ops/sparse_cache/), switched on in the
    # saved model after training (it has no parameters) unless train_with_cache
    cache_every: int | None = None  # re-select the cache every this many tokens (a state holds up to cache +
    # cache_every - 1 cached keys per KV head)
    cache_position: str | None = None  # where the cache is scored (LinearAttentionConfig.cache_position)
    cache_score: str | None = None  # how the cache ranks its keys: "recall" | "learned" (fitted after training;
    # None: learned where the cache is scored at a distance, else recall)
    train_with_cache: bool = False  # stages 1 and 2 run with the sparse cache in place (slow on the CPU)
    mix_init: float | None = None  # override the initial mixing logit (LinearAttentionConfig.mix_init)
    heavy: int | None = None  # override the preset's heavy hitters (exact keys per KV head; ops/heavy_hitters/)
    memory_cap: int | None = None  # cap the linear memory at this many keys
    local_layers: int | None = None  # override the preset's window-only first layers (LinearAttentionConfig)
    seq_len: int = 1024
    transfer_tokens: int = 65_536
    lora_tokens: int = 81_920
    eval_tokens: int = 24_576
    transfer_lr: float = 1e-2
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_init: str = "default"
    lora_loss: str = "kl"  # stage 2 loss: "kl" (distil the teacher's logits) | "ce" (next token) | "kl+ce"
    lora_temperature: float = 1.0
    # stage 2: "none" (no adapters: the feature maps and mixing factors trained end to end, the teacher's weights
    # untouched, so the window and sinks stay its exact attention) or LoRA on "attention" (q/k/v/o) / "attention+mlp".
    # "none" is the default: LoRA gave away top-1 agreement inside the window (README, position_agreement.json)
    lora_targets: str = "none"
    lora_train_attention: bool | None = None  # stage 2 also trains the feature maps and mixing factors (None:
    # exactly when there are no adapters, lora_targets "none", which leave nothing else to train)
    skip_transfer: bool = False
    transfer_state: str | None = None  # stage 1 done elsewhere (`linearize blocks stitch`): load it, skip stage 1
    keep_softmax: int = 0  # keep exact softmax in the K layers with the largest held-out transfer error
    softmax_layers: list[int] = field(default_factory=list)  # or keep it in exactly these layers
    window_dropout: float = 0.0  # stage 1: the probability at its first step that a layer trains without its window
    # (transfer/window_dropout.py), falling linearly to 0
    retrieval_fraction: float = 0.0  # share of stage 1 and 2 training rows made look-up exercises (data/retrieval.py)
    minutes: float | None = None  # a wall-clock budget: plan transfer_tokens and lora_tokens from it (budget.py)
    transfer_share: float | None = None  # stage 1's share of a --minutes budget (None: budget.TRANSFER_SHARE)
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when torch sees one, else CPU) | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # teacher precision: "auto" (bfloat16 on CUDA, float32 on CPU) | one of DTYPE_NAMES

    def attention_config(self):
        config = attention_preset(self.attention, window=self.window, sinks=self.sinks, feature_map=self.feature_map,
                                  feature_dim=self.feature_dim, cache=self.cache, mix_init=self.mix_init,
                                  memory_cap=self.memory_cap, heavy=self.heavy, local_layers=self.local_layers,
                                  cache_position=self.cache_position, cache_every=self.cache_every)
        return with_convert_defaults(config, self.training_free, self.seq_len)

    @property
    def training_free(self) -> TrainingFree:
        """The training-free settings given (--cache, --cache-every, --cache-position, --memory-cap, --heavy; None:
        open)."""
        return TrainingFree.from_args(self)

    def training_attention_config(self):
        """The attention the stages train: the saved model's (attention_config) without its sparse cache and with the
        memory cap of the training length, both set after training (they have no parameters; like `linearize eval
        --cache --memory-cap`), unless train_with_cache."""
        config = self.attention_config()
        if self.train_with_cache:
            return config
        cap = memory_cap_for_training_length(config, self.seq_len) if self.memory_cap is None else config.memory_cap
        return replace(config, cache=0, memory_cap=cap)

    def saved_cache_score(self) -> str:
        """How the saved model's cache ranks its keys: --cache-score, else CONVERT_DEFAULT's where the cache is
        scored at a distance (a learned score reads keys with their RoPE undone), else "recall"."""
        if self.cache_score is not None:
            return self.cache_score
        return CONVERT_DEFAULT.cache_score if self.attention_config().cache_distance is not None else "recall"

    def check(self):
        attention = self.attention_config()
        if self.cache_score == "learned" and attention.cache_distance is None:
            raise LinearizeError("--cache-score learned needs a sparse cache scored at a distance: keep --cache-position "
                                 "packed (the default) or edge and a --cache above 0, or use --cache-score recall")
        if self.transfer_state and not Path(self.transfer_state).is_file():
            raise LinearizeError(f"--transfer-state {self.transfer_state} not found; give the .safetensors that "
                                 "`linearize blocks stitch` wrote")
        if self.seq_len < 2:
            raise LinearizeError(f"--seq-len {self.seq_len} is too short; use --seq-len >= 2")
        if attention.linear and attention.window and self.seq_len <= attention.window:
            raise LinearizeError(f"--seq-len {self.seq_len} leaves the linear memory nothing to learn: a key enters it "
                                 f"only once it leaves the {attention.window}-token window; use --seq-len >= "
                                 f"{2 * attention.window} or a smaller --window")
        if not attention.linear and self.seq_len < attention.window:
            raise LinearizeError(f"--seq-len {self.seq_len} is shorter than the attention window {attention.window}; "
                                 f"use --seq-len >= {attention.window} or a smaller --window")
        for name in ("transfer_tokens", "lora_tokens", "eval_tokens", "keep_softmax"):
            if getattr(self, name) < 0:
                raise LinearizeError(f"--{name.replace('_', '-')} must be >= 0")
        if self.eval_tokens < self.seq_len:
            raise LinearizeError(f"--eval-tokens {self.eval_tokens} is less than one sequence ({self.seq_len}); raise it")
        if not 0 <= self.window_dropout <= 1:
            raise LinearizeError(f"--window-dropout must be between 0 and 1 (got {self.window_dropout})")
        if self.window_dropout and not (attention.linear and attention.window and attention.window > 1):
            raise LinearizeError("--window-dropout trains the linear memory without the softmax window, so it needs "
                                 "both (a linear attention with --window > 1); drop --window-dropout")
        if not 0 <= self.retrieval_fraction <= 1:
            raise LinearizeError(f"--retrieval-fraction must be between 0 and 1 (got {self.retrieval_fraction})")
        if self.keep_softmax and self.softmax_layers:
            raise LinearizeError("give --keep-softmax K or --softmax-layers L1,L2,..., not both")
        if self.minutes is not None and self.minutes <= 0:
            raise LinearizeError(f"--minutes must be > 0 (got {self.minutes})")
        if self.transfer_share is not None:
            if self.minutes is None:
                raise LinearizeError("--transfer-share divides a --minutes budget between the stages; without "
                                     "--minutes give the token counts themselves (--tokens, --lora-tokens)")
            if not 0 < self.transfer_share < 1:
                raise LinearizeError(f"--transfer-share must be between 0 and 1, both excluded (got "
                                     f"{self.transfer_share}); --skip-transfer gives stage 2 the whole budget")
        if self.dtype != "auto":
            torch_dtype(self.dtype)  # a clear error for a name --dtype does not know
        self.lora_settings()

    def lora_settings(self) -> LoraSettings:
        if self.lora_targets not in LORA_TARGETS:
            raise LinearizeError(f"unknown --lora-targets {self.lora_targets!r}; choose one of {', '.join(LORA_TARGETS)}")
        return LoraSettings(rank=self.lora_rank, init=self.lora_init, loss=self.lora_loss,
                            temperature=self.lora_temperature, target_modules=LORA_TARGETS[self.lora_targets],
                            train_attention=self.train_attention)

    @property
    def train_attention(self) -> bool:
        """Whether stage 2 trains the feature maps and mixing factors (lora_train_attention resolved)."""
        return resolve_train_attention(self.lora_targets, self.lora_train_attention)

    def placement(self, distributed: bool = False) -> tuple[torch.device, torch.dtype]:
        """Where the teacher runs and in what precision (device.placement): a GPU in bfloat16 when torch sees one
        (pure linear attention then runs on the flash-linear-attention kernels), else the CPU in float32.
        Trained parameters (feature maps, LoRA) stay float32."""
        return placement(self.device, self.dtype, distributed)
