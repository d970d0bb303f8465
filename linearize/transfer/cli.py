"""`linearize blocks dump | train | stitch`: block-wise attention transfer from the command line.

    linearize blocks dump   --model M --out inputs/ --blocks 8 [--data D --seq-len T --tokens N --dtype bf16]
    linearize blocks train  --model M --inputs inputs/ --block 10:20 --out block_10_20.safetensors   (any machine)
    linearize blocks stitch --model M --out transfer.safetensors block_*.safetensors
    linearize convert --model M --transfer-state transfer.safetensors ...                           (stage 2 on)
"""

from ..device import placement
from ..errors import LinearizeError
from ..options import add_dtype, add_placement


def _block(text: str) -> tuple[int, int]:
    try:
        start, stop = map(int, text.split(":"))
    except ValueError:
        raise LinearizeError(f"--block takes START:STOP (layers START..STOP-1), got {text!r}") from None
    return start, stop


def _run_dump(args):
    from ..data import pack_sequences
    from ..loading.teacher import load_teacher
    from .blockwise import dump_block_inputs, split_blocks

    teacher, tokenizer = load_teacher(args.model, dtype=placement("cpu", args.dtype)[1])
    sequences = pack_sequences(args.data, tokenizer, args.seq_len, args.tokens // args.seq_len, progress=True)
    blocks = split_blocks(teacher.config.num_hidden_layers, args.blocks)
    dump_block_inputs(teacher, sequences, blocks, args.out)
    print(f"{len(sequences)} sequences x {len(blocks)} blocks written to {args.out}; train each with "
          f"`linearize blocks train --block START:STOP` from: {', '.join(f'{a}:{b}' for a, b in blocks)}")


def _run_train(args):
    from pathlib import Path

    from ..layers.linear_attention import attention_preset
    from ..models.linearized import make_student_attention
    from .blockwise import load_block_teacher, save_block_state, train_block

    block = _block(args.block)
    device, dtype = placement(args.device, args.dtype)
    teacher = load_block_teacher(args.model, block, dtype, device)
    attention = attention_preset(args.attention, window=args.window, feature_map=args.feature_map)
    students = make_student_attention(teacher, attention)
    out = Path(args.out)
    train_block(teacher, students, args.inputs, block, lr=args.lr, checkpoint_dir=out.with_name(out.name + ".ckpt"))
    save_block_state(students, block, out)
    print(f"layers {block[0]}..{block[1] - 1} trained; saved to {out}")


def _run_stitch(args):
    from transformers import AutoConfig

    from ..run_folder import save_tensors
    from .blockwise import stitch_block_states

    num_layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    save_tensors(stitch_block_states(args.blocks, num_layers), args.out)
    print(f"{len(args.blocks)} blocks stitched into {args.out}; continue with "
          f"`linearize convert --model {args.model} --transfer-state {args.out} ...`")


def add(sub):
    from ..layers.linear_attention import ATTENTION_PRESETS

    p = sub.add_parser("blocks", help="block-wise attention transfer for models that do not fit: dump | train | stitch",
                       description=__doc__.splitlines()[0])
    steps = p.add_subparsers(dest="step", required=True)
    d = steps.add_parser("dump", help="store each block's input hidden states (safetensors chunks)")
    d.add_argument("--model", required=True, help="HF model id or folder")
    d.add_argument("--data", help="training text (default: bundled ShareGPT)")
    d.add_argument("--out", required=True, help="folder for the dumped inputs")
    d.add_argument("--blocks", type=int, required=True, help="number of blocks of consecutive layers")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--tokens", type=int, default=131_072, help="transfer tokens (default: %(default)s)")
    add_dtype(d, "the teacher (on the CPU)", "float32")
    d.set_defaults(run=_run_dump)
    t = steps.add_parser("train", help="train the students of one block from its dumped inputs")
    t.add_argument("--model", required=True, help="HF model folder with *.safetensors (only the block is loaded)")
    t.add_argument("--inputs", required=True, help="folder written by `linearize blocks dump`")
    t.add_argument("--block", required=True, help="START:STOP, as printed by dump")
    t.add_argument("--out", required=True, help="block state file (.safetensors)")
    t.add_argument("--attention", default="lolcats", choices=sorted(ATTENTION_PRESETS))
    t.add_argument("--window", type=int)
    t.add_argument("--feature-map")
    t.add_argument("--lr", type=float, default=1e-2)
    add_placement(t, "the block", dtype="float32")
    t.set_defaults(run=_run_train)
    s = steps.add_parser("stitch", help="merge block state files into one transfer state")
    s.add_argument("blocks", nargs="+", help="block state files from `linearize blocks train`")
    s.add_argument("--model", required=True, help="the teacher (for its layer count)")
    s.add_argument("--out", required=True, help="stitched transfer state (.safetensors)")
    s.set_defaults(run=_run_stitch)
