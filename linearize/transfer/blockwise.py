"""Block-wise attention transfer, for teachers that do not fit (or should not run whole) on one device.

A block is a run of decoder layers [start, stop). Its students learn only from the hidden states entering
layer `start`, so:
1. dump_block_inputs: one teacher forward per batch writes, for every block, the residual stream entering
   its first layer to folder/block_{start}_{stop}/chunk_{k:05d}.safetensors ("hidden" (n, T, D) in the
   teacher's dtype, "position_ids" (n, T)).
2. train_block: replays only that block's layers on the stored states and trains their students with the
   usual hooks and loop (attention_transfer); it touches no other layer, so blocks can train on different
   machines, each with only its block's layers in memory (load_block_teacher).
3. save_block_state / stitch_block_states: each block's trained layers go to one safetensors file; stitching
   checks the blocks cover every layer once and merges them into one transfer state (load_transfer_state).
"""

from pathlib import Path

import torch
from safetensors import safe_open
from transformers.masking_utils import create_causal_mask

from ..errors import LinearizeError
from ..layers.linear_attention import LinearAttention
from ..loading.architectures import architecture_of
from ..run_folder import META, load_tensors, read_json, save_tensors, write_json
from ..training import TrainResult
from .attention_transfer import attention_transfer, transfer_state

Block = tuple[int, int]  # decoder layers [start, stop)


