"""What every sub-command shares: argparse types, the --device / --dtype options, and how a number prints in
a table (terminal, markdown or HTML)."""

import math
from argparse import ArgumentTypeError

from .device import DTYPE_NAMES


def comma_ints(text: str) -> list[int]:
    """'3,7,11' -> [3, 7, 11] (layer numbers, --keep-softmax values)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (--max-new-tokens and other counts)."""
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: a finite number >= 0 (0 = greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a number >= 0 (0 = greedy), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text!r}")
    return value


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


def fmt(value, spec: str) -> str:
    """format(value, spec), or "-" for a missing value."""
    return "-" if value is None else format(value, spec)
