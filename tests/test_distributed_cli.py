"""`torchrun --nproc-per-node 2 -m linearize.cli convert --distributed` (CPU, gloo) end to end: rank 0 alone
writes, layer-parallel stage 1 gives the single-process result, and `--distributed fsdp` (FSDP stage 2) gives
the `--distributed data` (DDP stage 2) result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linearize.cli import main
from test_cli import SMALL, one_error_line


def torchrun_convert(args: list[str], out: Path, *distributed: str, processes: int = 2):
    paths = [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "linearize.cli", *args, "--out", str(out), "--distributed", *distributed]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model saved to") == 1  # one summary, from rank 0


def test_torchrun_convert_equals_single_process(model_dir, data_file, tmp_path):  # noqa: F811
    args = ["convert", "--model", str(model_dir), "--data", str(data_file), *SMALL]
    torchrun_convert(args, tmp_path / "dist")
    assert main([*args, "--out", str(tmp_path / "single")]) == 0

    dist, single = (json.loads((tmp_path / d / "progress.json").read_text())["results"] for d in ("dist", "single"))
    assert dist["layer_mse"] == pytest.approx(single["layer_mse"], rel=1e-5)
    assert dist["stage1_ppl"] == pytest.approx(single["stage1_ppl"], rel=1e-6)
    assert dist["transfer"]["tokens"] == 256 and dist["lora"]["tokens"] == 128
    ckpt = tmp_path / "dist" / "checkpoints" / "transfer"  # per-rank shards merged into the one-process layout
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "optimizer.safetensors", "tensors.safetensors"]
    assert (tmp_path / "dist" / "model.safetensors").is_file()


@pytest.mark.parametrize("targets", ["none", "attention"])
def test_torchrun_convert_fsdp_equals_data(model_dir, data_file, tmp_path, targets):  # noqa: F811
    """Stage 2 sharded by FSDP equals DDP, without adapters (the default) and with LoRA. Adam divides every gradient
    by its own scale, so where a gradient is near zero (the feature maps, trained without adapters: most of their
    entries barely matter on this tiny model) the two reduction orders can end a fraction of one step (lr 1e-3)
    apart: atol 5e-4 there; the perplexities agree to 1e-5."""
    from safetensors.torch import load_file

    args = ["convert", "--model", str(model_dir), "--data", str(data_file), *SMALL, "--lora-targets", targets]
    for mode in ("fsdp", "data"):
        torchrun_convert(args, tmp_path / mode, mode)
    fsdp, data = (json.loads((tmp_path / d / "progress.json").read_text())["results"] for d in ("fsdp", "data"))
    assert fsdp["layer_mse"] == data["layer_mse"]  # stage 1 runs data-parallel in both
    assert fsdp["stage2_ppl"] == pytest.approx(data["stage2_ppl"], rel=1e-5)
    for name in ("model.safetensors", "checkpoints/lora/tensors.safetensors", "checkpoints/lora/optimizer.safetensors"):
        a, b = (load_file(str(tmp_path / mode / name)) for mode in ("fsdp", "data"))
        assert a.keys() == b.keys(), name  # the gathered checkpoint and model: the one-process layout
        for k in a:
            atol = 5e-4 if targets == "none" else 1e-5
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=f"{name}: {k}")
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "lora").iterdir()) == [
        "meta.json", "optimizer.safetensors", "tensors.safetensors"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl)")
def test_torchrun_fsdp_on_one_gpu_equals_single_process(model_dir, data_file, tmp_path):  # noqa: F811
    """The nccl path: FSDP2 stage 2 on one rank (cuda:0, fully_shard over a mesh of one) gives the plain run."""
    from safetensors.torch import load_file

    args = ["convert", "--model", str(model_dir), "--data", str(data_file), *SMALL, "--device", "cuda",
            "--dtype", "float32"]
    torchrun_convert(args, tmp_path / "fsdp", "fsdp", processes=1)
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    fsdp, single = (json.loads((tmp_path / d / "progress.json").read_text())["results"] for d in ("fsdp", "single"))
    assert fsdp["stage2_ppl"] == pytest.approx(single["stage2_ppl"], rel=1e-4)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("fsdp", "single"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("mode", [[], ["fsdp"]])
def test_distributed_without_torchrun_is_one_line(model_dir, data_file, tmp_path, capsys, mode):  # noqa: F811
    one_error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file), "--out",
                            str(tmp_path / "o"), *SMALL, "--distributed", *mode], "torchrun")