def split_blocks(num_layers: int, num_blocks: int) -> list[Block]:
    """num_layers layers cut into num_blocks contiguous blocks of (nearly) equal size."""
    if not 1 <= num_blocks <= num_layers:
        raise LinearizeError(f"cannot cut {num_layers} layers into {num_blocks} blocks; use 1..{num_layers}")
    edges = [round(i * num_layers / num_blocks) for i in range(num_blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _block_dir(folder: Path, block: Block) -> Path:
    return Path(folder) / f"block_{block[0]}_{block[1]}"


def dump_block_inputs(teacher, sequences: torch.Tensor, blocks: list[Block], folder: Path,
                      chunk_rows: int = 16, batch_size: int = 1) -> None:
    """Store the hidden states entering each block's first layer for sequences (N, T), chunk_rows rows a file."""
    layers = architecture_of(teacher.config).decoder_layers(teacher)
    buffers = {b: [] for b in blocks}
    chunks = {b: 0 for b in blocks}

    def flush(block):
        rows = buffers[block]
        tensors = {"hidden": torch.cat([h for h, _ in rows]), "position_ids": torch.cat([p for _, p in rows])}
        save_tensors(tensors, _block_dir(folder, block) / f"chunk_{chunks[block]:05d}.safetensors")
        buffers[block], chunks[block] = [], chunks[block] + 1

    def capture(block):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            position_ids = kwargs["position_ids"].expand(hidden.shape[0], -1)
            for h, p in zip(hidden.detach().cpu(), position_ids.cpu()):
                buffers[block].append((h[None], p[None]))
                if len(buffers[block]) == chunk_rows:
                    flush(block)

        return hook

    for block in blocks:
        _block_dir(folder, block).mkdir(parents=True, exist_ok=True)
    handles = [layers[b[0]].register_forward_pre_hook(capture(b), with_kwargs=True) for b in blocks]
    device = next(teacher.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(sequences), batch_size):
                teacher.get_decoder()(sequences[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    for block in blocks:
        if buffers[block]:
            flush(block)
    write_json({"blocks": [list(b) for b in blocks], "num_sequences": len(sequences),
                       "seq_len": sequences.shape[1], "chunk_rows": chunk_rows}, Path(folder) / META)


def load_block_teacher(model_dir: Path, block: Block, dtype: torch.dtype = torch.float32, device="cpu"):
    """The teacher from a Hugging Face safetensors folder with only layers [start, stop) (and the rotary
    embedding) materialised on `device`; every other weight stays on the meta device, costing no memory."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise LinearizeError(f"{model_dir} has no *.safetensors weights; block mode needs a Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():  # buffers (the rotary frequencies) are still real
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefixes = tuple(f"{architecture_of(config).layers_path}.{i}." for i in range(*block))
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in (n for n in f.keys() if n.startswith(prefixes)):
                set_module_tensor_to_device(teacher, name, device, value=f.get_tensor(name), dtype=dtype)
    teacher.get_decoder().rotary_emb.to(device)
    return teacher.eval()


class BlockInputs:
    """Reads rows back from one block's chunks, keeping the last chunk read in memory."""

    def __init__(self, folder: Path, block: Block):
        self.meta = read_json(Path(folder) / META, fix="dump the block inputs again")
        if self.meta is None:
            raise LinearizeError(f"{folder} holds no dumped block inputs; run dump_block_inputs first")
        if list(block) not in self.meta["blocks"]:
            raise LinearizeError(f"block {block} was not dumped in {folder}; dumped: {self.meta['blocks']}")
        self.dir, self._cached = _block_dir(folder, block), (None, None)

    def __len__(self) -> int:
        return self.meta["num_sequences"]

    def _chunk(self, k: int) -> dict[str, torch.Tensor]:
        if self._cached[0] != k:
            self._cached = (k, load_tensors(self.dir / f"chunk_{k:05d}.safetensors"))
        return self._cached[1]

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> hidden (len(rows), T, D), position_ids (len(rows), T)"""
        n = self.meta["chunk_rows"]
        picked = [(self._chunk(r // n)["hidden"][r % n], self._chunk(r // n)["position_ids"][r % n]) for r in rows]
        return torch.stack([h for h, _ in picked]), torch.stack([p for _, p in picked])


def train_block(teacher, students: list[LinearAttention], folder: Path, block: Block, lr: float = 1e-2,
                batch_size: int = 1, checkpoint_dir: Path | None = None, progress: bool = True) -> TrainResult:
    """Train the students of layers [start, stop) on the stored inputs of that block (one pass)."""
    inputs = BlockInputs(folder, block)
    decoder = teacher.get_decoder()
    layers = architecture_of(teacher.config).decoder_layers(teacher)[block[0] : block[1]]
    device = next(layers.parameters()).device

    def replay(batch):  # batch (B, T) of row indices (each row repeats its index)
        hidden, position_ids = inputs.rows(batch[:, 0].tolist())
        hidden, position_ids = hidden.to(device), position_ids.to(device)
        position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        mask = create_causal_mask(config=teacher.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)

    index = torch.arange(len(inputs))[:, None].expand(-1, inputs.meta["seq_len"])  # rows as "sequences"
    return attention_transfer(teacher, students, index, lr=lr, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                              progress=progress, layers=list(range(*block)), forward=replay)


def save_block_state(students: list[LinearAttention], block: Block, path: Path) -> None:
    """The trained transfer parameters of layers [start, stop) only, to one safetensors file."""
    save_tensors(transfer_state(students, range(*block)), path, metadata={"block": f"{block[0]},{block[1]}"})


def stitch_block_states(paths: list[Path], num_layers: int) -> dict[str, torch.Tensor]:
    """Merge block files from save_block_state into one transfer state; every layer must come exactly once."""
    merged, owner = {}, {}
    for path in paths:
        with safe_open(str(path), "pt") as f:
            start, stop = map(int, (f.metadata() or {}).get("block", "0,0").split(","))
        if stop <= start:
            raise LinearizeError(f"{path} is not a block state (no block metadata); write it with save_block_state")
        for layer in range(start, stop):
            if layer in owner:
                raise LinearizeError(f"layer {layer} is in both {owner[layer]} and {path}; give each block once")
            owner[layer] = path
        merged.update(load_tensors(path))
    missing = sorted(set(range(num_layers)) - set(owner))
    if missing:
        raise LinearizeError(f"no block covers layers {missing}; train and save those blocks too")
    return merged
