"""The student's training-free settings: what changes a converted model's attention without training (they have
no parameters): the heavy hitters, the sparse cache (its size, how often it is re-selected, where its keys are
scored) and the memory cap. One TrainingFree holds them; add_arguments declares their flags once, for `linearize
convert` (with its own defaults, CONVERT_DEFAULT), `compare` (--heavy), `eval`, `bench` and bench's measuring
process (bench/measure.py); apply() sets them on a model.

    TrainingFree(cache=64, cache_position="edge").apply(model)   # in place; the model's config records them
"""

from dataclasses import asdict, dataclass, fields, replace

from .errors import LinearizeError
from .layers.linear_attention import CACHE_POSITIONS, LinearAttentionConfig
from .ops.hybrid.spec import CACHE_SCORES


@dataclass(frozen=True)
class TrainingFree:
    """None: as the model is (as converted; in `linearize convert`: CONVERT_DEFAULT, else the preset's). The fields
    are in the one order apply() sets them in: the heavy hitters before the cache (the two exclude each other)."""

    heavy: int | None = None  # keep the keys per KV head that drew the most window attention exact once they leave
    # the window (ops/heavy_hitters/; 0: none)
    cache: int | None = None  # sparse cache: the keys per KV head the linear memory recalls worst, kept exact
    # (ops/sparse_cache/; 0: none)
    cache_every: int | None = None  # re-select the cache every this many tokens (a state holds up to
    # cache + cache_every - 1 cached keys per KV head)
    memory_cap: int | None = None  # the linear memory weighs at most this many keys (0: none)
    cache_position: str | None = None  # where the cached keys are scored: "own" | "edge" | "packed"
    # (LinearAttentionConfig.cache_position)
    cache_score: str | None = None  # how the cache ranks its keys: "recall" (the memory's self-recall error) |
    # "learned" (the model's fitted score: transfer/cache_score.py; a model without one is refused)

    @classmethod
    def from_args(cls, args) -> "TrainingFree":
        """The settings of parsed flags (add_arguments) or of any settings object with attributes of these names
        (those it lacks: None)."""
        return cls(**{f.name: getattr(args, f.name, None) for f in fields(cls)})

    def given(self) -> dict:
        """The settings that are not None, in apply() order."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def flags(self) -> list[str]:
        """The command-line flags that give these settings (add_arguments reads them back)."""
        return [arg for k, v in self.given().items() for arg in (f"--{k.replace('_', '-')}", str(v))]

    def apply(self, model):
        """Set the settings that are not None on every layer of `model` (a LinearizedForCausalLM) with a linear
        memory, in field order; each change is validated (e.g. the cache needs the sum rule without a gate) and
        recorded in the model's config. Returns the model."""
        from .models.linearized import memory_layers, reconfigure

        if self.heavy is not None:
            reconfigure(model, heavy=self.heavy)
        if self.cache is not None or self.cache_every is not None:
            attention = model.config.attention
            size = attention.get("cache", 0) if self.cache is None else self.cache
            if size and any(m.mix_logit is None for m in memory_layers(model)):
                raise LinearizeError("this model's linear layers have no softmax window or sinks to mix the cache "
                                     "with; convert with --window or --sinks to use --cache")
            reconfigure(model, cache=size, cache_every=self.cache_every or attention.get("cache_every", 64),
                        cache_pool=attention.get("cache_pool", LinearAttentionConfig.cache_pool))
        if self.memory_cap is not None:
            reconfigure(model, memory_cap=self.memory_cap)
        if self.cache_position is not None:
            reconfigure(model, cache_position=self.cache_position)
        if self.cache_score is not None:
            reconfigure(model, cache_score=self.cache_score)
        return model


# What `linearize convert` gives a model where its flags leave a setting open (with_convert_defaults). The cache and
# the memory cap are set after training (training runs without the cache and with the cap of its own length, where
# it never bites), unless --train-with-cache:
# - cache: 64 keys, where the attention takes one (LinearAttentionConfig.takes_cache; else the preset's). On the
#   attention-only default run (runs/memonly, 25 minutes) it took the held-out ShareGPT ppl ratio from 1.184 to 1.122
#   and top-1 from 89.6 to 93.0 %, better than StreamingLLM 4 + 256 on every text (README,
#   docs/results/default_cache64_eval.json)
# - cache_position: packed, where there is a cache (else the preset's): the cached keys read in a row from the window's
#   edge back, in their order, as if the text between them were cut out. With the learned score the default run
#   answers 11 of 20 multi-key questions (k = 4 at 4k; the teacher 12) where "edge" (every cached key at the edge,
#   their order lost) answers 7, most of its misses another needle's code (experiments/multikey_answers.py,
#   docs/results/multikey_answers*.json); real-text recall and texts in docs/recall.md
# - memory_cap: with a sparse cache 256 at most, else the training length's (memory_cap_for_training_length): with it
#   and the sinks at the window's edge the default run finds the 8k passkey in 10 of 10 trials (7 with the cap at
#   764 and the sinks at their own positions; README, docs/results/recall.json); texts at 1k move by 0.3 % of ppl
#   at most
# - cache_every: 64 where there is a cache: a state holds up to cache + cache_every - 1 cached keys. 96 kept and
#   re-selected every 32 tokens cost the same bytes with 96 keys chosen by the score instead of 64; on recall that won
#   one question of 20-30 in some columns, within noise, and in one bench run at 16k it decoded at 0.76x and
#   prefilled at 0.66x the speed of 64 / 64 (docs/recall.md, "96 keys re-selected every 32 tokens"): an option
# - heavy: the preset's (0 in every preset)
# - cache_score: learned, where the cache is scored at a distance (fitted after training: convert/stages.py
#   fit_cache_score, transfer/cache_score.py); real-text recall at 2k and 4k in docs/recall.md
CONVERT_DEFAULT = TrainingFree(cache=64, cache_every=64, cache_position="packed", memory_cap=256, cache_score="learned")

