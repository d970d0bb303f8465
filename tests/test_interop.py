"""Hugging Face interop: a converted folder opens with trust_remote_code=True in a process that never imported
linearize, `generate()` decodes with the constant-size state, and `lm_eval --model hf` runs on it (offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearize
from linearize.generate.decoding import Decoder
from linearize.layers.linear_attention import LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM
from linearize.models.remote_code import AUTO_MAP, MODELING_FILE
from linearize.models.state_cache import LinearStateCache
from linearize.run_folder import save_model

ROOT = Path(__file__).parent.parent


def offline_env(tmp_path) -> dict:
    """No hub, a private HF cache (modules, datasets), this checkout's linearize importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def student(tiny_teacher):
    return LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=8, chunk_size=8)).eval()


def test_hf_generate_feeds_one_token_per_step_with_a_constant_state(student):
    prompt = torch.randint(0, 320, (1, 12))  # longer than the window: the state is full after the prompt
    calls = []
    hook = student.register_forward_hook(
        lambda m, args, kw, out: calls.append((kw["input_ids"].shape[1], out.cache.nbytes())), with_kwargs=True)
    out = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                           return_dict_in_generate=True)
    assert isinstance(out.cache, LinearStateCache) and out.cache.get_seq_length() == 21
    assert [n for n, _ in calls] == [12] + [1] * 9  # the prompt once, then one token per step
    assert len({b for _, b in calls}) == 1 and calls[0][1] > 0  # the state's bytes never grow
    hook.remove()
    ours = Decoder(student).generate(prompt, 10)
    assert out.sequences[0, 12:].tolist() == ours


def test_forward_use_cache_continues_its_state(student):
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        first = student(input_ids=ids[:, :15], use_cache=True)
        second = student(input_ids=ids[:, 15:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-4, atol=1e-5)
    assert student(input_ids=ids).get("cache") is None  # scoring and training keep no state


def test_padded_batch_generation_is_refused_in_one_line(student):
    ids = torch.randint(0, 320, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(linearize.LinearizeError, match="padded batches"):
        student.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_every_saved_folder_carries_auto_map_and_modeling_file(student, tiny_tokenizer, tmp_path):
    save_model(student, tiny_tokenizer, tmp_path)  # what `linearize convert` writes
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert "from linearize" in (tmp_path / MODELING_FILE).read_text()
    loaded, _ = linearize.load(tmp_path)  # a loaded and re-saved model keeps them
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (tmp_path / "again" / MODELING_FILE).is_file()


FRESH_PROCESS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, pipeline
assert "linearize" not in sys.modules
run, prompt = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True)
new = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
text = pipeline("text-generation", model=run, trust_remote_code=True)("hello world", max_new_tokens=4,
                                                                       do_sample=False)[0]["generated_text"]
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "new": new, "text": text}))
"""


def test_fresh_process_opens_the_folder_with_trust_remote_code(tiny_converted, tiny_tokenizer, tmp_path):
    student_dir, _ = tiny_converted
    prompt = tiny_tokenizer("the quick brown fox").input_ids
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(student_dir), json.dumps(prompt)],
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "linearize.models.linearized.LinearizedForCausalLM"
    model, _ = linearize.load(student_dir)
    assert got["new"] == Decoder(model).generate(torch.tensor([prompt]), 6)
    hello = tiny_tokenizer("hello world", return_tensors="pt").input_ids
    assert got["text"] == tiny_tokenizer.decode(hello[0].tolist() + Decoder(model).generate(hello, 4))


TASKS = {
    "tiny_choice": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                    "metric_list": [{"metric": "acc"}]},
    "tiny_until": {"output_type": "generate_until", "doc_to_target": "{{target}}",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
}


def test_lm_eval_hf_backend_runs_offline(tiny_converted, tmp_path):
    """The real `lm_eval` command line on the converted folder (loaded with trust_remote_code in a process that never
    imported linearize): a log-likelihood task and a generation task over a local jsonl (json, not yaml: lm_eval
    reads task files as yaml, which json is), with the scores the student gives them computed here. The
    generation targets of the first two questions are the student's own greedy continuations (4 tokens, cut at a
    newline), the third's is not, so exact_match is 2/3."""
    import torch.nn.functional as F

    student_dir, _ = tiny_converted
    model, tokenizer = linearize.load(student_dir)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731

    @torch.no_grad()
    def greedy(text: str, n: int = 4) -> str:
        """n tokens, each the argmax of a full forward pass over everything before it (no cache)."""
        ids = encode(text)
        start = len(ids)
        for _ in range(n):
            ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
            if ids[-1] == tokenizer.eos_token_id:
                break
        return tokenizer.decode(ids[start:]).split(tokenizer.eos_token)[0].split("\n")[0]

    @torch.no_grad()
    def loglikelihood(context: str, choice: str) -> float:
        """log p(" " + choice | context): lm_eval puts its target delimiter " " before each choice."""
        ctx = encode(context)
        cont = encode(f"{context} {choice}")[len(ctx):]
        logp = F.log_softmax(model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:], -1)
        return sum(logp[i, t].item() for i, t in enumerate(cont))

    pairs = [("the quick brown", ["fox", "dog"]), ("hello", ["world", "there"]), ("linear attention is", ["fast", "slow"])]
    own = [greedy(q) for q, _ in pairs]
    targets = [own[0], own[1], " fast"]
    assert own[2] != targets[2]
    docs = [{"question": q, "choices": c, "answer": 0, "target": t} for (q, c), t in zip(pairs, targets)]
    picked_first = [loglikelihood(q, c[0]) > loglikelihood(q, c[1]) for q, c in pairs]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "docs.jsonl")}},
                "test_split": "test", "doc_to_text": "{{question}}", **spec}
        (tasks / f"{name}.yaml").write_text(json.dumps(task))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={student_dir},trust_remote_code=True", "--tasks", ",".join(TASKS), "--include_path",
           str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=offline_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert results["tiny_choice"]["acc,none"] == pytest.approx(sum(picked_first) / 3)
    assert results["tiny_until"]["exact_match,none"] == pytest.approx(2 / 3)
