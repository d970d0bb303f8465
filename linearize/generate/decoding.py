"""Decoding, one path for teacher and student: prefill, one step, a sampler and a streaming callback.
`linearize generate`, the bench, the passkey test and compare all decode through Decoder.

    teacher: Hugging Face KV cache (DynamicCache, SDPA attention) -- memory grows with the context
    student: prefill in blocks of PREFILL_BLOCK tokens, each continuing the linear-attention DecodingState the
             last one left (chunked form), then one recurrent step per token -- constant memory

    dec = Decoder(model)
    logits = dec.prefill(ids)       # ids (1, T) -> next-token logits (1, V)
    logits = dec.step(token)        # token (1, 1) -> (1, V)
    new = dec.generate(ids, 64, temperature=0.7, on_token=print)   # list of new token ids
    for token in dec.tokens(logits, 64): ...                        # the same, one token at a time
"""

import torch

from ..device import model_device
from ..models.linearized import LinearizedForCausalLM
from .captured import CapturedStep

PREFILL_BLOCK = 2048  # prompt tokens per forward pass: bounds prefill memory, whatever the prompt length
TOP_P = 0.9  # nucleus sampling: sample from the smallest set of tokens with this much probability


def step_forward(model: LinearizedForCausalLM, ids: torch.Tensor, state, **kwargs):
    """model(ids) continuing from `state`, with the positions made on the ids' device (the model would make
    them on the CPU)."""
    positions = torch.arange(state.seen, state.seen + ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, linear_state=state, position_ids=positions, **kwargs)


def prefill_blocks(model: LinearizedForCausalLM, prompt_ids: torch.Tensor, state=None, block: int = PREFILL_BLOCK):
    """Feed prompt_ids (1, T) through the model `block` tokens at a time, each block continuing from the decoding
    state the last one left (chunked form), so activations never exceed one block. Yields (next-token logits
    (1, V), decoding state) after each block: a server interleaves other requests' work between blocks."""
    state = state if state is not None else model.new_decoding_state()
    prompt_ids = prompt_ids.to(model_device(model))
    for start in range(0, prompt_ids.shape[1], block):
        with torch.no_grad():
            logits = step_forward(model, prompt_ids[:, start : start + block], state, logits_to_keep=1).logits
        yield logits[:, -1], state


