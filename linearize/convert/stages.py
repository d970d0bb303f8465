"""`linearize convert`: load -> convert -> stage 1 (attention transfer) -> stage 2 (LoRA, or the attention alone)
-> sparse cache switched on (training-free) -> save, resumable.

The output folder holds the finished model (config.json, model.safetensors, tokenizer), `convert.json`
(settings, tokens, wall time, tokens/s and perplexities per stage), `curves.json` (loss histories for the
report) and `checkpoints/` (what --resume continues from).
"""

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..data import pack_sequences
from ..data.retrieval import mix_retrieval
from ..errors import LinearizeError
from ..evaluate.perplexity import perplexity
from ..finetune.lora import finetune_lora, has_adapters, stage2_name
from ..loading.teacher import load_teacher
from ..models.linearized import LinearizedForCausalLM, layer_configs, linearized_layers, make_student_attention
from ..run_folder import CHECKPOINTS, CONVERT, CURVES, PROGRESS, load_tensors, save_model, write_json
from ..training_free import TrainingFree
from ..transfer.attention_transfer import attention_transfer, layer_transfer_errors, load_transfer_state
from ..transfer.cache_score import ROWS, SEQ_LEN, fit_on_lookups
from ..transfer.distributed import distributed_transfer, init_distributed
from ..transfer.window_dropout import WindowDropout
from . import budget
from .run_state import RunState, check_out_folder, start_over
from .settings import ConvertSettings

LAYER_ERROR_SEQUENCES = 2  # held-out rows for the per-layer transfer error that ranks layers for --keep-softmax


def _stage_summary(result, seconds: float) -> dict:
    """tokens: the whole stage's (a resumed stage counts the steps before the interrupt too); seconds and tokens/s:
    this process's."""
    return {"tokens": result.stage_tokens or result.tokens, "steps": result.steps, "seconds": round(seconds, 1),
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
    layers = layer_configs(c.teacher, s.training_attention_config())  # settings that do not fit the model fail
    if s.keep_softmax or s.softmax_layers:  # here, before anything is trained or written
        choose_softmax_layers([0.0] * len(layers), layers, s.keep_softmax, s.softmax_layers)
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
    # fitting the cache's score: ROWS forwards of SEQ_LEN tokens, each at least SEQ_LEN / seq_len training rows' worth
    after = ROWS * math.ceil(SEQ_LEN / s.seq_len) if s.saved_cache_score() == "learned" else 0
    plan = budget.plan(s.minutes, time.perf_counter() - c.started, teacher_s, transfer_s, len(c.heldout),
                       s.seq_len, kl="kl" in s.lora_loss, transfer_share=share if stage1 else 0.0, after_rows=after)
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
    kw = dict(lr=s.transfer_lr, checkpoint_dir=ckpt, progress=c.progress,
              window_dropout=WindowDropout(s.window_dropout, s.seed) if s.window_dropout else None)
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
    now (no parameters, as `linearize eval --cache --memory-cap` does); its learned score fitted (unless --cache-score
    recall; transfer/cache_score.py, again on --resume: the weights are saved with the model), and the held-out
    perplexity of the model as saved measured."""
    attention = c.settings.attention_config()
    cache = attention.cache
    if not cache:
        return
    trained_with_cache = c.model.config.attention.get("cache", 0) == cache
    if not trained_with_cache:
        TrainingFree(cache=cache, memory_cap=attention.memory_cap).apply(c.model)
    learned = c.settings.saved_cache_score() == "learned"
    fitted = ""
    if learned:
        c.state.record(cache_score=fit_on_lookups(c.model, c.tokenizer, c.settings.data, ROWS, SEQ_LEN,
                                                  c.settings.seed, progress=c.progress))
        fitted = f", ranked by a score fitted on {ROWS} look-up rows of {SEQ_LEN} tokens"
    if trained_with_cache and not learned:
        return  # trained with the cache in place: the model is saved as trained
    ppl = c.state.once("saved_ppl", lambda: perplexity(c.model, c.heldout, desc="student perplexity (+ cache)",
                                                       progress=c.progress))
    capped = f", the memory capped at {attention.memory_cap} keys" if attention.memory_cap else ""
    c.log(f"sparse cache of {cache} keys per KV head switched on{capped}{fitted}: held-out perplexity {ppl:.3f}")


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
            distributed: str | None = None, overwrite: bool = False) -> dict:
    """Run the whole conversion (STAGES, then save); returns the results dict (also in out/convert.json).
    distributed: "layers" | "data" | "fsdp" under torchrun (see transfer/distributed.py): every rank runs the
    pipeline, stage 1 splits layers or batches ("fsdp": batches), stage 2 runs one sequence per rank under DDP
    ("fsdp": sharded by FSDP), and rank 0 alone writes."""
    settings.check()
    if settings.minutes and distributed:
        raise LinearizeError("--minutes plans one process's run (each rank would time itself differently); give "
                             "--tokens and --lora-tokens to a --distributed run")
    out = Path(out)
    check_out_folder(out, settings.model, resume, overwrite)
    if resume and not (out / PROGRESS).exists():
        log(f"--resume: {out} holds no run to continue; starting a new one")
    device, _ = settings.placement(distributed=bool(distributed))
    with process_group(distributed, device) as group:
        if overwrite and not resume and (out / PROGRESS).exists() and (group is None or group.rank == 0):
            start_over(out)
        if group is not None:
            group.barrier()
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
