"""The student's decoding step on fixed buffers, captured once as CUDA graphs and replayed for every token (issue 37).

A decoding step of a 135M model is hundreds of small kernels; on a GPU their launches, not the arithmetic, set its
time. The student's state has a constant shape, which is what graph capture needs (a teacher's growing KV cache is
not): each layer's state is copied into fixed buffers (ops/sparse_cache/static.py), the step (every layer, the MLPs,
the logits) is recorded as one graph and the cache selection of every layer as a second one, replayed after the
tokens that end a selection period. Off CUDA nothing is captured: the same fixed-shape step runs eagerly, which is
what the tests compare with the eager decoder.

    step = CapturedStep(model, capture=True)   # nothing made yet
    step.load(state)                           # a DecodingState after a prefill (copied in; captures on first use)
    logits = step(token)                       # token (1, 1) -> logits (1, V); the buffers move on in place
    state = step.export()                      # the DecodingState as the eager forms take it (copies)

generate/decoding.Decoder uses it on CUDA (generate, serve, bench and the evals decode through it).
"""

import warnings

import torch

from ..layers.linear_attention import DecodingState
from ..ops.sparse_cache.static import StaticCacheState, selection_due, static_select

WARMUP_STEPS = 2  # eager runs before capture (lazy initialisation: cuBLAS handles, kernel selection)


class CapturedStep:
    """One decoding stream's fixed buffers and, with capture=True (CUDA), the graphs that advance them."""

    def __init__(self, model, capture: bool):
        self.model, self.capture = model, capture
        self.modules = {m.layer_idx: m for m in model.attention_modules()}
        self.state = None  # a DecodingState of StaticCacheState, made by the first load
        self.graphs = None  # (step, select) once captured
        self.seen = self.count = 0  # the host's copies of the buffers' counts: when a selection is due

    @staticmethod
    def model_unsupported(model) -> str | None:
        """Why this model decodes only eagerly (None: on fixed buffers once its prompt fills the window and sinks)."""
        specs = {m.layer_idx: m.spec for m in model.attention_modules()}
        if set(specs) != set(range(model.config.num_hidden_layers)):
            return "every layer must be a linearized attention"
        if len({(s.cache, s.cache_every) for s in specs.values()}) != 1:
            return "every layer must re-select the same cache size at the same tokens"
        return next(filter(None, map(StaticCacheState.spec_unsupported, specs.values())), None)

    @staticmethod
    def unsupported(model, state: DecodingState | None) -> str | None:
        """Why this state cannot be held in fixed buffers yet (None: it can; the model as model_unsupported)."""
        if state is None or any(s is None for s in state):
            return "no prompt has been prefilled"
        specs = {m.layer_idx: m.spec for m in model.attention_modules()}
        for i, s in enumerate(state):
            if isinstance(s, StaticCacheState):
                return "the state is already in fixed buffers"
            if reason := StaticCacheState.unsupported(s, specs[i]):
                return reason
        return None

    def load(self, state: DecodingState):
        """Copy `state` (a DecodingState that `unsupported` accepts; left as it is) into the buffers, made (and the
        graphs captured) the first time or where its shapes differ."""
        statics = [StaticCacheState.from_state(s, self.modules[i].spec) for i, s in enumerate(state)]
        new = [t for s in statics for t in s.tensors()]
        if self.state is None or [t.shape for t in new] != [t.shape for t in self.buffers()]:
            self.state = DecodingState(len(statics))
            self.state[:] = statics
            device = statics[0].win_k.device
            self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            self.position = torch.zeros(1, 1, dtype=torch.long, device=device)
            self.graphs = self._captured() if self.capture else None
            self.capture = self.graphs is not None
        else:
            self.restore(new)
        self.seen, self.count = state.seen, int(statics[0].count)
        self.state.seen = self.seen

    def buffers(self) -> list[torch.Tensor]:
        """Every fixed buffer of every layer, in one order (what the graphs read and write)."""
        return [t for s in self.state for t in s.tensors()]

    def restore(self, values: list[torch.Tensor]):
        """Copy `values` (in buffers() order and shapes) into the buffers."""
        for t, value in zip(self.buffers(), values):
            t.copy_(value)

    def export(self) -> DecodingState:
        """The current state as a DecodingState of LinearAttentionState (copies), for prefill, state files, ..."""
        out = DecodingState(len(self.state))
        out[:] = [s.to_state(self.modules[i].spec) for i, s in enumerate(self.state)]
        out.seen = self.seen
        return out

    def nbytes(self) -> int:
        return self.state.nbytes()

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (1, 1) on the model's device -> the next-token logits (1, V) (a copy: the buffer is reused)."""
        self.ids.copy_(token.view(1, 1))
        self.position.fill_(self.seen)
        if self.graphs:
            self.graphs[0].replay()
            logits = self.logits
        else:
            logits = self._forward()
        self.seen, self.count = self.seen + 1, self.count + 1
        self.state.seen = self.seen
        spec = self.modules[0].spec
        if selection_due(self.seen, self.count, spec):
            self.graphs[1].replay() if self.graphs else self._select()
            self.count = spec.cache
        return logits.clone()

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, linear_state=self.state, position_ids=self.position).logits[:, -1]

    def _select(self):
        for i, s in enumerate(self.state):
            module = self.modules[i]
            static_select(module.spec, module.constants(s.far_k), s)

    def _captured(self):
        """Record the step and the selection as CUDA graphs (after eager warm-up runs on a side stream; the
        buffers are restored after the warm-up, which moved them on)."""
        saved = [t.clone() for t in self.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._forward()
                self._select()
        torch.cuda.current_stream().wait_stream(side)
        self.restore(saved)
        step, select = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        try:
            with torch.no_grad():
                with torch.cuda.graph(step):
                    self.logits = self._forward()
                with torch.cuda.graph(select, pool=step.pool()):
                    self._select()
        except RuntimeError as e:  # an op that cannot be captured (a host sync): the same step, uncaptured
            warnings.warn(f"decoding without a CUDA graph: capturing the step failed ({str(e).splitlines()[0]})")
            torch.cuda.synchronize()
            self.restore(saved)
            return None
        return step, select
