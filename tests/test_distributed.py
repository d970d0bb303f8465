"""Stage 1 (layer- and data-parallel) and stage 2 (DDP, FSDP) under `torchrun --nproc-per-node 2` on CPU (gloo)
give the single-process result; FSDP checkpoints hold the single-process layout, written by rank 0 alone, and a
crashed FSDP run resumes to the uninterrupted result. Run as a script, this file is the torchrun worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ATTENTION = dict(feature_map="hedgehog", window=4, chunk_size=8)
BATCH = 2  # global batch: one sequence per rank in data-parallel mode
CRASH_AFTER = 2  # of the 4 stage-2 steps, in the resume test
CKPT_FILES = ["meta.json", "optimizer.safetensors", "tensors.safetensors"]


def make_teacher(layers=4):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def make_data(n=8, T=16):
    return torch.randint(0, 64, (n, T), generator=torch.Generator().manual_seed(1))


def checkpoint_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    assert sorted(p.name for p in folder.iterdir()) == CKPT_FILES
    return {f"{prefix}.{f}.{k}": v for f in ("tensors", "optimizer")
            for k, v in load_file(str(folder / f"{f}.safetensors")).items()}


def run_all(group=None, out: Path = None) -> dict[str, torch.Tensor]:
    """Both stages, single-process (group None) or on the ranks of `group`; returns the trained tensors."""
    from linearize import LinearAttentionConfig, LinearizedForCausalLM
    from linearize.finetune.lora import LoraSettings, finetune_lora
    from linearize.models.linearized import make_student_attention
    from linearize.transfer.attention_transfer import attention_transfer, load_transfer_state, transfer_state
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
    stage1 = transfer_state(students)

    def lora(sequences=data, **kw) -> dict[str, torch.Tensor]:  # stage 2 on a fresh copy of the stage-1 model
        teacher = make_teacher()
        students = make_student_attention(teacher, cfg)
        load_transfer_state(students, stage1)
        torch.manual_seed(2)
        merged, _ = finetune_lora(LinearizedForCausalLM.from_teacher(teacher, cfg, students), sequences,
                                  LoraSettings(rank=2), lr=1e-2, batch_size=BATCH, progress=False, **kw)
        return {k: v for k, v in merged.state_dict().items() if "proj" in k}

    if group is None:  # one process: DDP, FSDP and the resumed FSDP run all give this
        single = lora(checkpoint_dir=out / "ckpt-lora")
        for name in ("lora", "fsdp", "resumed"):
            result.update({f"{name}.{k}": v for k, v in single.items()})
        return result | checkpoint_tensors(out / "ckpt-lora", "fsdp-ckpt")
    if group.rank:  # stage 2: only rank 0 may write a checkpoint (stage 1 in layers mode writes one per rank)
        import linearize.training

        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {group.rank} wrote a checkpoint")

        linearize.training.save_checkpoint = refuse
    result.update({f"lora.{k}": v for k, v in lora(data_parallel=group).items()})
    result.update({f"fsdp.{k}": v for k, v in lora(data_parallel=group, fsdp=True,
                                                   checkpoint_dir=out / "ckpt-fsdp").items()})
    result |= checkpoint_tensors(out / "ckpt-fsdp", "fsdp-ckpt")
    # resume: out-of-vocabulary tokens make step CRASH_AFTER + 1 fail on every rank, after a checkpoint every step
    crashing = data.clone()
    crashing[CRASH_AFTER * BATCH :] = 64
    try:
        lora(crashing, data_parallel=group, fsdp=True, checkpoint_dir=out / "ckpt-resume", checkpoint_every_s=0)
        raise AssertionError("the crashing run did not crash")
    except IndexError:
        pass
    assert json.loads((out / "ckpt-resume" / "meta.json").read_text())["step"] == CRASH_AFTER
    done_rows = data.clone()
    done_rows[: CRASH_AFTER * BATCH] = 0  # a resumed run skips them (a restart from step 0 would not match)
    resumed = lora(done_rows, data_parallel=group, fsdp=True, checkpoint_dir=out / "ckpt-resume")
    result.update({f"resumed.{k}": v for k, v in resumed.items()})
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-data", "ckpt-fsdp", "ckpt-layers", "ckpt-resume",
                                                           "result.safetensors"]  # no rank-suffixed leftovers
    torch.set_num_threads(1)
    single = run_all(out=tmp_path / "single")
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
