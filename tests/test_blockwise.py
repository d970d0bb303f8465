"""Block-wise transfer: dump block inputs to disk, train each block alone, stitch = the one-process result."""

import pytest
import torch

from linearize import LinearAttentionConfig
from linearize.errors import LinearizeError
from linearize.models.linearized import make_student_attention
from linearize.transfer.attention_transfer import attention_transfer, load_transfer_state, transfer_state
from linearize.transfer.blockwise import (BlockInputs, dump_block_inputs, load_block_teacher, save_block_state,
                                          split_blocks, stitch_block_states, train_block)
from test_cli import SMALL
from test_distributed import ATTENTION, make_data, make_teacher

torch.set_num_threads(1)


def fresh_students():
    """A new teacher and its untrained students, as on another machine (same seed, same weights)."""
    teacher = make_teacher()
    return teacher, make_student_attention(teacher, LinearAttentionConfig(**ATTENTION))


def test_split_blocks():
    assert split_blocks(4, 2) == [(0, 2), (2, 4)]
    assert split_blocks(5, 3) == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(LinearizeError):
        split_blocks(4, 5)


def test_blocks_trained_apart_and_stitched_equal_one_process(tmp_path):
    data = make_data()
    teacher, students = fresh_students()
    attention_transfer(teacher, students, data, lr=1e-2, batch_size=2, progress=False)
    expected = transfer_state(students)

    blocks = split_blocks(4, 2)
    make_teacher().save_pretrained(tmp_path / "teacher")
    dump_block_inputs(make_teacher(), data, blocks, tmp_path / "inputs", chunk_rows=3)  # 8 rows: chunks 3, 3, 2
    assert sorted(p.name for p in (tmp_path / "inputs" / "block_2_4").iterdir()) == [
        "chunk_00000.safetensors", "chunk_00001.safetensors", "chunk_00002.safetensors"]
    paths = []
    for block in blocks:  # as on two machines, each holding only its block's layers
        teacher = load_block_teacher(tmp_path / "teacher", block)
        outside = teacher.model.layers[(block[1]) % 4].self_attn.q_proj.weight
        assert outside.is_meta and not teacher.model.layers[block[0]].self_attn.q_proj.weight.is_meta
        students = make_student_attention(teacher, LinearAttentionConfig(**ATTENTION))
        train_block(teacher, students, tmp_path / "inputs", block, lr=1e-2, batch_size=2, progress=False)
        paths.append(tmp_path / f"block_{block[0]}.safetensors")
        save_block_state(students, block, paths[-1])

    _, stitched = fresh_students()
    load_transfer_state(stitched, stitch_block_states(paths, num_layers=4))
    got = transfer_state(stitched)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v.detach(), rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.allclose(expected["3.feature_map_q.weight"], fresh_students()[1][3].feature_map_q.weight)

    with pytest.raises(LinearizeError, match="no block covers layers \\[2, 3\\]"):
        stitch_block_states(paths[:1], num_layers=4)
    with pytest.raises(LinearizeError, match="in both"):
        stitch_block_states([paths[0], paths[0], paths[1]], num_layers=4)
    with pytest.raises(LinearizeError, match="was not dumped"):
        BlockInputs(tmp_path / "inputs", (1, 3))
    with pytest.raises(LinearizeError, match="no dumped block inputs"):
        BlockInputs(tmp_path / "nothing", (0, 2))


def test_blocks_cli_then_convert_equals_plain_convert(tmp_path, model_dir, data_file):  # noqa: F811
    """`linearize blocks dump/train/stitch` + `convert --transfer-state` = `convert` (same data, same stage 1)."""
    import json

    from linearize.cli import main

    model, data = model_dir, data_file
    common = ["--model", str(model)]
    assert main(["blocks", "dump", *common, "--data", str(data), "--out", str(tmp_path / "in"), "--blocks", "2",
                 "--seq-len", "32", "--tokens", "256"]) == 0
    for block in ("0:1", "1:2"):
        assert main(["blocks", "train", *common, "--inputs", str(tmp_path / "in"), "--block", block, "--window", "8",
                     "--out", str(tmp_path / f"b{block[0]}.safetensors")]) == 0
    with pytest.raises(LinearizeError, match="no block covers"):
        stitch_block_states([tmp_path / "b0.safetensors"], num_layers=2)
    assert main(["blocks", "stitch", *common, "--out", str(tmp_path / "t.safetensors"),
                 str(tmp_path / "b0.safetensors"), str(tmp_path / "b1.safetensors")]) == 0
    convert = ["convert", *common, "--data", str(data), *SMALL]
    assert main([*convert, "--out", str(tmp_path / "plain")]) == 0
    assert main([*convert, "--out", str(tmp_path / "blocks"), "--transfer-state", str(tmp_path / "t.safetensors")]) == 0
    plain, blocks = (json.loads((tmp_path / d / "convert.json").read_text()) for d in ("plain", "blocks"))
    assert blocks["stage1_ppl"] == pytest.approx(plain["stage1_ppl"], rel=1e-5)
    assert "transfer" not in blocks  # stage 1 did not run again
