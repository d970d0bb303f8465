"""Sparse cache (the idea of LoLA, McDermott et al. 2025): the keys a linear memory recalls worst stay exact.

With a cache of M keys per KV head, a key that leaves the softmax window (and is not a sink) does not enter the
linear memory at once: it joins the cached keys and stays exact. Every `every` tokens (after the tokens at absolute
positions p with (p + 1) % every == 0) the cached keys are ranked by how badly the memory S recalls the direction of
their values (sum rule, S = [S_v | s] of shape (F, d + 1), the last column the normaliser):

    e_j = 1 - cos(v_j, phi(k_j) S_v / (phi(k_j) . s))      (0 <= e_j <= 2; 1 while the memory is empty;
                                                              || v_j ||^2 with no linear part at all)

Each key then takes the largest error within `pool` keys on either side of it in the cache (which holds its keys in
position order), so a kept key keeps its neighbours: a number written as several digit tokens stays whole, as SnapKV
pools its scores. The M keys with the largest pooled error stay, the others are written into the memory
(S += phi(k_j)^T [v_j, 1]) or, with no linear part, dropped. So query i attends exactly to every token up to i that
is not in the memory (window, sinks, cache, and the keys that left the window since the last selection) and reads
the others from the memory, which changes only at selections. The state holds at most M + every - 1 cached keys per
head: constant in context length.

The direction, not the squared error of LoLA's self-recall: a linear read-out is an average of many values, short
next to any one of them, so || v_j - read ||^2 mostly ranks keys by the norm of their values (on passkey prompts the
cache fills with filler words such as " There" and "."), while the cosine ranks them by what the memory has not
seen. On the default run with a cache of 64 (10 trials) passkey at 1k was 70 % with the squared error
(docs/results/cache_squared_1k.json), with the cosine 90 / 100 / 80 % at 1k / 2k / 4k (docs/results/recall.json,
the memory capped at 32 keys). Ties (an empty memory) keep the older keys.

One normaliser, as in hybrid/terms.py, with one change of units: the memory was trained beside the window and
sinks, as a stand-in for exp(s_ij - m_i) with m_i the largest window/sink score, so it keeps those units. A cached
key weighs w_h exp(s_ij - m_i) too, which exceeds 1 when it outscores the window (the key the query looks for): it
then outweighs the memory as in the teacher's softmax, however many tokens the memory holds. (With m_i the largest
score of the whole exact set instead, the memory's mass, which grows with the context, drowns such a key.)

With a fitted score (cache_score "learned", transfer/cache_score.py) the keys are ranked instead by a linear score
of each key and value per KV head, fitted to mark the keys that questions asked far beyond the window read most
(the top 2 %) in look-up exercises in the model's own training text: in real prose every sentence is new to the memory, so
the self-recall error does not single out a fact, while the fitted score learns what such questions read (pooled
the same way). It needs the keys held with their RoPE undone (a cache_distance).

- selection.py: ranking the cached keys by the memory's self-recall error; positions.py: where the cache's keys
  (and the sinks outside the window) are scored (their own positions, or at a distance);
- naive.py: the quadratic reference (replays the selections); segment.py: the chunked form, segment by segment
  between selections, and the selection on a state; recurrent.py: one decoding step; static.py: that step and the
  selection in buffers of fixed shape (what a captured CUDA graph replays: generate/captured.py).
"""

from .selection import (gather_time, keep_worst_recalled, learned_score, pooled, read_out, score_features,
                        self_recall_error, worst_recalled)

__all__ = ["gather_time", "keep_worst_recalled", "learned_score", "pooled", "read_out", "score_features",
           "self_recall_error", "worst_recalled"]
