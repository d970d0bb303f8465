"""linearize bench: the shared decoder, one measurement, the targets and the command (tiny model)."""

import json

import pytest
import torch

import linearize
from linearize.generate.decoding import Decoder
from linearize.bench.measure import measure_point
from linearize.bench.run import BenchSettings, targets
from linearize.errors import LinearizeError
from linearize.cli import main
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of


@pytest.fixture(scope="module")
def pair(tiny_converted):
    return load_teacher_of(tiny_converted[0])[0], load_student(tiny_converted[0])[0]


def _prompt(n=40):
    return torch.randint(300, (1, n), generator=torch.Generator().manual_seed(1))


def test_student_decoder_matches_generate_ids(pair):
    student = pair[1]
    ids, _ = linearize.generate_ids(student, _prompt(), max_new_tokens=6)
    assert Decoder(student).generate(_prompt(), 6) == ids[0, 40:].tolist()


def test_teacher_decoder_matches_full_forward(pair):
    teacher = pair[0]
    new = Decoder(teacher).generate(_prompt(), 5)
    ids = _prompt()
    for token in new:  # recompute every step without a cache
        assert teacher(ids).logits[0, -1].argmax().item() == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_student_cache_is_constant_and_teacher_cache_grows(pair):
    sizes = {}
    for name, model in zip(("teacher", "student"), pair):
        for n in (32, 128):
            dec = Decoder(model)
            dec.prefill(_prompt(n))
            sizes[name, n] = dec.cache_bytes()
    assert sizes["student", 32] == sizes["student", 128] > 0
    assert sizes["teacher", 128] == 4 * sizes["teacher", 32]


def test_measure_reports_speed_and_memory(pair):
    r = measure_point(pair[1], context=64, decode_tokens=3)
    assert r["context"] == 64 and r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0
    assert r["cache_bytes"] == r["cache_bytes_after_decode"] > 0 and r["model_rss_bytes"] > 0
    assert "decode_ms_per_token" not in measure_point(pair[1], context=64, decode_tokens=0)


def test_measure_times_each_phase_on_a_known_clock(pair, monkeypatch):
    """measure_point on a clock that moves 1 ms per nn.Linear call and stands still otherwise: a forward pass (the
    64-token prefill in one chunk, one decoding step) runs each of the model's 2 x 7 + 1 linear layers (q, k, v,
    o, gate, up, down per layer and lm_head) once, so every time it reports is known: 15 ms per pass."""
    from linearize.bench import measure

    student = pair[1]
    linears = [m for m in student.modules() if isinstance(m, torch.nn.Linear)]
    n = 7 * student.config.num_hidden_layers + 1
    assert len(linears) == n == 15
    clock = [0.0]
    handles = [m.register_forward_hook(lambda *_: clock.__setitem__(0, clock[0] + 1e-3)) for m in linears]
    monkeypatch.setattr(measure, "now", lambda device: clock[0])
    try:
        r = measure_point(student, context=64, decode_tokens=3)
    finally:
        for h in handles:
            h.remove()
    assert r["prefill_s"] == pytest.approx(n / 1000) and r["prefill_tokens_per_s"] == pytest.approx(64 * 1000 / n)
    assert r["decode_ms_per_token"] == pytest.approx(n) and r["decode_tokens_per_s"] == pytest.approx(1000 / n)
    # one token through every linear layer: the whole of a step here, where only the linear layers take time
    assert r["linear_layers_ms"] == pytest.approx(n)


def test_targets_from_points():
    def point(which, c, tps, pre, cache):
        return {"which": which, "context": c, "decode_tokens_per_s": tps, "prefill_tokens_per_s": pre,
                "cache_bytes": cache}

    points = [point("student", 1024, 100, 500, 7), point("student", 16384, 90, 450, 7),
              point("teacher", 16384, 20, 150, 9)]
    t = targets(points, BenchSettings(decode_contexts=(1024, 16384)))
    assert t["student_cache_constant"] == {"value": [7], "target": t["student_cache_constant"]["target"], "met": True}
    assert t["student_decode_flat"] == {"value": [0.9, 1.0], "target": t["student_decode_flat"]["target"], "met": True}
    assert t["decode_speedup_16k"]["value"] == 4.5 and t["decode_speedup_16k"]["met"]
    assert t["prefill_speedup_16k"]["value"] == 3.0 and t["student_cache_constant"]["met"]
    assert targets([], BenchSettings(decode_contexts=(1024,)))["decode_speedup_16k"]["met"] is None
    strict = targets(points, BenchSettings(decode_contexts=(1024, 16384), decode_speedup=5.0))  # the bench's setting
    assert strict["decode_speedup_16k"]["target"] == ">= 5" and not strict["decode_speedup_16k"]["met"]
    grown = targets([*points, point("student", 4096, 95, 480, 8)], BenchSettings(decode_contexts=(1024, 4096, 16384)))["student_cache_constant"]
    assert grown["value"] == [7, 8] and not grown["met"]
    one = targets(points[:1], BenchSettings(decode_contexts=(1024,)))["student_cache_constant"]  # one context cannot show a constant cache
    assert one["met"] is None


