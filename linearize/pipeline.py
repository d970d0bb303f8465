"""`linearize convert`: load -> convert -> stage 1 (attention transfer) -> stage 2 (LoRA, or the attention alone)
-> sparse cache switched on (training-free) -> save, resumable.

The output folder holds the finished model (config.json, model.safetensors, tokenizer), `convert.json`
(settings, tokens, wall time, tokens/s and perplexities per stage), `curves.json` (loss histories for the
report) and `checkpoints/` (what --resume continues from).
"""

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import budget
from .checkpoint import load_checkpoint
from .data import pack_sequences
from .data.retrieval import mix_retrieval
from .device import placement, torch_dtype
from .errors import LinearizeError
from .evaluate.perplexity import perplexity
from .finetune.lora import LORA_TARGETS, LoraSettings, finetune_lora, has_adapters, stage2_name
from .layers.linear_attention import LinearAttentionConfig, attention_preset
from .loading.teacher import load_teacher
from .models.linearized import (LinearizedForCausalLM, linearized_layers, make_student_attention, set_memory_cap,
                                set_sparse_cache)
from .run_folder import CHECKPOINTS, CONVERT, CURVES, PROGRESS, load_tensors, read_json, save_model, write_json
from .transfer.attention_transfer import attention_transfer, layer_transfer_errors, load_transfer_state
from .transfer.distributed import distributed_transfer, init_distributed


# The sparse cache a conversion gets by default where its attention takes one. On the attention-only default run
# (runs/memonly, 25 minutes) it took the held-out ShareGPT ppl ratio from 1.184 to 1.122 and top-1 from 89.6 to
# 93.0 %, better than StreamingLLM 4 + 256 on every text (README, docs/results/default_cache64_eval.json)
DEFAULT_CACHE = 64
DEFAULT_CACHE_POSITION = "edge"
# The memory cap of a model with the sparse cache, set with the cache after training (training keeps the cap at its
# own length, where it never bites): with it and the sinks at the window's edge the default run finds the 8k passkey
# in 10 of 10 trials (7 with the cap at 764 and the sinks at their own positions; README, docs/results/recall.json);
# texts at 1k move by 0.3 % of ppl at most.
CACHE_MEMORY_CAP = 256
LAYER_ERROR_SEQUENCES = 2  # held-out rows for the per-layer transfer error that ranks layers for --keep-softmax


def memory_cap_for_training_length(config: LinearAttentionConfig, seq_len: int) -> int:
    """The default memory cap: the most keys the linear memory holds in a training row (seq_len - window - sinks),
    so training and every context up to seq_len are unchanged and longer ones never weigh the memory more than
    training did (at 4k tokens: Shakespeare 1.60x -> 1.26x the teacher's ppl, docs/results/memory_cap.md). 0 (none)
    where a cap does not apply: no exact part beside the memory, a gate or the delta rule (they bound it already),
    or the output normalisation (no shared normaliser)."""
    return max(seq_len - config.window - config.sinks, 1) if config.plain_memory_beside_exact else 0


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
    cache: int | None = None  # the sparse cache (exact keys per KV head; ops/sparse_cache.py), switched on in the
    # saved model after training (it has no parameters) unless train_with_cache; None: DEFAULT_CACHE where the
    # attention takes one (LinearAttentionConfig.takes_cache), else the preset's
    cache_position: str | None = None  # where the cache is scored (LinearAttentionConfig.cache_position; None:
    # DEFAULT_CACHE_POSITION where there is a cache, else the preset's)
    train_with_cache: bool = False  # stages 1 and 2 run with the sparse cache in place (slow on the CPU)
    mix_init: float | None = None  # override the initial mixing logit (LinearAttentionConfig.mix_init)
    heavy: int | None = None  # override the preset's heavy hitters (exact keys per KV head; ops/heavy_hitters.py)
    memory_cap: int | None = None  # cap the linear memory at this many keys (None: memory_cap_for_training_length)
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
                                  cache_position=self.cache_position)
        if self.cache is None and config.takes_cache and not config.cache:
            config = replace(config, cache=DEFAULT_CACHE)
        if self.cache_position is None and config.cache:
            config = replace(config, cache_position=DEFAULT_CACHE_POSITION)
        if self.memory_cap is None:
            cap = memory_cap_for_training_length(config, self.seq_len)
            config = replace(config, memory_cap=min(cap, CACHE_MEMORY_CAP) if cap and config.cache else cap)
        return config

    def training_attention_config(self):
        """The attention the stages train: the saved model's (attention_config) without its sparse cache and with the
        memory cap of the training length, both set after training (they have no parameters; like `linearize eval
        --cache --memory-cap`), unless train_with_cache."""
        config = self.attention_config()
        if self.train_with_cache:
            return config
        cap = memory_cap_for_training_length(config, self.seq_len) if self.memory_cap is None else config.memory_cap
        return replace(config, cache=0, memory_cap=cap)

    def check(self):
        attention = self.attention_config()
        if self.seq_len < max(attention.window, 2):
            raise LinearizeError(f"--seq-len {self.seq_len} is shorter than the attention window {attention.window}; "
                                 f"use --seq-len >= {max(attention.window, 2)} or a smaller --window")
        for name in ("transfer_tokens", "lora_tokens", "eval_tokens", "keep_softmax"):
            if getattr(self, name) < 0:
                raise LinearizeError(f"--{name.replace('_', '-')} must be >= 0")
        if self.eval_tokens < self.seq_len:
            raise LinearizeError(f"--eval-tokens {self.eval_tokens} is less than one sequence ({self.seq_len}); raise it")
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


