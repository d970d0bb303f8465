"""The linear-attention DecodingState as a transformers Cache, so `model.generate()` (and pipeline, lm_eval's
generate_until) decode in constant memory: after the prompt, each step feeds one token and updates the state in
place; nothing grows with the context (a layer kept in exact softmax keeps its KV cache in the state).

    out = model(input_ids=prompt, use_cache=True)           # out.cache: a LinearStateCache
    out = model(input_ids=next_token, cache=out.cache)      # continues it (what generate() does)
"""

from transformers import Cache

from ..errors import LinearizeError
from ..layers.linear_attention import DecodingState


class LinearStateCache(Cache):
    """Holds one DecodingState (`.state`); no per-layer KV tensors. Beam search and assisted decoding, which
    reorder or crop a cache, are not supported."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: DecodingState):
        super().__init__(layers=[])
        self.state = state

    @property
    def is_linear(self) -> list[bool]:
        # False: generate() reads get_seq_length() to cut a continued prompt to its new tokens
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit

    def nbytes(self) -> int:
        return self.state.nbytes()

    def _unsupported(self, *args, **kwargs):
        raise LinearizeError("a linear-attention decoding state cannot be reordered or cropped: use greedy or "
                             "sampling decoding (num_beams=1, no assistant model)")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


def state_cache(cache, use_cache: bool | None, num_layers: int) -> LinearStateCache | None:
    """The cache a forward call decodes with: `cache` if it is one, a new one when use_cache=True or when an empty
    cache of another kind was passed (e.g. a DynamicCache made by generate()), else None."""
    if isinstance(cache, LinearStateCache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise LinearizeError(f"a linearized model cannot continue a {type(cache).__name__}; pass the cache its own "
                             "forward returned (out.cache) or none")
    if cache is not None or use_cache:
        return LinearStateCache(DecodingState(num_layers))
    return None
