"""Text generation with constant memory: chunked prefill of the prompt, then one recurrent step per token."""

import torch

from .device import model_device
from .models.linearized import LinearizedForCausalLM

PREFILL_BLOCK = 2048  # prompt tokens per forward pass: bounds prefill memory, whatever the prompt length


def step_forward(model: LinearizedForCausalLM, ids: torch.Tensor, state, **kwargs):
    """model(ids) continuing from `state`, with the positions made on the ids' device (the model would make
    them on the CPU)."""
    positions = torch.arange(state.seen, state.seen + ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, linear_state=state, position_ids=positions, **kwargs)


@torch.no_grad()
def prefill(model: LinearizedForCausalLM, prompt_ids: torch.Tensor, state=None, block: int = PREFILL_BLOCK):
    """Feed prompt_ids (1, T) through the model `block` tokens at a time, each block continuing from the decoding
    state the last one left (chunked form), so activations never exceed one block.
    Returns (next-token logits (1, V), decoding state)."""
    state = state if state is not None else model.new_decoding_state()
    prompt_ids = prompt_ids.to(model_device(model))
    for start in range(0, prompt_ids.shape[1], block):
        logits = step_forward(model, prompt_ids[:, start : start + block], state, logits_to_keep=1).logits
    return logits[:, -1], state


@torch.no_grad()
def generate_ids(model: LinearizedForCausalLM, prompt_ids: torch.Tensor, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 0.9, eos_token_id: int | None = None,
                 on_token=None, state=None):
    """prompt_ids (1, T) -> (1, T + n) with n <= max_new_tokens. temperature 0 = greedy.
    on_token(id) is called for each new token (for streaming). Returns (ids, decoding state)."""
    model.eval()
    prompt_ids = prompt_ids.to(model_device(model))
    logits, state = prefill(model, prompt_ids, state)
    out = [prompt_ids]
    for i in range(max_new_tokens):
        if temperature <= 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest set with mass >= top_p
            sorted_p = sorted_p * keep
            token = order.gather(-1, torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1))
        out.append(token)
        if on_token is not None:
            on_token(token.item())
        if i == max_new_tokens - 1 or (eos_token_id is not None and token.item() == eos_token_id):
            break
        logits = step_forward(model, token, state).logits[:, -1]
    return torch.cat(out, dim=1), state


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  chat: bool = True, stream=None) -> str:
    """Continue `prompt` (wrapped in the tokenizer's chat template when it has one and chat=True)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    new: list[int] = []

    def on_token(t):
        new.append(t)
        if stream is not None:
            stream(tokenizer.decode(new[-1:], skip_special_tokens=True))

    generate_ids(model, ids, max_new_tokens, temperature, eos_token_id=tokenizer.eos_token_id, on_token=on_token)
    return tokenizer.decode(new, skip_special_tokens=True)