# What a run made before a setting existed did: its progress.json lacks the key, --resume reads this value.
SETTINGS_BEFORE_THEY_EXISTED = {"lora_loss": "ce", "lora_targets": "attention"}


class RunState:
    """progress.json in the output folder (run_folder.py): settings plus the results of each finished step."""

    writer = True  # False on the ranks other than 0 of a distributed run: results stay in memory

    def __init__(self, out: Path, settings: ConvertSettings, resume: bool):
        self.path = out / PROGRESS
        if self.path.exists() and not resume:
            raise LinearizeError(f"{out} already holds a run; add --resume to continue it or choose another --out")
        attention = settings.attention_config().to_dict()  # what the preset meant when the run started
        if resume and self.path.exists():
            self.data = read_json(self.path, fix=f"delete it to start again, or choose another --out")
            # settings added later read as what older runs did (then: the defaults of that time)
            defaults = {**asdict(ConvertSettings()), **SETTINGS_BEFORE_THEY_EXISTED}
            # the resolved attention is compared below when the run recorded it: then the overrides may differ
            overrides = ("window", "sinks", "feature_map", "feature_dim", "cache", "mix_init", "memory_cap", "heavy",
                         "local_layers", "cache_position")
            overrides = overrides if "attention" in self.data else ()
            recorded_settings = {k: self.data["settings"].get(k, defaults[k]) for k in defaults}
            for both in (recorded_settings, now := asdict(settings)):  # None (the default) and its value agree
                both["lora_train_attention"] = resolve_train_attention(both["lora_targets"],
                                                                       both["lora_train_attention"])
            changed = [k for k, v in now.items() if k not in overrides and recorded_settings[k] != v]
            recorded = {**asdict(LinearAttentionConfig()), **self.data.get("attention", attention)}  # fields added
            if settings.memory_cap is None:  # the default cap, whatever it was when the run started (or before there
                recorded["memory_cap"] = attention["memory_cap"]  # was one), trains the same: no change there
            # set after training, so a default that changed since (or a run from before the setting) trains the
            # same: such a run resumes and is saved with today's
            for key in () if settings.train_with_cache else ("cache", "cache_position"):
                if getattr(settings, key) is None or key not in self.data.get("attention", attention):
                    recorded[key] = attention[key]
            if recorded != attention:  # later read as their defaults: what the run did
                changed.append(f"--attention {settings.attention} now means {attention}, the run has "
                               f"{self.data['attention']}")
            if changed:
                raise LinearizeError(f"--resume with different settings ({', '.join(changed)}); "
                                     "use the original ones or a new --out")
        else:  # written by the first record(), once the inputs have loaded: a failed start leaves no run behind
            self.data = {"settings": asdict(settings), "attention": attention, "results": {}}

    @property
    def results(self) -> dict:
        return self.data["results"]

    def record(self, **results):
        self.results.update(results)
        self.save()

    def once(self, key: str, compute):
        """results[key]: computed by compute() and recorded the first time; a resumed run reads it back."""
        if key not in self.results:
            self.record(**{key: compute()})
        return self.results[key]

    def save(self):
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.data, self.path)


