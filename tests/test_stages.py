"""Stage 1 (attention transfer) and stage 2 (LoRA) train what they should, and resume exactly."""

import pytest
import torch

from linearize.finetune.lora import LoraSettings, finetune_lora
from linearize.layers.linear_attention import LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM, make_student_attention
from linearize.transfer.attention_transfer import attention_transfer, layer_transfer_errors, transfer_state

from conftest import interrupted_at_step


def sequences(n=24, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (n, T), generator=g)  # small alphabet: learnable structure


def test_transfer_lowers_layer_error_and_trains_only_feature_maps(tiny_teacher):
    students = make_student_attention(tiny_teacher, LinearAttentionConfig(window=4, chunk_size=8))
    frozen = {n: p.clone() for n, p in tiny_teacher.named_parameters()}
    data = sequences()
    before = layer_transfer_errors(tiny_teacher, students, data[:4])
    attention_transfer(tiny_teacher, students, data, lr=3e-2, progress=False)
    after = layer_transfer_errors(tiny_teacher, students, data[:4])
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    for n, p in tiny_teacher.named_parameters():  # q/k/v/o and everything else untouched
        assert torch.equal(p, frozen[n]), n


def test_mix_lr_trains_the_mixing_factors_at_their_own_rate(tiny_teacher):
    """mix_lr puts the mixing logits in their own optimizer group: with lr = 0 only they move."""
    students = make_student_attention(tiny_teacher, LinearAttentionConfig(window=4, chunk_size=8))
    before = {n: p.clone() for s in students for n, p in s.named_parameters(prefix=str(s.layer_idx))}
    attention_transfer(tiny_teacher, students, sequences(n=6), lr=0.0, mix_lr=0.1, progress=False)
    for s in students:
        for n, p in s.named_parameters(prefix=str(s.layer_idx)):
            moved = not torch.equal(p, before[n])
            assert moved == n.endswith("mix_logit"), n


