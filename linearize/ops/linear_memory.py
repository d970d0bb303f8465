"""Causal linear memories: the recurrent half of hybrid attention, in three forms each.

Query i reads the memory after key i has been written (inclusive):

    sum rule   (linear attention; gated as in GLA / Liger):   S_i = g_i S_{i-1} + fk_i^T v_i
    delta rule (DeltaNet; gated as in Gated DeltaNet):      S_i = g_i (I - b_i fk_i^T fk_i) S_{i-1} + b_i fk_i^T v_i
    o_i = fq_i S_i

g_i = exp(log_gate_i) in (0, 1] is a per-token forget gate (None: g = 1), b_i in (0, 1) the delta-rule write
strength (None: the sum rule). The delta rule expects L2-normalised fq, fk.

Shapes: fq (B, Hkv, G, T, F) (query heads grouped under their key head), fk (B, Hkv, T, F), v (B, Hkv, T, D),
log_gate, beta (B, Hkv, T) or None; memory S (B, Hkv, F, D).

- memory_naive: reference (sum rule: explicit T x T decayed weights; delta rule: explicit F x F transitions).
- memory_chunked: chunk-parallel form (WY / UT transform for the delta rule); returns the final memory too.
- memory_step: one key enters the memory (rank-1 update), for decoding.
"""

import torch
import torch.nn.functional as F


