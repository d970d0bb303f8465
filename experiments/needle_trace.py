"""Why a fact hidden in real text is lost by the sparse cache (issue 39 item 2): never selected, selected then
evicted, or kept but not read?

For real-text haystacks (evaluate/real_recall.py, k = 1) the student prefills each prompt while every cache
selection (ops/sparse_cache/segment.select) is watched: per layer and KV head, which of the needle's tokens (the
fact's sentence; its number apart) are still in the cache at the end. Then the same questions are asked of

    teacher        full attention
    student        as converted (its selection: the memory's self-recall error)
    oracle         the student with the needle's tokens always kept by every selection (nothing else changed):
                   if it answers where the student does not, the needle was lost by the selection; if it does not
                   either, it was kept but not read
    oracle, memory off   the oracle with its linear memory switched off (window + sinks + cache): does the memory's
                   mass drown the cached needle?
    oracle_A-B     (--oracle-groups) the oracle in layers A..B only: where must the needle stay?
    surprise_rR    (--surprise) selections rank keys by the student's own NLL of their token (from a first full
                   forward: a score the model cannot have in one pass), max-pooled over R keys either side
    lookahead      (--lookahead N) selections rank keys by the attention the prompt's last N queries (context +
                   question, from a first prefill) give them, summed (SnapKV's vote): a second pass over the prompt
    heavy          (--heavy M) heavy hitters instead of the cache: the keys that drew the most window attention

    python experiments/needle_trace.py RUN --lengths 2048 --trials 2 --surprise 6 --lookahead 32 \
        --oracle-groups 0-14,15-29 --out docs/results/needle_trace.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

import linearize.ops.sparse_cache.segment as segment
from linearize.evaluate.passkey import NAMES, answers_correct
from linearize.evaluate.real_recall import FORMATS, Corpus, real_haystacks
from linearize.generate.decoding import Decoder, prefill
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.models.linearized import without_memory
from linearize.training_free import TrainingFree

ORIGINAL_SELECT = segment.select
ORIGINAL_POOLED = segment.pooled
ORIGINAL_SEGMENT = segment.cached_segment


class Observe:
    """Patches segment.cached_segment: keeps each layer's last `n` queries (B, H, n, d), RoPE'd at their own
    positions, of a prefill: the look-ahead of a prompt's end (its question) for a second pass."""

    def __init__(self, n, n_layers):
        self.n, self.n_layers, self.layer_of, self.q = n, n_layers, {}, {}

    def cached_segment(self, streams, spec, layer, state):
        index = self.layer_of.setdefault(id(state), len(self.layer_of) % self.n_layers)
        last = self.q.get(index)
        q = streams.q if last is None else torch.cat([last, streams.q], dim=2)
        self.q[index] = q[:, :, -self.n:]
        return ORIGINAL_SEGMENT(streams, spec, layer, state)


def lookahead_scores(q_obs, cache, spec, inv_freq) -> torch.Tensor:
    """(B, Hkv, m): the attention the observed queries (B, H, n, d) give each cached key, softmax over the cache,
    summed over the queries and the heads of a group (SnapKV's vote)."""
    from linearize.ops.hybrid.terms import group, per_group
    from linearize.ops.sparse_cache.positions import rope_keys

    k = rope_keys(cache, inv_freq)
    s = per_group(group(q_obs, k.shape[1]), k.transpose(-1, -2)) * spec.scale  # (B, Hkv, G, n, m)
    return s.float().softmax(-1).sum((2, 3))


