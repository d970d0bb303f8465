"""linearize report: figures and the self-contained page from (synthetic) convert / eval / bench results."""

import json
import shutil

import pytest

from linearize.cli import main
from linearize.report.page import build_report
from linearize.report.plots import FIGURES

LAYERS = 3


def _write(folder, name, obj):
    (folder / name).write_text(json.dumps(obj))


@pytest.fixture
def run_dir(tmp_path):
    curves = {"transfer": [{"step": i, "tokens": 100 * i, "loss": 1 / i, "layer_mse": [0.1] * LAYERS}
                           for i in (1, 2, 3)],
              "lora": [{"step": i, "tokens": 100 * i, "loss": 3 - i / 10} for i in (1, 2, 3)],
              "layer_mse": [1e-3, 2e-3, 3e-3]}
    texts = {n: {"tokens": 100, "teacher_ppl": 10.0, "student_ppl": 12.0, "kl": 0.2, "top1": 0.8}
             for n in ("sharegpt", "shakespeare")}
    results = {"texts": texts, "layer_mse": {"sharegpt": [1e-3, 2e-3, 4e-3]},
               "passkey": {"lengths": [256, 1024], "tokens": [250, 1030], "trials": 2, "teacher_context": 512,
                           "teacher": [1, None], "student": [1, 0]},  # None: beyond the teacher's context
               "multikey": {"keys": [4, 16], "lengths": [1024, 2048], "trials": 20,
                            "tokens": {"4": [1000, 2010], "16": [1030, 2040]},
                            "teacher": {"4": [1.0, 0.95], "16": [0.9, 0.85]},
                            "student": {"4": [0.35, 0.1], "16": [0.05, 0.0]}},
               "mmlu": {"limit": 1, "num_fewshot": 5, "questions": 57,
                        "teacher": {"acc": 0.3}, "student": {"acc": 0.28}},
               "baseline": {"attention": "streaming", "window": 129, "sinks": 4, "state_bytes": 3,
                            "student_state_bytes": 3,
                            "texts": {n: {**texts[n], "student_ppl": 13.5, "top1": 0.85} for n in texts},
                            "memory_off": {"texts": {n: {**texts[n], "student_ppl": 12.75} for n in texts}}},
               "generation": {"prompts": 50, "max_new_tokens": 64, "prefix": 32, "prefix_match": 7.5, "prefix_equal": 0.1,
                              "repetition": {"teacher": 0.05, "student": 0.31}},
               "long": {"length": 2048, "bands": [[0, 256], [256, 1024], [1024, 2048]],  # evaluate/long.py
                        "state_bytes": {"teacher": 2**22, "student": 2**20, "streaming": 2**20},
                        "all": {who: {"ppl": [10.0, 9.0, 8.0], "ratio": [r, r, r]}
                                for who, r in (("teacher", 1.0), ("student", 1.1), ("streaming", 1.3))},
                        "texts": {"hamlet": {"models": {who: {"ppl": [10.0, 9.0, 8.0], "ratio": [r, r, r]}
                                                        for who, r in (("teacher", 1.0), ("student", 1.1))}}}}}
    points = [{"which": w, "context": c, "prefill_tokens_per_s": 1000.0, "prefill_peak_bytes": 2**20,
               "cache_bytes": 2**20, "decode_ms_per_token": 10.0, "decode_tokens_per_s": 100.0,
               "decode_peak_bytes": 2**21}
              for w in ("teacher", "student") for c in (1024, 2048)]
    bench = {"points": points, "machine": {"cpus": 2, "threads": 2},
             "targets": {"decode_speedup_16k": {"value": 3.5, "target": ">= 3", "met": True}}}
    _write(tmp_path, "curves.json", curves)
    _write(tmp_path, "convert.json", {"settings": {}, "teacher_ppl": 10.0, "stage1_ppl": 14.0, "stage2_ppl": 12.0})
    _write(tmp_path, "eval.json", results)
    _write(tmp_path, "bench.json", bench)
    return tmp_path


def test_report_embeds_every_figure(run_dir):
    page = build_report(run_dir).read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert sorted(p.stem for p in (run_dir / "report").glob("*.png")) == sorted(FIGURES)
    assert "12.00" in page and "MMLU 5-shot" in page and "decode_speedup_16k" in page
    assert "streaming 4+129" in page and "13.50" in page  # the baseline of equal state bytes, beside the student
    assert "memory off" in page and "12.75" in page  # the student without its linear memory
    assert "student 31.0%" in page  # the repetition rate of the generation part
    assert "<td>16 keys, one asked</td><td>2048</td><td>85%</td><td>0%</td>" in page  # the recall table
    assert "<td>passkey</td><td>1024</td><td>-</td><td>0%</td>" in page  # the teacher not asked beyond its context
    assert "<script" not in page and "http" not in page  # self-contained


def test_eval_tables_print_a_teacher_not_asked_beyond_its_context(run_dir, capsys):
    from linearize.evaluate.cli import print_tables

    res = json.loads((run_dir / "eval.json").read_text())
    print_tables({k: res[k] for k in ("passkey", "multikey")})
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the titles
    assert "teacher: - beyond its 512-token context" in out and "│ 1030 │ - │ 0% │" in out


def test_report_with_only_convert_results_says_what_is_missing(run_dir):
    (run_dir / "eval.json").unlink()
    (run_dir / "bench.json").unlink()
    page = build_report(run_dir).read_text()
    assert page.count("data:image/png;base64,") == 2  # loss curves, layer error from convert
    assert page.count("no data yet") == len(FIGURES) - 2


def test_report_command_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "run `linearize convert`" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text("{broken")
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir):
    assert main(["report", str(run_dir), "--screenshot"]) == 0
    assert (run_dir / "report" / "screenshot.png").stat().st_size > 10_000