def test_transfer_resumes_to_the_same_result(tiny_teacher, tmp_path, monkeypatch):
    data = sequences(n=10)
    cfg = LinearAttentionConfig(window=4, chunk_size=8)
    torch.manual_seed(0)
    straight = make_student_attention(tiny_teacher, cfg)
    attention_transfer(tiny_teacher, straight, data, progress=False)

    torch.manual_seed(0)
    interrupted = make_student_attention(tiny_teacher, cfg)
    interrupted_at_step(monkeypatch, 6, lambda: attention_transfer(tiny_teacher, interrupted, data,
                                                                   checkpoint_dir=tmp_path / "ckpt", progress=False))
    resumed = make_student_attention(tiny_teacher, cfg)  # fresh modules: everything comes from the checkpoint
    result = attention_transfer(tiny_teacher, resumed, data, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.tokens == 5 * 32  # only the 5 unfinished steps ran again
    for k, v in transfer_state(straight).items():
        torch.testing.assert_close(transfer_state(resumed)[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_lora_lowers_loss_merges_and_keeps_feature_maps(tiny_teacher, init):
    model = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, chunk_size=8))
    fmaps = {n: p.clone() for n, p in model.named_parameters() if "feature_map" in n}
    q_before = model.attention_modules()[0].q_proj.weight.clone()
    data = sequences(n=30)
    merged, result = finetune_lora(model, data, LoraSettings(rank=4, init=init), lr=1e-2, progress=False)
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < first
    assert isinstance(merged, LinearizedForCausalLM)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not torch.equal(merged.attention_modules()[0].q_proj.weight, q_before)  # adapters merged in
    for n, p in merged.named_parameters():
        if "feature_map" in n:
            assert torch.equal(p, fmaps[n]), n


def test_bad_lora_settings_are_clear():
    from linearize.errors import LinearizeError

    with pytest.raises(LinearizeError, match="lora-init"):
        LoraSettings(init="svd")


def test_resume_guards_against_a_preset_that_changed_meaning(tmp_path):
    """--resume of a run made before a default or a preset changed: refused with the difference named, never a
    silent mix (a stage-1 checkpoint of another attention would load into the new students)."""
    import json
    from dataclasses import asdict

    from linearize.errors import LinearizeError
    from linearize.convert.run_state import RunState
    from linearize.convert.settings import ConvertSettings

    old = asdict(ConvertSettings())
    del old["lora_loss"]  # a run from before --lora-loss existed: it trained stage 2 with next-token CE
    attention = ConvertSettings(sinks=0).attention_config().to_dict()  # and lolcats had no sinks
    del attention["norm"], attention["local_layers"]  # nor these fields: they read as their defaults
    (tmp_path / "progress.json").write_text(json.dumps({"settings": old, "attention": attention, "results": {}}))
    with pytest.raises(LinearizeError) as e:
        RunState(tmp_path, ConvertSettings(), resume=True)
    assert "lora_loss" in str(e.value) and "now means" in str(e.value)
    with pytest.raises(LinearizeError, match="now means"):
        RunState(tmp_path, ConvertSettings(lora_loss="ce"), resume=True)
    RunState(tmp_path, ConvertSettings(lora_loss="ce", sinks=0), resume=True)  # the run's own settings: accepted


def test_resume_reads_the_stage2_attention_default_as_its_value(tmp_path):
    """A run that recorded lora_train_attention False with adapters (the default then) resumes with the default
    None, which means the same; True does not."""
    import json
    from dataclasses import asdict

    from linearize.errors import LinearizeError
    from linearize.convert.run_state import RunState
    from linearize.convert.settings import ConvertSettings

    recorded = ConvertSettings(lora_targets="attention", lora_train_attention=False)
    (tmp_path / "progress.json").write_text(json.dumps({"settings": asdict(recorded), "attention":
                                                        recorded.attention_config().to_dict(), "results": {}}))
    RunState(tmp_path, ConvertSettings(lora_targets="attention"), resume=True)
    with pytest.raises(LinearizeError, match="lora_train_attention"):
        RunState(tmp_path, ConvertSettings(lora_targets="attention", lora_train_attention=True), resume=True)


def test_default_memory_cap_is_the_training_length_and_older_runs_resume(tmp_path):
    """convert caps the memory at seq_len - window - sinks (what a training row holds: no change there) where a cap
    applies, none elsewhere, and with a sparse cache saves the model with the smaller CONVERT_DEFAULT.memory_cap
    (training keeps the training length's); a run recorded before the cap existed, or with another default cap,
    resumes (its training is the same)."""
    import json
    from dataclasses import asdict

    from linearize.convert.run_state import RunState
    from linearize.convert.settings import ConvertSettings
    from linearize.training_free import CONVERT_DEFAULT

    assert ConvertSettings(seq_len=512, window=64, sinks=4, cache=0).attention_config().memory_cap == 444
    cached = ConvertSettings(seq_len=512, window=64, sinks=4)
    assert cached.attention_config().cache and cached.attention_config().memory_cap == CONVERT_DEFAULT.memory_cap < 444
    assert cached.training_attention_config().memory_cap == 444 and not cached.training_attention_config().cache
    assert ConvertSettings(seq_len=512, window=64, sinks=4, memory_cap=32).training_attention_config().memory_cap == 32
    assert ConvertSettings(memory_cap=0).attention_config().memory_cap == 0
    for preset in ("liger-swa", "gated-delta-swa", "transnormer-norm", "hedgehog", "streaming"):
        assert ConvertSettings(attention=preset).attention_config().memory_cap == 0, preset
    attention = ConvertSettings().attention_config().to_dict()
    del attention["memory_cap"]
    (tmp_path / "progress.json").write_text(json.dumps({"settings": asdict(ConvertSettings()), "attention": attention,
                                                        "results": {}}))
    RunState(tmp_path, ConvertSettings(), resume=True)
    attention["memory_cap"] = 764  # the default cap of a cached run before CONVERT_DEFAULT.memory_cap
    (tmp_path / "progress.json").write_text(json.dumps({"settings": asdict(ConvertSettings()), "attention": attention,
                                                        "results": {}}))
    RunState(tmp_path, ConvertSettings(), resume=True)


def test_cache_every_defaults_with_the_cache_and_older_runs_resume(tmp_path):
    """convert re-selects the saved model's cache every CONVERT_DEFAULT.cache_every tokens unless --cache-every says
    otherwise (0 is an error); without a cache it keeps the config's; a run recorded with another default resumes,
    its training being the same (the cache is switched on after it)."""
    import json
    from dataclasses import asdict

    from linearize.convert.run_state import RunState
    from linearize.convert.settings import ConvertSettings
    from linearize.errors import LinearizeError
    from linearize.training_free import CONVERT_DEFAULT

    assert ConvertSettings().attention_config().cache_every == CONVERT_DEFAULT.cache_every
    assert ConvertSettings(cache_every=8).attention_config().cache_every == 8 != CONVERT_DEFAULT.cache_every
    with pytest.raises(LinearizeError, match="cache_every >= 1"):  # 0 is an error, not "the default"
        ConvertSettings(cache_every=0).attention_config()
    assert ConvertSettings(cache=0).attention_config().cache_every == LinearAttentionConfig().cache_every
    attention = ConvertSettings().attention_config().to_dict()
    attention["cache_every"] = CONVERT_DEFAULT.cache_every // 2  # a default that changed since
    (tmp_path / "progress.json").write_text(json.dumps({"settings": asdict(ConvertSettings()), "attention": attention,
                                                        "results": {}}))
    RunState(tmp_path, ConvertSettings(), resume=True)
    with pytest.raises(LinearizeError, match="--resume with different settings"):
        RunState(tmp_path, ConvertSettings(window=128), resume=True)


def test_mix_init_starts_the_model_at_its_window(tiny_teacher):
    """mix_init sets every head's starting weight of the window + sinks; a very large one leaves the linear memory
    no weight: the model then equals its window + sinks alone (the streaming baseline), and resume records it."""
    import copy

    from linearize.layers.linear_attention import attention_preset
    from linearize.convert.settings import ConvertSettings

    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    cfg = attention_preset("lolcats", window=6, sinks=2, chunk_size=8, mix_init=4.0)
    student = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), cfg)
    for m in student.attention_modules():
        torch.testing.assert_close(m.mix(ids.float()), torch.sigmoid(torch.full((m.num_heads,), 4.0)))
    almost_off = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher),
                                                    attention_preset("lolcats", window=6, sinks=2, mix_init=40.0,
                                                                                     heavy=0))
    streaming = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher),
                                                   attention_preset("streaming", window=6, sinks=2))
    usual = LinearizedForCausalLM.from_teacher(tiny_teacher, attention_preset("lolcats", window=6, sinks=2,
                                                                               mix_init=0.0))
    with torch.no_grad():
        ref = streaming(input_ids=ids).logits
        torch.testing.assert_close(almost_off(input_ids=ids).logits, ref)
        assert not torch.allclose(usual(input_ids=ids).logits, ref, atol=1e-3)  # mix 0: the memory has weight
    assert ConvertSettings(mix_init=4.0).attention_config().mix_init == 4.0
    assert ConvertSettings().attention_config().mix_init == 4.0  # the default conversion (lolcats preset)
    assert ConvertSettings().attention_config().heavy == 0 and ConvertSettings(heavy=32).attention_config().heavy == 32
    assert ConvertSettings(attention="gated-delta").attention_config().mix_init == 0.0