def _stage_summary(result, seconds: float) -> dict:
    return {"tokens": result.tokens, "steps": result.steps, "seconds": round(seconds, 1),
            "tokens_per_s": round(result.tokens / seconds, 1) if seconds else None}


def choose_softmax_layers(layer_mse: list[float], students, k: int, layers: list[int] = ()) -> list[int]:
    """The k linearized layers with the largest transfer error (LoLCATs' per-layer MSE), sorted by index; or
    `layers` as given, once checked to be linearized layers."""
    candidates = linearized_layers(students)
    if layers:
        if wrong := sorted(set(layers) - set(candidates)):
            raise LinearizeError(f"--softmax-layers {wrong} are not linearized layers of this model; choose from "
                                 f"{candidates[0]}..{candidates[-1]} ({len(candidates)} layers)")
        return sorted(set(layers))
    if k > len(candidates):
        raise LinearizeError(f"--keep-softmax {k} exceeds the {len(candidates)} linearized layers; use at most "
                             f"{len(candidates)}")
    return sorted(sorted(candidates, key=lambda i: -layer_mse[i])[:k])


@contextmanager
def process_group(distributed: str | None, device: torch.device):
    """The torch.distributed group of a `--distributed` run (None otherwise), closed when the run ends normally."""
    group = init_distributed(backend="nccl" if device.type == "cuda" else "gloo") if distributed else None
    yield group
    if group is not None:
        group.close()


@dataclass
class Conversion:
    """What the stages of one `linearize convert` share; the stages fill the fields below the line in order."""

    settings: ConvertSettings
    out: Path
    state: RunState
    group: object | None
    distributed: str | None
    progress: bool
    log: object
    started: float = field(default_factory=time.perf_counter)  # when the conversion began (--minutes counts from it)
    # ---
    teacher: object = None
    tokenizer: object = None
    heldout: torch.Tensor | None = None  # (N, T) held-out rows for perplexity
    train1: torch.Tensor | None = None  # stage 1 rows (N1, T), N1 = 0 when stage 1 does not run
    train2: torch.Tensor | None = None  # stage 2 rows, None when stage 2 does not run
    students: list | None = None
    model: object = None

    @property
    def results(self) -> dict:
        return self.state.results