class Watch:
    """Patches segment.select / segment.pooled: records what each selection keeps of `needle` (positions), and
    with oracle=True makes every selection keep them."""

    def __init__(self):
        self.needle, self.oracle, self.current = set(), False, None
        self.surprise = None  # (nll (T,), pooling radius): selections rank the cached keys by the token's NLL
        self.lookahead, self.look = None, None  # {layer: observed queries}: selections rank by their attention
        self.layers = None  # oracle only in these layers (None: all); layer index from the state's `layer` tag
        self.n_layers = 1
        self.layer_of = {}  # id(state) -> layer index (first-seen order within a prefill)

    def select(self, state, spec, layer):
        index = self.layer_of.setdefault(id(state), len(self.layer_of) % self.n_layers)
        if self.lookahead is not None and index in self.lookahead:
            self.look = lookahead_scores(self.lookahead[index], state.cache, spec, layer.inv_freq)
        self.current = state.cache.position if self.layers is None or index in self.layers else None
        if self.surprise is not None or self.lookahead is not None:
            self.current = state.cache.position
        ORIGINAL_SELECT(state, spec, layer)
        self.current = None

    def pooled(self, errors, radius):
        if self.look is not None:
            errors, self.look = self.look, None
        if self.surprise is not None and self.current is not None:  # rank by the model's own NLL instead
            nll, radius = self.surprise
            at = self.current.long()
            errors = torch.where(at < len(nll), nll[at.clamp(max=len(nll) - 1)], torch.zeros(()))
        out = ORIGINAL_POOLED(errors, radius)
        if self.oracle and self.current is not None and self.needle:
            marks = torch.zeros_like(self.current, dtype=torch.bool)
            for p in self.needle:
                marks |= self.current == p
            out = out.masked_fill(marks, float("inf"))
        return out

    def held(self, state) -> list[int]:
        """Per KV head: how many needle tokens a layer's state holds exact (cache or sinks)."""
        hold = []
        for h in range(state.cache.position.shape[1]):
            pos = set(state.cache.position[0, h].tolist())
            hold.append(len(pos & self.needle))
        return hold


