"""Stage 1 (layer- and data-parallel) and stage 2 (DDP) under `torchrun --nproc-per-node 2` on CPU (gloo) give
the single-process result. Run as a script, this file is the torchrun worker."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ATTENTION = dict(feature_map="hedgehog", window=4, chunk_size=8)
BATCH = 2  # global batch: one sequence per rank in data-parallel mode


def make_teacher(layers=4):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def make_data(n=8, T=16):
    return torch.randint(0, 64, (n, T), generator=torch.Generator().manual_seed(1))


def run_all(group=None, out: Path | None = None) -> dict[str, torch.Tensor]:
    """Both stages, single-process (group None) or on the ranks of `group`; returns the trained tensors."""
    from linearize import LinearAttentionConfig, LinearizedForCausalLM
    from linearize.finetune.lora import LoraSettings, finetune_lora
    from linearize.models.linearized import make_student_attention
    from linearize.transfer.attention_transfer import attention_transfer, transfer_state
    from linearize.transfer.distributed import distributed_transfer

    cfg, data, result = LinearAttentionConfig(**ATTENTION), make_data(), {}
    for mode in ("layers", "data"):
        teacher = make_teacher()
        students = make_student_attention(teacher, cfg)
        common = dict(lr=1e-2, batch_size=BATCH, progress=False)
        if group is None:
            attention_transfer(teacher, students, data, **common)
        else:
            distributed_transfer(teacher, students, data, group, mode, checkpoint_dir=out / f"ckpt-{mode}", **common)
        result.update({f"{mode}.{k}": v for k, v in transfer_state(students).items()})
    model = LinearizedForCausalLM.from_teacher(teacher, cfg, students)
    torch.manual_seed(2)
    merged, _ = finetune_lora(model, data, LoraSettings(rank=2), lr=1e-2, batch_size=BATCH, progress=False,
                              data_parallel=group)
    result.update({f"lora.{k}": v for k, v in merged.state_dict().items() if "proj" in k})
    return result


def worker(out: Path):
    from safetensors.torch import save_file

    from linearize.transfer.distributed import init_distributed

    group = init_distributed()
    result = run_all(group, out)
    if group.rank == 0:
        save_file({k: v.detach().contiguous() for k, v in result.items()}, str(out / "result.safetensors"))
    group.close()


def test_torchrun_two_ranks_equal_single_process(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = load_file(str(tmp_path / "result.safetensors"))
    torch.set_num_threads(1)
    single = run_all()
    assert distributed.keys() == single.keys()
    for k, v in single.items():
        torch.testing.assert_close(distributed[k], v.detach(), rtol=1e-4, atol=1e-5, msg=k)
    # both stages moved their weights, so the comparison is not vacuous
    from linearize import LinearAttentionConfig
    from linearize.models.linearized import make_student_attention

    teacher = make_teacher()
    init = make_student_attention(teacher, LinearAttentionConfig(**ATTENTION))[0].feature_map_q.weight
    assert not torch.allclose(single["layers.0.feature_map_q.weight"], init)
    q_proj = teacher.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(single["lora.model.model.layers.0.self_attn.q_proj.weight"], q_proj)


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