def test_bench_command_writes_bench_json(tiny_converted):
    student_dir = tiny_converted[0]
    # one point (a fresh process each: ~5 s); --teacher-max-context skips the teacher's, which run the same way
    assert main(["bench", str(student_dir), "--contexts", "48", "--decode-contexts", "48,96", "--decode-tokens", "2",
                 "--teacher-max-context", "32"]) == 0
    res = json.loads((student_dir / "bench.json").read_text())
    assert [(p["which"], p["context"]) for p in res["points"]] == [("student", 48), ("student", 96)]
    assert all("error" not in p and p["decode_tokens_per_s"] > 0 for p in res["points"])
    assert res["targets"]["student_cache_constant"]["met"]  # the same bytes after 48 and 96 tokens
    assert res["settings"]["linears"] == "decode" and res["points"][0]["linears"] == "decode"
    with pytest.raises(LinearizeError, match="unknown --linears"):
        BenchSettings(linears="packed").check()


def test_bench_passes_the_students_training_free_settings_to_its_processes(tiny_converted):
    """--cache 4 --cache-every 2 --cache-position packed reach the fresh measuring process (BenchSettings.student):
    the state it reports is that of the student so set (evaluate/baseline.state_bytes after the same prompt), and
    the results file is named after them."""
    from linearize.bench.run import bench_file
    from linearize.generate.decoding import Decoder
    from linearize.loading.student import load_student
    from linearize.training_free import TrainingFree

    student_dir = tiny_converted[0]
    flags = ["--cache", "4", "--cache-every", "2", "--cache-position", "packed"]
    assert main(["bench", str(student_dir), "--contexts", "48", "--decode-contexts", "48", "--decode-tokens", "2",
                 "--teacher-max-context", "32", *flags]) == 0
    student = TrainingFree(cache=4, cache_every=2, cache_position="packed")
    assert student.flags() == flags
    name = bench_file(BenchSettings(student=student))
    assert name == "bench_cache4_every2_packed.json"
    assert bench_file(BenchSettings(student=student, eager_decode=True)) == "bench_cache4_every2_packed_eager_decode.json"
    res = json.loads((student_dir / name).read_text())
    assert res["settings"]["student"] == {"cache": 4, "cache_every": 2, "cache_position": "packed"}
    def prefilled_bytes(model):  # what a point reports: the state after its prompt (any tokens: shapes only)
        dec = Decoder(model)
        dec.prefill(torch.zeros(1, 48, dtype=torch.long))
        return dec.cache_bytes()

    set_so = load_student(student_dir, training_free=student)[0]
    plain = load_student(student_dir)[0]
    assert res["points"][0]["cache_bytes"] == prefilled_bytes(set_so) != prefilled_bytes(plain)


def test_repeated_points_keep_their_medians(tiny_converted):
    """--repeats R: every point measured R times (teacher and student in turn), the point keeps the medians of the
    timed fields and the measurements under "repeats"; an error in any measurement is the point's."""
    from linearize.bench.run import bench, median_point

    runs = [{"which": "student", "context": 8, "decode_ms_per_token": ms, "decode_tokens_per_s": 1000 / ms,
             "cache_bytes": 5} for ms in (30.0, 10.0, 20.0)]
    point = median_point(runs)
    assert point["decode_ms_per_token"] == 20.0 and point["decode_tokens_per_s"] == 50.0
    assert point["cache_bytes"] == 5 and [r["decode_ms_per_token"] for r in point["repeats"]] == [30.0, 10.0, 20.0]
    assert median_point(runs[:1]) == runs[0] and "repeats" not in runs[0]
    failed = {"which": "student", "context": 8, "error": "timed out"}
    assert median_point([runs[0], failed]) == failed
    log = []
    res = bench(tiny_converted[0], BenchSettings(contexts=(16,), decode_contexts=(16,), decode_tokens=2,
                                                 in_process=True, repeats=2, linears="stock"), log=log.append)
    assert [(p["which"], len(p["repeats"])) for p in res["points"]] == [("student", 2), ("teacher", 2)]
    assert [line.split(" (")[0] for line in log] == ["bench: student at context 16", "bench: teacher at context 16"] * 2
    with pytest.raises(LinearizeError, match="--repeats"):
        BenchSettings(repeats=0).check()


def test_bench_rejects_a_folder_without_a_model(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "not a converted model folder" in capsys.readouterr().err