def prefill(model: LinearizedForCausalLM, prompt_ids: torch.Tensor, state=None, block: int = PREFILL_BLOCK):
    """prefill_blocks to the end: (next-token logits (1, V), decoding state); prompt_ids must not be empty."""
    for logits, state in prefill_blocks(model, prompt_ids, state, block):
        pass
    return logits, state


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = TOP_P, generator=None) -> torch.Tensor:
    """logits (1, V) -> next token (1, 1): the argmax when temperature <= 0, else nucleus sampling (drawn with
    `generator`, a torch.Generator on the logits' device, when given: a seeded request)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest set with mass >= top_p
    sorted_p = sorted_p * keep
    return order.gather(-1, torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator))


class Decoder:
    """Prefill and step either kind of model. Logits come back on the model's device, where inputs are moved;
    `cache` is the KV cache (teacher) or DecodingState (student); cache_bytes() its size per sequence.

    captured (student; default: on CUDA): once the prompt has filled the window and sinks, decode on fixed buffers
    (generate/captured.py), on CUDA with the step captured as a graph and replayed; `cache` reads them back (a copy)
    when asked for. Where the model's attention has no fixed-shape step, the eager step."""

    def __init__(self, model, captured: bool | None = None):
        self.model = model.eval()
        self.linear = isinstance(model, LinearizedForCausalLM)
        self.device = model_device(model)
        self.captured = self.linear and (self.device.type == "cuda" if captured is None else captured) \
            and CapturedStep.model_unsupported(model) is None
        self._cache = None
        self._step = None  # the CapturedStep, made at the first step it can take
        self._live = False  # True while the captured step's buffers, not _cache, hold the current state

    @property
    def cache(self):
        if self._live:
            self._cache, self._live = self._step.export(), False
        return self._cache

    @cache.setter
    def cache(self, value):
        self._cache, self._live = value, False

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, state=None, logits=None) -> torch.Tensor:
        """ids (1, T) -> logits (1, V); a new cache, or continuing from `state` (a DecodingState or KV cache a
        prefill left: copy it first to continue it more than once, decoding writes it in place). With T = 0 and
        the state's next-token `logits` (a saved state): the state as it is."""
        ids = ids.to(self.device)
        if ids.shape[1] == 0 and state is not None and logits is not None:
            self.cache = state
            return logits.to(self.device)
        if self.linear:
            logits, self.cache = prefill(self.model, ids, state)
            return logits
        from transformers import DynamicCache

        self.cache = state if state is not None else DynamicCache(config=self.model.config)
        return self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        token = token.to(self.device)
        if self.captured and not self._live and CapturedStep.unsupported(self.model, self._cache) is None:
            if self._step is None:
                self._step = CapturedStep(self.model, capture=self.device.type == "cuda")
            self._step.load(self._cache)
            self._live = True
        if self._live:
            return self._step(token)
        if self.linear:
            out = step_forward(self.model, token, self.cache)
        else:
            out = self.model(input_ids=token, cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    @property
    def step_kind(self) -> str:
        """How the last step decoded: "captured graph", "fixed buffers" (captured.py, uncaptured) or "eager"."""
        if not self._live:
            return "eager"
        return "captured graph" if self._step.graphs else "fixed buffers"

    def cache_bytes(self) -> int:
        if self._live:
            return self._step.nbytes()
        if self.cache is None:
            return 0
        if self.linear:
            return self.cache.nbytes()
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def tokens(self, logits: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = TOP_P,
               eos_token_id: int | None = None, generator=None):
        """Yield new token ids one at a time from the next-token logits (1, V) of a prefill, stepping the cache
        between them: at most max_new_tokens, ending after eos_token_id. Stop iterating to stop early."""
        for n in range(1, max_new_tokens + 1):
            token = sample(logits, temperature, top_p, generator)
            yield token.item()
            if token.item() == eos_token_id or n == max_new_tokens:
                return
            logits = self.step(token)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = TOP_P,
                 eos_token_id: int | None = None, on_token=None, state=None, state_logits=None) -> list[int]:
        """Continue ids (1, T): the new token ids, at most max_new_tokens, ending after eos_token_id.
        on_token(id) is called for each new token (streaming). state (student): continue it (see prefill)."""
        new, logits = [], self.prefill(ids, state, state_logits)
        for token in self.tokens(logits, max_new_tokens, temperature, top_p, eos_token_id):
            new.append(token)
            if on_token is not None:
                on_token(token)
        return new


def generate_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = TOP_P, eos_token_id: int | None = None, on_token=None, state=None):
    """prompt_ids (1, T) -> (1, T + n) with n <= max_new_tokens. temperature 0 = greedy.
    on_token(id) is called for each new token (for streaming). Returns (ids, decoding state or KV cache)."""
    dec = Decoder(model)
    new = dec.generate(prompt_ids, max_new_tokens, temperature, top_p, eos_token_id, on_token, state)
    ids = torch.cat([prompt_ids.to(dec.device), torch.tensor(new, dtype=torch.long, device=dec.device)[None]], dim=1)
    return ids, dec.cache


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """[{"role", "content"}] -> the text the assistant's answer continues: the tokenizer's chat template with the
    generation prompt, else plain "Role: content" lines and "Assistant:"."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from ..data.sources import PLAIN_NAMES

    lines = [f"{PLAIN_NAMES.get(m['role'], m['role'].title())}: {m['content']}\n" for m in messages]
    return "".join(lines) + "Assistant:"


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  chat: bool = True, stream=None) -> str:
    """Continue `prompt` (wrapped in the tokenizer's chat template when it has one and chat=True);
    stream(text) is called with each new token's text."""
    text = prompt
    if chat and has_chat_template(tokenizer):
        text = chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def on_token(t):
        if stream is not None:
            stream(tokenizer.decode([t], skip_special_tokens=True))

    new = Decoder(model).generate(ids, max_new_tokens, temperature, eos_token_id=tokenizer.eos_token_id,
                                  on_token=on_token)
    return tokenizer.decode(new, skip_special_tokens=True)
