"""Saved decoding states (generate/state_file.py): a state saved after a document and loaded again decodes exactly
like the state of prefilling the document again, for every kind of layer state; a state of another model, dtype or a
damaged file is refused with one clear error."""

import pytest
import torch

from linearize.generate.decoding import Decoder, prefill
from linearize.errors import LinearizeError
from linearize.layers.linear_attention import LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM
from linearize.generate.state_file import copy_state, load_state, model_fingerprint, read_state_info, save_state

CONFIGS = {  # every kind of layer state: window + sinks ring, gated delta (log_gate, beta), pure linear (empty
    # window), and a kept softmax layer (no memory, a growing KV window)
    "window+sinks": (LinearAttentionConfig(window=8, sinks=2, chunk_size=8), ()),
    "sparse-cache": (LinearAttentionConfig(window=4, sinks=1, cache=3, cache_every=8, chunk_size=8), ()),
    "cache-at-edge": (LinearAttentionConfig(window=4, sinks=1, cache=3, cache_every=8, chunk_size=8,
                                            cache_position="edge"), ()),
    "heavy-hitters": (LinearAttentionConfig(window=4, sinks=1, heavy=3, chunk_size=8), ()),
    "gated-delta": (LinearAttentionConfig(window=4, gate="key", rule="delta", chunk_size=8), ()),
    "pure-linear": (LinearAttentionConfig(window=0, feature_map="t2r", chunk_size=8), ()),
    "keep-softmax": (LinearAttentionConfig(window=8, chunk_size=8), (1,)),
}


def student(teacher, name):
    attention, keep = CONFIGS[name]
    model = LinearizedForCausalLM.from_teacher(teacher, attention, keep_softmax=keep).eval()
    with torch.no_grad():  # trained-looking attention: the mixing factors away from their 0.5 init
        for a in model.attention_modules():
            if a.mix_logit is not None:
                a.mix_logit.normal_()
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_state_decodes_like_prefilling_again(tiny_teacher, tmp_path, name):
    model = student(tiny_teacher, name)
    g = torch.Generator().manual_seed(1)
    doc, question = torch.randint(0, 320, (1, 45), generator=g), torch.randint(0, 320, (1, 7), generator=g)
    logits, state = prefill(model, doc, block=16)  # 3 blocks
    dec = Decoder(model)
    dec.generate(torch.zeros(1, 0, dtype=torch.long), 6, state=state, state_logits=logits)  # 5 decoding steps
    logits = dec.step(torch.tensor([[3]]))  # and one more: the windows' rings have moved
    if name in ("sparse-cache", "cache-at-edge"):  # the cache holds keys (and their positions) beside the ring
        assert all(len(s.cache) >= 3 and (s.cache.position is not None) == (name == "cache-at-edge") for s in state)
    assert any(s.start for s in state if s is not None) or name == "pure-linear"
    saved = copy_state(state)
    save_state(tmp_path / "s.safetensors", state, logits, model="m1", dtype=torch.float32, document="doc.txt")
    loaded, loaded_logits, meta = load_state(tmp_path / "s.safetensors", "m1", torch.float32)
    assert meta["document"] == "doc.txt" and meta["seen"] == state.seen == 51
    assert torch.equal(loaded_logits, logits)

    def answer(s, first_logits):
        return Decoder(model).generate(question, 12, state=s, state_logits=first_logits)

    assert answer(loaded, loaded_logits) == answer(saved, logits)
    # an empty prompt continues the saved state from its logits
    again, again_logits, _ = load_state(tmp_path / "s.safetensors", "m1", torch.float32)
    assert len(Decoder(model).generate(torch.zeros(1, 0, dtype=torch.long), 4, state=again,
                                       state_logits=again_logits)) == 4


def test_state_of_another_model_dtype_or_damaged_file_is_refused(tiny_converted, tiny_teacher, tmp_path):
    student_dir, teacher_dir = tiny_converted
    fp = model_fingerprint(student_dir)
    assert fp == model_fingerprint(student_dir) and fp != model_fingerprint(teacher_dir)
    model = student(tiny_teacher, "window+sinks")
    logits, state = prefill(model, torch.randint(0, 320, (1, 20)))
    path = tmp_path / "s.safetensors"
    save_state(path, state, logits, model=fp, dtype=torch.float32)
    assert read_state_info(path)["model"] == fp
    with pytest.raises(LinearizeError, match="made by another model"):
        load_state(path, "another", torch.float32)
    with pytest.raises(LinearizeError, match="made in float32.*--dtype float32"):
        load_state(path, fp, torch.bfloat16)
    with pytest.raises(LinearizeError, match="not found"):
        load_state(tmp_path / "missing.safetensors", fp, torch.float32)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(LinearizeError, match="not a readable safetensors"):
        load_state(tmp_path / "bad.safetensors", fp, torch.float32)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # a safetensors file, but not a state
    with pytest.raises(LinearizeError, match="not a linearize decoding state"):
        load_state(tmp_path / "other.safetensors", fp, torch.float32)


def test_cli_prefill_then_generate_from_the_state(tiny_converted, tmp_path, capsys):
    from linearize.cli import main
    from linearize.ops.decode_linear import use_decode_linears
    from linearize.loading.student import load_student

    run = tiny_converted[0]
    doc = tmp_path / "doc.txt"
    doc.write_text("the quick brown fox jumps over the lazy dog. hello world, linear attention is fast. " * 4)
    state = tmp_path / "doc.safetensors"
    assert main(["prefill", str(run), str(doc), "--save", str(state), "--device", "cpu"]) == 0
    assert "tokens prefilled" in capsys.readouterr().out and read_state_info(state)["document"] == str(doc)
    assert main(["generate", str(run), " hello", "--state", str(state), "--raw", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out

    model, tok = load_student(run)
    use_decode_linears(model)
    logits, again = prefill(model, tok(doc.read_text(), return_tensors="pt").input_ids)
    new = Decoder(model).generate(tok(" hello", return_tensors="pt").input_ids, 8, eos_token_id=tok.eos_token_id,
                                  state=again)
    assert answer == tok.decode(new, skip_special_tokens=True) + "\n"

    save_state(tmp_path / "alien.safetensors", again, logits, model="another", dtype=torch.float32)
    capsys.readouterr()
    for argv, match in ((["generate", str(run), "q", "--state", str(tmp_path / "alien.safetensors")], "another model"),
                        (["generate", str(run), "q", "--state", str(tmp_path / "none.safetensors")], "not found"),
                        (["prefill", str(run), str(tmp_path / "none.txt"), "--save", str(state)], "not found")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("linearize: error:") and match in err and "Traceback" not in err, err
