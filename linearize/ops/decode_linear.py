"""One-token matrix-vector products for CPU decoding, on every core.

A decode step multiplies one token (1, in) by every weight matrix of the model, so it is bound by how fast the
weights stream from memory. On CPU, PyTorch's F.linear runs that product (MKL's matrix-vector path) on a single
thread. DecodeLinear stores the weight (out, in) as the transpose of a contiguous (in, out) tensor -- same values,
same shape -- and splits the sum over `in` into one slice per thread, a batched product the cores share:

    y = sum_p x[p-th slice of in] @ W^T[p-th slice of in rows]      (torch.bmm over p, then a sum)

Any other input (a prompt, a batch) goes through F.linear unchanged; the weight layout does not slow it down.
`linearize bench` records `linear_layers_ms`, one token through every linear layer, to compare with `--linears stock`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DecodeLinear(nn.Linear):
    """nn.Linear whose weight is (in, out)-contiguous; forward splits a single token's product over `parts`."""

    parts: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features or self.parts == 1:
            return F.linear(x, self.weight, self.bias)
        w = self.weight.t().view(self.parts, self.in_features // self.parts, self.out_features)  # (P, in/P, out)
        y = torch.bmm(x.reshape(self.parts, 1, -1), w).sum(0)  # (1, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def use_decode_linears(model: nn.Module, parts: int | None = None) -> nn.Module:
    """Turn every CPU nn.Linear of `model` into a DecodeLinear in place (parameters kept, values unchanged; tied
    weights such as lm_head = embed_tokens change together). parts: slices of a one-token product (default: torch's
    thread count; layers whose input width it does not divide keep one). For inference (generate, bench): train and
    save with plain nn.Linear. Calling it twice changes nothing. Returns model."""
    parts = parts or torch.get_num_threads()
    done = set()
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu":
            if id(m.weight) not in done:  # a weight two layers share is re-laid once
                m.weight.data = m.weight.data.t().contiguous().t()
            m.__class__ = DecodeLinear
            m.parts = parts if m.in_features % parts == 0 else 1
            done.add(id(m.weight))
    # The rest are copied too (small: norms, biases, feature maps), so that no tensor points into a memory-mapped
    # safetensors file any more: its pages would otherwise stay resident beside the new copies of the weights.
    for t in [*model.parameters(), *model.buffers()] if done else []:
        if id(t) not in done and t.device.type == "cpu":
            t.data = t.data.clone()
    return model