# the help's "default:" of each flag in `linearize convert`
CONVERT_HELP = {
    "cache": f"{CONVERT_DEFAULT.cache} where the attention takes one, else 0; switched on in the saved model after "
             "training",
    "cache_every": f"{CONVERT_DEFAULT.cache_every} where there is a cache",
    "cache_position": f"{CONVERT_DEFAULT.cache_position} where there is a cache",
    "memory_cap": "seq-len - window - sinks, what it holds in training: no change up to seq-len; with a sparse cache "
                  f"the saved model's is then {CONVERT_DEFAULT.memory_cap} at most",
    "heavy": "--attention's preset: 0",
    "cache_score": f"{CONVERT_DEFAULT.cache_score} where the cache is at the edge or packed (fitted after training), "
                   "else recall",
}
# the help's "default:" of each flag where it changes a converted model (`linearize eval`, `bench`)
AS_CONVERTED = {"cache_every": f"as converted; convert saves {CONVERT_DEFAULT.cache_every}"}


def memory_cap_for_training_length(config: LinearAttentionConfig, seq_len: int) -> int:
    """The default memory cap: the most keys the linear memory holds in a training row (seq_len - window - sinks),
    so training and every context up to seq_len are unchanged and longer ones never weigh the memory more than
    training did (at 4k tokens: Shakespeare 1.60x -> 1.26x the teacher's ppl, docs/results/memory_cap.md). 0 (none)
    where a cap does not apply: no exact part beside the memory, a gate or the delta rule (they bound it already),
    or the output normalisation (no shared normaliser)."""
    return max(seq_len - config.window - config.sinks, 1) if config.plain_memory_beside_exact else 0


def with_convert_defaults(config: LinearAttentionConfig, given: TrainingFree, seq_len: int) -> LinearAttentionConfig:
    """The attention `linearize convert` saves: `config` (the preset with the flags applied) with CONVERT_DEFAULT
    where `given` (the flags) leaves the cache, how often it is re-selected, its position or the memory cap open."""
    if given.cache is None and config.takes_cache and not config.cache:
        config = replace(config, cache=CONVERT_DEFAULT.cache)
    if given.cache_every is None and config.cache:
        config = replace(config, cache_every=CONVERT_DEFAULT.cache_every)
    if given.cache_position is None and config.cache:
        config = replace(config, cache_position=CONVERT_DEFAULT.cache_position)
    if given.memory_cap is None:
        cap = memory_cap_for_training_length(config, seq_len)
        config = replace(config, memory_cap=min(cap, CONVERT_DEFAULT.memory_cap) if cap and config.cache else cap)
    return config


def add_arguments(p, names: tuple[str, ...] = tuple(f.name for f in fields(TrainingFree)),
                  defaults: dict[str, str] = AS_CONVERTED, default: str = "as converted"):
    """The flags of the settings `names` on parser p: --heavy, --cache, --cache-every, --memory-cap,
    --cache-position, --cache-score (TrainingFree.from_args reads them; None where not given). The help gives each one's default
    as defaults[name], else `default`."""
    d = {name: defaults.get(name, default) for name in names}
    if "cache" in names:
        p.add_argument("--cache", type=int, metavar="M",
                       help="sparse cache: the M keys per KV head that the linear memory recalls worst stay in exact "
                            f"softmax (LoLA; training-free: it has no parameters; 0: none; default: {d['cache']})")
    if "cache_every" in names:
        p.add_argument("--cache-every", type=int, metavar="N",
                       help="re-select the sparse cache every N tokens: the state holds up to M + N - 1 cached keys "
                            f"per KV head (training-free; default: {d['cache_every']})")
    if "cache_position" in names:
        p.add_argument("--cache-position", choices=CACHE_POSITIONS,
                       help="score the sparse cache's keys at their own positions (own), as if each sat just beyond "
                            "the window (edge), or in a row from there back in their order (packed): far keys read "
                            f"like near ones (training-free; default: {d['cache_position']})")
    if "cache_score" in names:
        p.add_argument("--cache-score", choices=CACHE_SCORES,
                       help="how the sparse cache ranks its keys: by the memory's self-recall error (recall) or by the "
                            "score fitted to what far questions read (learned; `linearize cache-score RUN` fits one "
                            f"for an older run; default: {d['cache_score']})")
    if "memory_cap" in names:
        p.add_argument("--memory-cap", type=int, metavar="C",
                       help="the linear memory weighs at most C keys: beyond, it is scaled by C / n, so longer "
                            "contexts do not drown the window, sinks and cache (training-free; 0: none; default: "
                            f"{d['memory_cap']})")
    if "heavy" in names:
        p.add_argument("--heavy", type=int, metavar="M",
                       help="heavy hitters: of the keys that left the window, the M per KV head that drew the most "
                            "window attention stay in exact softmax instead of the linear memory (sinks that appear "
                            f"mid-text; training-free; 0: none; default: {d['heavy']})")
