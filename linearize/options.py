"""What every sub-command shares: argparse types, the --device / --dtype options, and how a number prints in
a table (terminal, markdown or HTML)."""

from argparse import ArgumentTypeError

from .device import DTYPE_NAMES
from .layers.linear_attention import CACHE_POSITIONS


def comma_ints(text: str) -> list[int]:
    """'3,7,11' -> [3, 7, 11] (layer numbers, --keep-softmax values)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def token_count(text: str) -> int:
    """"4096" or "4k" -> 4096."""
    try:
        return int(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a token count like 512, 4k or 4096, got {text!r}") from None


def token_counts(text: str) -> tuple[int, ...]:
    """"512,1k,2048" -> (512, 1024, 2048)."""
    return tuple(token_count(t) for t in text.split(",") if t)


def mmlu_limit(text: str) -> int | None:
    """MMLU questions per subject: "5" -> 5, "all" -> None."""
    if text == "all":
        return None
    if not text.isdigit():
        raise ArgumentTypeError(f"--limit takes a number of questions per subject or 'all', got {text!r}")
    return int(text)


def add_dtype(p, what: str, default: str = "auto"):
    """--dtype with the same words in every command (device.placement reads them)."""
    p.add_argument("--dtype", default=default, help=f"{what}: auto (bfloat16 on CUDA, float32 on CPU) | "
                                                    f"{' | '.join(DTYPE_NAMES)} (default: {default})")


def add_placement(p, what: str, dtype: str = "auto"):
    """--device (default auto in every command) and --dtype."""
    p.add_argument("--device", default="auto", help=f"{what}: auto (CUDA when present) | cpu | cuda | cuda:N "
                                                    "(default: auto)")
    add_dtype(p, what, dtype)


def add_sparse_cache(p):
    """--cache M and --cache-every N: the student with a sparse cache (ops/sparse_cache.py), without training."""
    p.add_argument("--cache", type=int, metavar="M",
                   help="the student with a sparse cache of M exact keys per KV head (training-free; 0: none; "
                        "default: as converted)")
    p.add_argument("--cache-every", type=int, metavar="N",
                   help="re-select the sparse cache every N tokens: the state holds up to M + N - 1 cached keys per "
                        "KV head (training-free; default: as converted, 64)")


def add_training_free(p):
    """Every training-free setting of the student: --cache, --cache-every, --cache-position, --memory-cap, --heavy."""
    add_sparse_cache(p)
    add_cache_position(p)
    add_memory_cap(p)
    add_heavy_hitters(p)


def training_free(args) -> dict:
    """The student's training-free settings given in `args` (parsed flags or settings; the names of TRAINING_FREE
    that it has and that are not None), for run_folder.load_student / models.linearized.set_training_free."""
    from .models.linearized import TRAINING_FREE

    return {name: getattr(args, name) for name in TRAINING_FREE if getattr(args, name, None) is not None}


def add_cache_position(p):
    """--cache-position own|edge|packed: where the student's sparse cache is scored
    (LinearAttentionConfig.cache_position)."""
    p.add_argument("--cache-position", choices=CACHE_POSITIONS,
                   help="score the sparse cache's keys at their own positions (own), as if each sat just beyond the "
                        "window (edge), or in a row from there back in their order (packed): far keys read like near "
                        "ones (training-free; default: as converted)")


def add_heavy_hitters(p):
    """--heavy M: the student keeps the keys that drew the most window attention exact (ops/heavy_hitters.py)."""
    p.add_argument("--heavy", type=int, metavar="M",
                   help="the student keeps the M keys per KV head that drew the most window attention in exact "
                        "softmax once they leave the window (training-free; 0: none; default: as converted)")


def add_memory_cap(p):
    """--memory-cap C: the student's linear memory capped at C keys (hybrid_attention.py), without training."""
    p.add_argument("--memory-cap", type=int, metavar="C",
                   help="the student's linear memory weighs at most C keys: beyond, it is scaled by C / n, so longer "
                        "contexts do not drown the window, sinks and cache (training-free; 0: none; default: as "
                        "converted)")


def fmt(value, spec: str) -> str:
    """format(value, spec), or "-" for a missing value."""
    return "-" if value is None else format(value, spec)