def _log_gate_or_zeros(log_gate, like: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T) log gates; zeros (no forgetting) when None. `like`: fk (B, Hkv, T, F)."""
    return like.new_zeros(like.shape[:-1]) if log_gate is None else log_gate.to(like.dtype)


def memory_naive(fq, fk, v, log_gate=None, beta=None, state=None):
    """Reference form. Returns (o (B, Hkv, G, T, D), final memory (B, Hkv, F, D))."""
    B, Hkv, G, T, Fd = fq.shape
    lg = _log_gate_or_zeros(log_gate, fk)
    S = fk.new_zeros(B, Hkv, Fd, v.shape[-1]) if state is None else state
    if beta is None:  # o_i = sum_{j <= i} exp(C_i - C_j) (fq_i . fk_j) v_j + exp(C_i) fq_i S_0
        C = lg.cumsum(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=fq.device).tril()
        decay = torch.exp((C[..., :, None] - C[..., None, :]).masked_fill(~causal, float("-inf")))
        a = (fq @ fk.unsqueeze(2).transpose(-1, -2)) * decay.unsqueeze(2)
        o = a @ v.unsqueeze(2) + (fq * torch.exp(C)[:, :, None, :, None]) @ S.unsqueeze(2)
        last = torch.exp(C[..., -1:] - C)  # (B, Hkv, T)
        S = torch.exp(C[..., -1])[..., None, None] * S + (fk * last[..., None]).transpose(-1, -2) @ v
        return o, S
    eye = torch.eye(Fd, dtype=fk.dtype, device=fk.device)
    out = []
    for t in range(T):
        k_t = fk[:, :, t, :, None]  # (B, Hkv, F, 1)
        b_t, g_t = beta[:, :, t, None, None].to(fk.dtype), torch.exp(lg[:, :, t, None, None])
        S = g_t * (eye - b_t * k_t @ k_t.transpose(-1, -2)) @ S + b_t * k_t @ v[:, :, t, None, :]
        out.append(fq[:, :, :, t : t + 1] @ S.unsqueeze(2))
    return torch.cat(out, dim=3), S


def memory_step(fk_t, v_t, log_gate_t, beta_t, S):
    """Write one key: fk_t (B, Hkv, 1, F), v_t (B, Hkv, 1, D), log_gate_t / beta_t (B, Hkv, 1) or None;
    S (B, Hkv, F, D) -> the new S."""
    if log_gate_t is not None:
        S = torch.exp(log_gate_t.to(S.dtype))[..., None] * S
    if beta_t is None:
        return S + fk_t.transpose(-1, -2) * v_t  # rank-1 outer product
    # g (I - b k^T k) S + b k^T v  =  gS + b k^T (v - k gS)
    return S + beta_t.to(S.dtype)[..., None] * fk_t.transpose(-1, -2) @ (v_t - fk_t @ S)


def memory_chunked(fq, fk, v, log_gate=None, beta=None, chunk: int = 64, state=None):
    """Chunk-parallel form, same result as memory_naive. Returns (o (B, Hkv, G, T, D), final memory)."""
    B, Hkv, G, T, Fd = fq.shape
    D = v.shape[-1]
    n = -(-T // chunk)
    pad = n * chunk - T
    # gates in at least float32: their cumulative sums lose too much in bfloat16 (exp(b) is rounded once, at use)
    wide = torch.promote_types(fk.dtype, torch.float32)
    exp = lambda x: torch.exp(x).to(fk.dtype)  # noqa: E731
    lg = F.pad(_log_gate_or_zeros(log_gate, fk).to(wide), (0, pad)).view(B, Hkv, 1, n, chunk, 1)
    fq = F.pad(fq, (0, 0, 0, pad)).view(B, Hkv, G, n, chunk, Fd)
    fk = F.pad(fk, (0, 0, 0, pad)).view(B, Hkv, 1, n, chunk, Fd)
    v = F.pad(v, (0, 0, 0, pad)).view(B, Hkv, 1, n, chunk, D)
    S0 = fk.new_zeros(B, Hkv, Fd, D) if state is None else state
    b = lg.cumsum(-2)  # (B, Hkv, 1, n, C, 1) cumulative log gate inside each chunk
    last = b[..., -1:, :]  # (B, Hkv, 1, n, 1, 1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    decay = exp((b - b.transpose(-1, -2)).masked_fill(~causal, float("-inf")))  # exp(b_i - b_j), j <= i
    qk = (fq @ fk.transpose(-1, -2)) * decay  # (B, Hkv, G, n, C, C)
    if beta is None:
        U = (fk * exp(last - b)).transpose(-1, -2) @ v  # each chunk's write, decayed to its end (.., n, F, D)
        tot = last[..., 0, 0]  # (B, Hkv, 1, n)
        L = tot.cumsum(-1)
        Lprev = L - tot  # decay from the start of the sequence to the start of chunk k
        strict = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril(-1)
        Dk = exp((Lprev[..., :, None] - L[..., None, :]).masked_fill(~strict, float("-inf")))  # (.., n, n)
        P = torch.einsum("bhgkm,bhgmfd->bhgkfd", Dk, U) + exp(Lprev)[..., None, None] * S0[:, :, None, None]
        o = qk @ v + (fq * exp(b)) @ P
        S = exp(L[..., -1])[:, :, 0, None, None] * S0 + torch.einsum(
            "bhgm,bhgmfd->bhfd", exp(L[..., -1:] - L), U)
        return o.reshape(B, Hkv, G, n * chunk, D)[:, :, :, :T], S
    # delta rule: u = (I + A)^-1 (b v - b exp(b) k S_0) per chunk, A_ts = b_t exp(b_t - b_s) (k_t . k_s), s < t
    bt = F.pad(beta.to(fk.dtype), (0, pad)).view(B, Hkv, 1, n, chunk, 1)
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril(-1)
    A = (bt * (fk @ fk.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    eye = torch.eye(chunk, dtype=wide, device=fk.device)
    solve = lambda x: torch.linalg.solve_triangular(  # noqa: E731 (no triangular solve in bfloat16 / float16)
        eye + A.to(wide), x.to(wide), upper=False, unitriangular=True).to(fk.dtype)
    U0, Wk = solve(bt * v), solve(bt * exp(b) * fk)  # (.., n, C, D), (.., n, C, F)
    S, out = S0, []
    for c in range(n):
        u = U0[:, :, :, c] - Wk[:, :, :, c] @ S.unsqueeze(2)  # (B, Hkv, 1, C, D)
        out.append((fq[:, :, :, c] * exp(b[:, :, :, c])) @ S.unsqueeze(2) + qk[:, :, :, c] @ u)
        k_dec = fk[:, :, 0, c] * exp(last[:, :, 0, c] - b[:, :, 0, c])
        S = exp(last[:, :, 0, c]) * S + k_dec.transpose(-1, -2) @ u[:, :, 0]
    return torch.cat(out, dim=3)[:, :, :, :T], S
