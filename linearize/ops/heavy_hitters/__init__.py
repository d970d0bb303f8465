"""Heavy hitters: the keys that drew the most softmax-window attention stay exact after they leave the window.

Attention sinks are not only the first tokens. In SmolLM2-135M's layers 3-10 about 40 % of every query's attention
falls on keys older than a 256-token window, and about 90 % of that on a handful of keys (a space, a " the"):
sinks that appear mid-text (experiments/far_attention.py, docs/results/far_attention.md). A linear memory blurs them
into an average; StreamingLLM's window loses them. With `heavy = M`, the M such keys per KV head stay in exact
softmax beside the window and the sinks, chosen by the score of H2O (Zhang et al. 2023), the attention a key
received while it was in the window:

    r_j = sum over the group's query heads h and the W queries i = j .. j+W-1 of
          p_hij = exp(s_hij) / sum_{j' in window(i)} exp(s_hij')         (the window alone, no sinks, no memory)

Once key j leaves the window (and is not a sink) it competes with the far keys before it: key a beats key b when
r_a > r_b, or r_a == r_b and a is older. Query i attends exactly to the M best of the far keys S <= j <= i - W;
the others are in the linear memory (dropped without one). A key that drops out of the best M never returns (the
set it competes in only grows), so decoding keeps M keys and writes the one it drops into the memory: the state
grows by M keys and a score per window key, constant in context length.

- selection.py: which candidates are the best (per query, for a whole block, or dropping one while decoding).
- naive.py: the quadratic reference (explicit per-query sets); chunked.py: the block form inside
  hybrid/chunked.py; recurrent.py: the decoding state's heavy keys and a step's exact terms.
"""

from .selection import best, best_of_prefixes, drop_worst, heavy_sets, split

__all__ = ["best", "best_of_prefixes", "drop_worst", "heavy_sets", "split"]
