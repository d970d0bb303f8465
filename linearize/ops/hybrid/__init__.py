"""Hybrid sliding-window + linear attention (LoLCATs eq. 7) in three forms of the same math.

For query i, keys j with i - W < j <= i (the W most recent) get exact softmax weights, older keys
(j <= i - W) are read from a linear memory (linear_memory.py) that a key enters when it leaves the window:

    sum rule (default):  y_i = sum_j a_ij [v_j, 1] -> divided by its last column (one shared normaliser),
        a_ij = w_h * exp(s_ij - m_i)                     if j in E_i = {i - W < j <= i} + {j < S, j <= i}
        a_ij = (1 - w_h) * decay_ij * phi(q_i) . phi(k_j) if S <= j <= i - W                 (s_ij = q_i . k_j * scale)
        decay_ij = prod of the forget gates g_l of the keys j < l <= i - W (1 without a gate); m_i = max over E_i
    delta rule: y_i = w_h * softmax output over E_i + (1 - w_h) * phi(q_i) S_{i-W}, with S the
        (gated) delta-rule memory of keys S <= j <= i - W (no normaliser: the delta rule stores values directly).
    output normalisation (norm_gain given; TransNormer's NormAttention): the linear part drops its denominator and is
        normalised per head instead, y_i = w_h * softmax output over E_i + (1 - w_h) * g_h * RMSNorm(o_i), o_i the
        sum-rule numerator sum_j decay_ij phi(q_i) . phi(k_j) v_j (or the delta-rule read-out), g_h (H, d) a gain.
    memory cap (sum rule, memory_cap = C > 0): once the memory holds n_i > C keys, its terms a_ij are scaled by C / n_i,
        so it never weighs more than C keys did (the most it held in training when C = training length - W - S): its
        share of the normaliser stops growing with the context and keeps exact keys (window, sinks, cache) readable.

Two mechanisms keep more keys exact, each in its own package beside this one: the sparse cache (sparse_cache/: the
keys the memory recalls worst) and heavy hitters (heavy_hitters/: the keys that drew the most window attention).
w_h in (0, 1) is a per-head mixing factor. Grouped-query attention: H = G * Hkv, query head h uses key head h // G.

Every entry point takes Streams (state.py), an AttentionSpec and the LayerConstants (spec.py):
- naive.attention_quadratic(streams, spec, layer) -> y: the T x T reference (tests only).
- chunked.attention_chunked(streams, spec, layer, initial_state, output_final_state, chunk) -> (y, state | None):
  O(T) memory, for training and prefill (in blocks, continuing initial_state).
- recurrent.attention_recurrent(streams, spec, layer, initial_state, output_final_state) -> (y, state | None): one
  token at a time, for decoding; advances its state in place (the window is a ring buffer: window.py).
terms.py holds the arithmetic the forms share (grouping, exact numerators, the cap, the mixing); composed.py runs the
chunked form's exact part of a fresh call as one fused flex_attention kernel on CUDA (opt-in: LINEARIZE_FLEX_ATTENTION=1).
"""