def needle_positions(tokenizer, hay) -> tuple[set, set]:
    """(token positions of the needle sentence, of its number) in token_ids(hay.context) of a real_haystacks k = 1
    haystack."""
    context, ((_, number), about) = hay.context, (hay.questions[0], hay.about[0])
    template = FORMATS[about["format"]][0]
    needle = next(t for t in (template.format(name=name, n=number) for name in NAMES) if t in context)
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    a = context.index(needle)
    b = a + len(needle)
    na = a + needle.index(str(number))
    nb = na + len(str(number))
    sentence = {i for i, (s, e) in enumerate(enc.offset_mapping) if s < b and e > a}
    digits = {i for i, (s, e) in enumerate(enc.offset_mapping) if s < nb and e > na}
    return sentence, digits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--texts", default="python-docs,shakespeare,sharegpt")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--trials", type=int, default=10, help="questions per (text, length)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--oracle-groups", default="", help="also the oracle in these layer groups only, e.g. 0-9,10-19")
    ap.add_argument("--surprise", default="", help="also the student whose cache keeps the keys of the tokens it "
                    "predicted worst (its own NLL from a first full forward), pooled over these radii, e.g. 2,6")
    ap.add_argument("--lookahead", type=int, default=0, help="also the student whose cache keeps the keys the prompt's "
                    "last N queries (context + question, from a first prefill) attend to most (SnapKV's vote)")
    ap.add_argument("--heavy", type=int, default=None,
                    help="also the student with heavy hitters of this size, no cache")
    ap.add_argument("--cache", type=int, default=None, help="the student's cache size (default: as converted)")
    args = ap.parse_args()
    torch.manual_seed(0)
    student, tokenizer = load_student(args.run, "cpu", torch.float32, TrainingFree(cache=args.cache))
    teacher, _ = load_teacher_of(args.run, None, "cpu", torch.float32)
    oracle_off = without_memory(student, keep_cache=True)
    watch = Watch()
    watch.n_layers = len(student.attention_modules())
    segment.select, segment.pooled = watch.select, watch.pooled
    models = {"teacher": teacher, "student": student, "oracle": student, "oracle_memory_off": oracle_off}
    groups = {}
    for g in filter(None, args.oracle_groups.split(",")):
        a, b = (int(x) for x in g.split("-"))
        groups[f"oracle_{g}"] = set(range(a, b + 1))
        models[f"oracle_{g}"] = student
    radii = {f"surprise_r{r}": int(r) for r in filter(None, args.surprise.split(","))}
    models.update({name: student for name in radii})
    if args.lookahead:
        models["lookahead"] = student
    if args.heavy:
        import copy
        models["heavy"] = TrainingFree(heavy=args.heavy).apply(TrainingFree(cache=0).apply(copy.deepcopy(student)))
    rows = []
    t0 = time.time()
    for text in args.texts.split(","):
        corpus = Corpus(text, tokenizer)
        for length in [int(x) for x in args.lengths.split(",")]:
            for hay in real_haystacks(tokenizer, corpus, 1, length, args.trials):
                (question, number), about = hay.questions[0], hay.about[0]
                sentence, digits = needle_positions(tokenizer, hay)
                row = {"text": text, "length": length, **about, "needle_tokens": len(sentence),
                       "digit_tokens": len(digits), "first_needle_position": min(sentence)}
                nll = None
                if radii:
                    ids = tokenizer(hay.context, add_special_tokens=False, return_tensors="pt").input_ids
                    with torch.no_grad():
                        logits = student(input_ids=ids).logits[0, :-1].float()
                    nll = torch.cat([torch.zeros(1), torch.nn.functional.cross_entropy(logits, ids[0, 1:],
                                                                                       reduction="none")])
                if args.lookahead:  # the first pass: the prompt's last queries in every layer
                    observe = Observe(args.lookahead, watch.n_layers)
                    segment.cached_segment = observe.cached_segment
                    prefill(student, tokenizer(hay.context + question, add_special_tokens=False,
                                               return_tensors="pt").input_ids)
                    segment.cached_segment = ORIGINAL_SEGMENT
                for who, model in models.items():
                    watch.lookahead = observe.q if who == "lookahead" else None
                    watch.needle, watch.oracle = sentence, who.startswith("oracle")
                    watch.surprise = (nll, radii[who]) if who in radii else None
                    watch.layers = groups.get(who)
                    watch.layer_of.clear()
                    decoder = Decoder(model)
                    row[who] = answers_correct(decoder, tokenizer, hay.context, [(question, number)])[0]
                    if who == "student" or who.startswith(("oracle", "surprise", "lookahead")):
                        held = [watch.held(s) for s in decoder.cache if s is not None and s.cache is not None]
                        row[f"{who}_held"] = held  # [layer][kv head] needle tokens held at the end
                        per_token = {p: sum(int((st.cache.position[0, h] == p).any()) for st in decoder.cache
                                            if st is not None and st.cache is not None
                                            for h in range(st.cache.position.shape[1])) for p in sorted(sentence)}
                        row[f"{who}_heads_per_token"] = list(per_token.values())
                    if who == "student":
                        watch.needle = digits
                        row["student_digits_held"] = [watch.held(s) for s in decoder.cache
                                                      if s is not None and s.cache is not None]
                rows.append(row)
                ids = tokenizer(hay.context, add_special_tokens=False).input_ids
                print("  needle:", [tokenizer.decode([ids[p]]) for p in sorted(sentence)])
                for who in models:
                    if f"{who}_heads_per_token" in row:
                        print(f"  {who:18s} heads holding each token:", row[f"{who}_heads_per_token"])
                full = sum(1 for layer in row["student_held"] for h in layer if h == len(sentence))
                none = sum(1 for layer in row["student_held"] for h in layer if h == 0)
                heads = sum(len(layer) for layer in row["student_held"])
                answers = " ".join(f"{who}={row[who]:d}" + (
                    f"(needle tokens held per head: {sum(h for layer in row[who + '_held'] for h in layer) / 90:.1f})"
                    if who + "_held" in row else "") for who in models)
                print(f"{text} {length} {about['format']:9s} d={about['depth']} {answers}  needle "
                      f"({len(sentence)} tok) kept whole in {full}/{heads} heads, none in {none}/{heads} "
                      f"[{time.time() - t0:.0f}s]", flush=True)
    summary = {who: sum(r[who] for r in rows) / len(rows) for who in models}
    heads_whole = sum(sum(1 for layer in r["student_held"] for h in layer if h == r["needle_tokens"]) for r in rows)
    heads_none = sum(sum(1 for layer in r["student_held"] for h in layer if h == 0) for r in rows)
    heads = sum(sum(len(layer) for layer in r["student_held"]) for r in rows)
    digits_any = sum(sum(1 for layer in r["student_digits_held"] for h in layer if h > 0) for r in rows)
    summary.update(questions=len(rows), needle_kept_whole_share=heads_whole / heads,
                   needle_lost_share=heads_none / heads, digit_any_kept_share=digits_any / heads)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python experiments/needle_trace.py " + " ".join(
            f"{a}" for a in __import__("sys").argv[1:]), "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