def load_inputs(c: Conversion):
    """The teacher on its device, and the held-out and training rows (stage 1 and 2 read disjoint rows)."""
    s = c.settings
    device, dtype = s.placement(distributed=bool(c.distributed))
    c.log(f"loading teacher {s.model or '(bundled SmolLM2-135M-Instruct)'} on {device}, {dtype}")
    c.teacher, c.tokenizer = load_teacher(s.model, dtype=dtype)
    c.teacher.to(device)
    trainable = s.attention_config().linear  # no linear part (--attention streaming): nothing to train
    if not trainable:
        c.log(f"--attention {s.attention} has no linear part: nothing to train, both stages are skipped")
    pack = dict(source=s.data, tokenizer=c.tokenizer, seq_len=s.seq_len, progress=c.progress)
    c.heldout = pack_sequences(num_sequences=s.eval_tokens // s.seq_len, split="heldout", **pack)
    stage1 = trainable and not (s.skip_transfer or s.transfer_state)
    if s.minutes and trainable:
        plan = c.state.once("plan", lambda: plan_budget(c, stage1))
        s.transfer_tokens, s.lora_tokens = plan["transfer_tokens"], plan["lora_tokens"]
        c.log(f"--minutes {s.minutes:g}: stage 1 on {s.transfer_tokens} tokens, stage 2 on {s.lora_tokens} "
              f"(throughput probe: {plan['transfer_row_s']:.1f} s per stage-1 row, ~{plan['lora_row_s']:.1f} s per "
              "stage-2 row)")
    n1 = s.transfer_tokens // s.seq_len if stage1 else 0
    n2 = s.lora_tokens // s.seq_len if trainable else 0
    c.train1 = pack_sequences(num_sequences=n1, **pack) if n1 else torch.empty(0, s.seq_len, dtype=torch.long)
    if s.retrieval_fraction:  # the held-out rows stay as they are
        c.train1 = mix_retrieval(c.train1, c.tokenizer, s.retrieval_fraction, tag=f"{s.seed}-stage1")
        c.log(f"look-up exercises: {s.retrieval_fraction:.0%} of the training rows (data/retrieval.py)")
    c.train2 = stage2_rows(c, n2) if n2 else None
    ppl = c.state.once("teacher_ppl", lambda: perplexity(c.teacher, c.heldout, desc="teacher perplexity",
                                                         progress=c.progress))
    c.log(f"teacher held-out perplexity: {ppl:.3f}")


def stage2_rows(c: Conversion, n: int) -> torch.Tensor:
    """Stage 2's first n training rows (N, T): the rows after stage 1's, with look-up exercises mixed in as asked."""
    s = c.settings
    rows = pack_sequences(s.data, c.tokenizer, s.seq_len, num_sequences=n, skip_sequences=len(c.train1),
                          progress=c.progress)
    if s.retrieval_fraction:
        rows = mix_retrieval(rows, c.tokenizer, s.retrieval_fraction, tag=f"{s.seed}-stage2")
    return rows


def plan_budget(c: Conversion, stage1: bool) -> dict:
    """The token counts of both stages for --minutes, from a throughput probe on the first held-out row; without a
    stage 1 to run (stage1 False: --skip-transfer or --transfer-state) all the training time goes to stage 2."""
    s = c.settings
    teacher_s, transfer_s = budget.probe(c.teacher, c.heldout[0], s.training_attention_config())
    share = budget.TRANSFER_SHARE if s.transfer_share is None else s.transfer_share
    plan = budget.plan(s.minutes, time.perf_counter() - c.started, teacher_s, transfer_s, len(c.heldout),
                       s.seq_len, kl="kl" in s.lora_loss, transfer_share=share if stage1 else 0.0)
    return plan.to_dict()


def replan_stage2(c: Conversion) -> dict:
    """--minutes: the plan priced a stage-2 step from the stage-1 probe (budget.LORA_STEP_IN_TRANSFER_STEPS), which
    can be far off on another model (Gemma 3 270M: twice the price). Time a real stage-2 step (the second of two,
    on a copy of the model: nothing is trained) and give stage 2 the seconds the plan gave it, less the probe's."""
    s, plan = c.settings, c.results["plan"]
    t0 = time.perf_counter()
    row_s = budget.time_lora_step(c.model, c.train2[:2], s.lora_settings(), s.lora_lr)
    seconds = plan["lora_tokens"] // s.seq_len * plan["lora_row_s"] - (time.perf_counter() - t0)
    rows = max(1, math.floor(seconds / row_s))
    return {"lora_row_s": round(row_s, 4), "lora_tokens": rows * s.seq_len}


def transfer(c: Conversion):
    """Stage 1: attention transfer (or a stage-1 result loaded from --transfer-state or the checkpoint)."""
    s = c.settings
    c.students = make_student_attention(c.teacher, s.training_attention_config())
    if s.transfer_state:
        try:
            load_transfer_state(c.students, load_tensors(s.transfer_state))
        except KeyError as e:
            raise LinearizeError(f"--transfer-state {s.transfer_state} does not fit these attention settings "
                                 f"({e}); use the --attention/--window/--feature-map of `linearize blocks train`")
    if not len(c.train1):
        return
    ckpt = c.out / CHECKPOINTS / "transfer"
    if "transfer" in c.results:  # finished earlier: its final checkpoint holds the result
        load_transfer_state(c.students, load_checkpoint(ckpt)[0])
        return
    t0 = time.perf_counter()
    kw = dict(lr=s.transfer_lr, checkpoint_dir=ckpt, progress=c.progress)
    mode = "data" if c.distributed == "fsdp" else c.distributed  # FSDP is for stage 2 only
    r1 = (attention_transfer(c.teacher, c.students, c.train1, **kw) if c.group is None else
          distributed_transfer(c.teacher, c.students, c.train1, c.group, mode,
                               batch_size=c.group.world if mode == "data" else 1, **kw))
    errors = layer_transfer_errors(c.teacher, c.students, c.heldout[:LAYER_ERROR_SEQUENCES])
    c.state.record(transfer=_stage_summary(r1, time.perf_counter() - t0), layer_mse=errors,
                   transfer_history=r1.history)


def assemble(c: Conversion):
    """The student model: the teacher with the trained attention, exact softmax kept where asked."""
    s = c.settings
    if s.keep_softmax or s.softmax_layers:
        c.state.once("layer_mse", lambda: layer_transfer_errors(c.teacher, c.students,  # no stage 1 ran here
                                                                c.heldout[:LAYER_ERROR_SEQUENCES]))
        kept = c.state.once("keep_softmax", lambda: choose_softmax_layers(c.results["layer_mse"], c.students,
                                                                          s.keep_softmax, s.softmax_layers))
        c.log(f"exact softmax attention kept in layers {kept} "
              f"({'as given' if s.softmax_layers else 'largest transfer error'})")
    c.model = LinearizedForCausalLM.from_teacher(c.teacher, s.training_attention_config(), c.students,
                                                 keep_softmax=c.results.get("keep_softmax", []))
    ppl = c.state.once("stage1_ppl", lambda: perplexity(c.model, c.heldout, desc="student perplexity (stage 1)",
                                                        progress=c.progress))
    c.log(f"student held-out perplexity after {'stage 1' if len(c.train1) else 'conversion (no transfer)'}: "
          f"{ppl:.3f}")


def finetune(c: Conversion):
    """Stage 2: LoRA (resumes from its checkpoint; a finished one only rebuilds the merged model)."""
    if c.train2 is None or not len(c.train2):
        return
    s = c.settings
    if s.minutes:
        replan = c.state.once("stage2_plan", lambda: replan_stage2(c))
        if replan["lora_tokens"] != s.lora_tokens:
            c.log(f"--minutes {s.minutes:g}: a real stage-2 step took {replan['lora_row_s']:.1f} s (planned "
                  f"{c.results['plan']['lora_row_s']:.1f} s): stage 2 on {replan['lora_tokens']} tokens")
            s.lora_tokens = replan["lora_tokens"]
            c.train2 = stage2_rows(c, s.lora_tokens // s.seq_len)
    t0 = time.perf_counter()
    c.model, r2 = finetune_lora(c.model, c.train2, s.lora_settings(), lr=s.lora_lr,
                                checkpoint_dir=c.out / CHECKPOINTS / "lora", progress=c.progress,
                                batch_size=c.group.world if c.group else 1, data_parallel=c.group,
                                fsdp=c.distributed == "fsdp")
    if "lora" not in c.results:
        summary = _stage_summary(r2, time.perf_counter() - t0)
        if teacher_s := sum(h.get("teacher_s", 0.0) for h in r2.history):  # the teacher view's forward passes
            summary["teacher_forward_tokens_per_s"] = round(r2.history[-1]["tokens"] / teacher_s, 1)
        c.state.record(lora=summary, lora_history=r2.history)
    c.state.record(stage2_ppl=perplexity(c.model, c.heldout, desc="student perplexity (stage 2)",
                                         progress=c.progress))
    c.log(f"student held-out perplexity after stage 2: {c.results['stage2_ppl']:.3f}")


def switch_on_cache(c: Conversion):
    """The saved model's sparse cache and memory cap: trained without them (unless --train-with-cache), they are set
    now (no parameters, as `linearize eval --cache --memory-cap` does), and the held-out perplexity of the model as
    saved measured."""
    attention = c.settings.attention_config()
    cache = attention.cache
    if not cache or c.model.config.attention.get("cache", 0) == cache:
        return
    set_sparse_cache(c.model, cache)
    set_memory_cap(c.model, attention.memory_cap)
    ppl = c.state.once("saved_ppl", lambda: perplexity(c.model, c.heldout, desc="student perplexity (+ cache)",
                                                       progress=c.progress))
    capped = f", the memory capped at {attention.memory_cap} keys" if attention.memory_cap else ""
    c.log(f"sparse cache of {cache} keys per KV head switched on{capped} (training-free): held-out perplexity "
          f"{ppl:.3f}")


STAGES = (load_inputs, transfer, assemble, finetune, switch_on_cache)


def stage_rows(results: dict, settings: dict) -> list[tuple]:
    """(step, tokens, seconds, tokens/s, held-out ppl) for the summary tables of a conversion (None: not run);
    settings: ConvertSettings as a dict (convert.json's "settings")."""
    stage2 = stage2_name(has_adapters(settings.get("lora_targets", "attention")))
    rows = [("teacher", None, None, None, results.get("teacher_ppl"))]
    for name, key, ppl in (("stage 1: transfer", "transfer", "stage1_ppl"), (stage2, "lora", "stage2_ppl")):
        s = results.get(key) or {}
        rows.append((name, s.get("tokens"), s.get("seconds"), s.get("tokens_per_s"), results.get(ppl)))
    if "saved_ppl" in results:
        rows.append(("saved: + sparse cache", None, None, None, results["saved_ppl"]))
    return rows


def convert(settings: ConvertSettings, out: str | Path, resume: bool = False, progress: bool = True, log=print,
            distributed: str | None = None) -> dict:
    """Run the whole conversion (STAGES, then save); returns the results dict (also in out/convert.json).
    distributed: "layers" | "data" | "fsdp" under torchrun (see transfer/distributed.py): every rank runs the
    pipeline, stage 1 splits layers or batches ("fsdp": batches), stage 2 runs one sequence per rank under DDP
    ("fsdp": sharded by FSDP), and rank 0 alone writes."""
    settings.check()
    if settings.minutes and distributed:
        raise LinearizeError("--minutes plans one process's run (each rank would time itself differently); give "
                             "--tokens and --lora-tokens to a --distributed run")
    out = Path(out)
    device, _ = settings.placement(distributed=bool(distributed))
    with process_group(distributed, device) as group:
        state = RunState(out, settings, resume)
        if group is not None:
            state.writer = group.rank == 0
            group.barrier()  # every rank has read progress.json before rank 0 first writes it
            if group.rank:
                log, progress = (lambda *a, **k: None), False
        if state.results.get("done"):
            log(f"{out} is already finished")
            return state.results
        torch.manual_seed(settings.seed)
        c = Conversion(settings, out, state, group, distributed, progress, log)
        for stage in STAGES:
            stage(c)
        res = state.results
        if state.writer:
            save_model(c.model, c.tokenizer, out)
            write_json({"transfer": res.get("transfer_history", []), "lora": res.get("lora_history", []),
                        "layer_mse": res.get("layer_mse", [])}, out / CURVES)
        state.record(done=True, total_seconds=round(time.perf_counter() - c.started, 1),
                     heldout_tokens=int(c.heldout.numel()))
        if state.writer:
            write_json({"settings": asdict(settings),
                        **{k: v for k, v in res.items() if not k.endswith("_history")}}, out / CONVERT)
    return res
