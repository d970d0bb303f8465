"""One prefill/step interface for both sides of a comparison, so the bench and the passkey test treat them alike.

    teacher: Hugging Face KV cache (DynamicCache, SDPA attention) -- memory grows with the context
    student: chunked prefill in blocks (generate.prefill), then recurrent steps on a linear-attention
             DecodingState -- constant memory
"""

import torch

from ..device import model_device
from ..generate import prefill, step_forward
from ..models.linearized import LinearizedForCausalLM


class Decoder:
    """dec = Decoder(model); logits = dec.prefill(ids (1, T)); logits = dec.step(token (1, 1)).
    Both return next-token logits (1, V) on the model's device, where they also take their inputs from;
    cache_bytes() is the size of what decoding keeps per sequence."""

    def __init__(self, model):
        self.model = model.eval()
        self.linear = isinstance(model, LinearizedForCausalLM)
        self.device = model_device(model)
        self.cache = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self.linear:
            logits, self.cache = prefill(self.model, ids)
            return logits
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        token = token.to(self.device)
        if self.linear:
            out = step_forward(self.model, token, self.cache)
        else:
            out = self.model(input_ids=token, cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        if self.linear:
            return self.cache.nbytes()
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def greedy(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ids (1, T): the new token ids (stops after eos_token_id)."""
        logits, new = self.prefill(ids), []
        for _ in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            new.append(token.item())
            if new[-1] == eos_token_id or len(new) == max_new_tokens:
                break
            logits = self.step(token)
        return new