def test_local_layers_keep_the_first_layers_window_only(tiny_teacher):
    """--local-layers K overrides the preset: the first K layers have no linear part (no feature maps, no memory in
    the state), the others do; a K that leaves no linearized layer is one clear error."""
    import copy

    from linearize.errors import LinearizeError
    from linearize.convert.settings import ConvertSettings

    assert ConvertSettings().attention_config().local_layers == 0
    cfg = ConvertSettings(local_layers=1, window=6, sinks=2).attention_config()
    assert cfg.local_layers == 1
    student = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), cfg)
    assert [m.config.linear for m in student.attention_modules()] == [False, True]
    assert not any(n.startswith("feature_map_") for n, _ in student.attention_modules()[0].named_parameters())
    with pytest.raises(LinearizeError, match="local_layers"):
        LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher),
                                           ConvertSettings(local_layers=2).attention_config())


def test_feature_dim_sets_the_memory_size(tiny_teacher):
    """--feature-dim F: Hedgehog features of width 2F, so the linear memory holds 2F x (head_dim + 1) numbers per KV
    head; a bad width is one clear error."""
    from linearize.errors import LinearizeError
    from linearize.layers.linear_attention import DecodingState, attention_preset
    from linearize.convert.settings import ConvertSettings

    cfg = ConvertSettings(feature_dim=4, window=6, sinks=2).attention_config()
    assert cfg.feature_dim == 4 and ConvertSettings().attention_config().feature_dim is None
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, cfg)
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    state = DecodingState(len(student.attention_modules()))
    with torch.no_grad():
        student(input_ids=ids, linear_state=state)
    head_dim = student.attention_modules()[0].head_dim
    assert all(s.kv.shape[-2:] == (8, head_dim + 1) for s in state)
    with pytest.raises(LinearizeError, match="feature-dim"):
        attention_preset("lolcats", feature_dim=0)


def test_convert_scores_its_cache_at_the_window_edge_and_resumes_older_runs(tmp_path):
    """convert saves the cache at the window's edge where there is a cache (own positions on request, nothing to
    set without one); training runs without the cache; a run recorded before the setting existed resumes."""
    import json
    from dataclasses import asdict

    from linearize.errors import LinearizeError
    from linearize.convert.run_state import RunState
    from linearize.convert.settings import ConvertSettings

    assert ConvertSettings().attention_config().cache_position == "packed"
    # the cache's learned score: the default where the cache sits at a distance, refused where it cannot read keys
    assert ConvertSettings().saved_cache_score() == "learned"
    assert ConvertSettings(cache_position="own").saved_cache_score() == "recall"
    assert ConvertSettings(cache=0).saved_cache_score() == "recall"
    with pytest.raises(LinearizeError, match="--cache-score learned"):
        ConvertSettings(cache_score="learned", cache_position="own").check()
    assert ConvertSettings().training_attention_config().cache == 0
    assert ConvertSettings(cache_position="own").attention_config().cache_position == "own"
    assert ConvertSettings(cache=0).attention_config().cache_position == "own"
    attention = ConvertSettings().attention_config().to_dict()
    del attention["cache_position"]
    (tmp_path / "progress.json").write_text(json.dumps({"settings": asdict(ConvertSettings()), "attention": attention,
                                                        "results": {}}))
    RunState(tmp_path, ConvertSettings(), resume=True)
    # a run started when the default cache was another (its size and position recorded) resumes with the default:
    # the cache is switched on after training; asked for explicitly, a different cache is a different run
    attention = {**ConvertSettings().attention_config().to_dict(), "cache": 32, "cache_position": "own"}
    (tmp_path / "progress.json").write_text(json.dumps({"settings": asdict(ConvertSettings()), "attention": attention,
                                                        "results": {}}))
    RunState(tmp_path, ConvertSettings(), resume=True)
    with pytest.raises(LinearizeError, match="--resume with different settings"):
        RunState(tmp_path, ConvertSettings(cache=8), resume=True)
