"""--device / --dtype of convert, eval, bench and bench-transfer (checked on the CPU), the bench's in-process
path and the device-generic pieces of the measurements."""

import json

import pytest
import torch

from linearize.bench.measure import PeakMemory
from linearize.bench.run import CPU_DEFAULTS, CUDA_DEFAULTS, BenchSettings, bench
from linearize.cli import main
from linearize.device import placement
from linearize.errors import LinearizeError
from linearize.loading.student import load_student
from linearize.generate.decoding import prefill
from linearize.convert.settings import ConvertSettings

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


@no_cuda
def test_auto_is_the_cpu_in_float32_without_cuda():
    assert placement() == (torch.device("cpu"), torch.float32)
    assert placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert ConvertSettings().placement() == placement()  # convert uses the same helper


@pytest.mark.parametrize("device, dtype, message", [
    ("meta", "auto", "only cpu and cuda"), ("banana", "auto", "is not a device"), ("cpu", "float8", "not supported"),
    pytest.param("cuda", "auto", "torch sees no CUDA device", marks=no_cuda),
    pytest.param("cuda:1", "auto", "torch sees no CUDA device", marks=no_cuda)])
def test_bad_placements_are_clear_errors(device, dtype, message):
    with pytest.raises(LinearizeError, match=message):
        placement(device, dtype)
    with pytest.raises(LinearizeError, match=message):
        ConvertSettings(device=device, dtype=dtype).placement()


@no_cuda
@pytest.mark.parametrize("command", [["eval", "{dir}", "--skip", "mmlu"], ["bench", "{dir}"], ["bench-transfer"],
                                     ["convert", "--out", "{dir}/never"]])
def test_commands_refuse_cuda_without_a_gpu(command, tiny_converted, capsys):
    argv = [a.format(dir=tiny_converted[0]) for a in command] + ["--device", "cuda"]
    assert main(argv) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_bench_defaults_follow_the_device():
    cuda = BenchSettings().resolved("cuda")
    assert cuda.contexts == cuda.decode_contexts == (4096, 8192, 16384, 32768, 65536, 131072)
    assert cuda.teacher_max_context == 131072 and cuda.linears == "stock" and cuda.in_process
    cpu = BenchSettings().resolved("cpu")
    assert (cpu.contexts, cpu.decode_contexts, cpu.teacher_max_context, cpu.linears) == tuple(CPU_DEFAULTS.values())
    assert not cpu.in_process
    mine = BenchSettings(contexts=(64,), teacher_max_context=32, in_process=True).resolved("cpu")
    assert mine.contexts == (64,) and mine.teacher_max_context == 32 and mine.in_process
    assert mine.decode_contexts == CPU_DEFAULTS["decode_contexts"] != CUDA_DEFAULTS["decode_contexts"]


def test_bench_on_cuda_refuses_the_cpu_decode_kernel(tiny_converted, monkeypatch):
    monkeypatch.setattr("linearize.bench.run.placement", lambda *a: (torch.device("cuda"), torch.bfloat16))
    with pytest.raises(LinearizeError, match="CPU kernel"):
        bench(tiny_converted[0], BenchSettings(linears="decode"))


def test_bench_in_process_measures_both_models_once_loaded(tiny_converted):
    student_dir = tiny_converted[0]
    assert main(["bench", str(student_dir), "--in-process", "--device", "cpu", "--contexts", "32,64",
                 "--decode-contexts", "64", "--decode-tokens", "2", "--teacher-max-context", "64"]) == 0
    res = json.loads((student_dir / "bench.json").read_text())
    assert [(p["which"], p["context"]) for p in res["points"]] == [("student", 32), ("teacher", 32),
                                                                   ("student", 64), ("teacher", 64)]
    assert all("error" not in p and p["prefill_tokens_per_s"] > 0 and p["model_rss_bytes"] > 0 for p in res["points"])
    assert [p["context"] for p in res["points"] if "decode_ms_per_token" in p] == [64, 64]
    teacher = {p["context"]: p["cache_bytes"] for p in res["points"] if p["which"] == "teacher"}
    assert teacher[64] == 2 * teacher[32]  # the KV cache grows, as in the fresh-process points
    assert res["settings"]["in_process"] and res["settings"]["linears"] == "decode"
    assert res["machine"]["device"] == "cpu" and res["machine"]["dtype"] == "float32"


def test_cpu_peak_memory_counts_what_a_phase_adds():
    mem = PeakMemory(torch.device("cpu"))
    mem.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so it is resident
    assert mem.peak() >= 60 * 2**20
    del x
    mem.start()
    assert mem.peak() < 32 * 2**20


def test_block_prefill_continues_positions(tiny_converted):
    """prefill in blocks of 16 (positions made on the ids' device by generate.decoding.step_forward) gives the
    full forward's last logits."""
    student = load_student(tiny_converted[0])[0]
    ids = torch.randint(300, (1, 40), generator=torch.Generator().manual_seed(2))
    logits, state = prefill(student, ids, block=16)
    assert state.seen == 40
    torch.testing.assert_close(logits, student(input_ids=ids).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_eval_in_bfloat16_on_the_cpu(tiny_converted):
    student_dir = tiny_converted[0]
    assert main(["eval", str(student_dir), "--device", "cpu", "--dtype", "bfloat16", "--texts", "shakespeare",
                 "--seq-len", "64", "--sequences", "1", "--passkey-lengths", "100", "--passkey-trials", "1",
                 "--skip", "layers,mmlu,multikey,long,realrecall", "--no-progress"]) == 0
    res = json.loads((student_dir / "eval.json").read_text())
    assert res["device"] == {"device": "cpu", "name": "cpu", "dtype": "bfloat16"}
    assert res["settings"]["dtype"] == "bfloat16" and res["texts"]["shakespeare"]["tokens"] == 63
    assert res["passkey"]["lengths"] == [100]
