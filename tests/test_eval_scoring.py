"""Evaluation internals on stub models whose answers the test knows: log-likelihood scoring, acc and
acc_norm as lm-evaluation-harness defines them, prompt formats, data loaders, rolling windows,
greedy generation, retrieval item construction, perplexity windows and context-extension knobs."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pelab.data import hub
from pelab.train.eval import tasks as T
from pelab.train.eval.zeroshot import FnModel, Scorer, mc_predictions, rolling_windows, score_task

from tests.conftest import REPO

V = 50257


def shared_eval_dir() -> Path | None:
    """The offline zero-shot bundle: $PELAB_SHARED_DATA[/eval], $FINEWEB_SAMPLE_DIR/../eval, or ../shared/data/eval."""
    cands = []
    if os.environ.get("PELAB_SHARED_DATA"):
        p = Path(os.environ["PELAB_SHARED_DATA"])
        cands += [p / "eval", p]
    if os.environ.get("FINEWEB_SAMPLE_DIR"):
        cands.append(Path(os.environ["FINEWEB_SAMPLE_DIR"]).parent / "eval")
    cands.append(REPO.parent / "shared" / "data" / "eval")
    return next(
        (c for c in cands if (c / "hf_validation_olmo").is_dir() or (c / "icl_format_llm_foundry").is_dir()), None
    )


def needs_shared_eval() -> Path:
    d = shared_eval_dir()
    if d is None:
        pytest.skip("offline zero-shot bundle ../shared/data/eval not found (set PELAB_SHARED_DATA=<shared/data>)")
    return d


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    from pelab.data.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


def _next_of(t: torch.Tensor) -> torch.Tensor:
    return (t * 31 + 7) % V


class BigramStub:
    """logits(next | prev) = u + 3 * onehot(next_of(prev)): a fixed model whose log-likelihoods the
    test computes directly. Records the longest input it was given."""

    def __init__(self, seed=0, bump=3.0):
        g = torch.Generator().manual_seed(seed)
        self.u = torch.randn(V, generator=g)
        self.bump = bump
        self.max_T = 0
        self.calls = 0

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.max_T = max(self.max_T, idx.shape[1])
        self.calls += 1
        logits = self.u.expand(*idx.shape, V).clone()
        logits.scatter_add_(-1, _next_of(idx)[..., None], torch.full((*idx.shape, 1), self.bump))
        return logits

    def logp(self, prev: int, nxt: int) -> float:
        logits = self.u.clone()
        logits[(prev * 31 + 7) % V] += self.bump
        return float(torch.log_softmax(logits, -1)[nxt])


def direct_ll(stub: BigramStub, tok, context: str, continuation: str) -> float:
    """Sum of log p over the continuation tokens, computed token by token (no batching, no scorer)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    seq = ctx + whole[len(ctx) :]
    return sum(stub.logp(seq[j - 1], seq[j]) for j in range(len(ctx), len(seq)))


# ---- scoring ---------------------------------------------------------------------------------------


def test_loglikelihood_matches_direct_computation_in_any_batching(tok):
    stub = BigramStub()
    reqs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " the city of London"),
        ("The cat sat on the", " mat."),
        ("A", " b c d e f g"),
        ("One two three", " four"),
    ]
    want = [direct_ll(stub, tok, c, x) for c, x in reqs]
    for bs in (1, 2, 16):
        got = Scorer(FnModel(stub), tok, max_length=64, batch_size=bs).loglikelihood(reqs)
        assert [ll for ll, _ in got] == pytest.approx(want, abs=1e-4)
    # Request order does not change a single number (batches are formed by content, not order).
    a = Scorer(FnModel(stub), tok, 64, batch_size=2).loglikelihood(reqs)
    b = Scorer(FnModel(stub), tok, 64, batch_size=2).loglikelihood(reqs[::-1])[::-1]
    assert a == b


def test_fixed_logits_make_one_choice_win_and_acc_norm_divides_by_characters(tok):
    paris, london, rome = (tok.encode(w)[0] for w in (" Paris", " London", " Rome"))
    unigram = torch.zeros(V)
    unigram[paris] = 10.0
    stub = FnModel(lambda idx: unigram.expand(*idx.shape, V))
    scorer = Scorer(stub, tok, max_length=64)
    spec = T.TaskSpec("t", "multiple_choice", ("acc", "acc_norm"), "x", None, "test", T.arc_doc)
    docs = [
        T.arc_doc(
            {
                "question": "Capital of France?",
                "choices": {"text": ["Paris", "London", "Rome"], "label": ["A", "B", "C"]},
                "answerKey": "A",
            }
        ),
        T.arc_doc(
            {
                "question": "Capital of the UK?",
                "choices": {"text": ["Paris", "London", "Rome"], "label": ["A", "B", "C"]},
                "answerKey": "B",
            }
        ),
    ]
    assert docs[0].requests[0] == ("Question: Capital of France?\nAnswer:", " Paris")
    m = score_task(scorer, spec, docs)
    assert m["acc"] == 0.5 and m["acc_norm"] == 0.5  # " Paris" always wins
    # Uniform logits: ll = -n_tokens * log V. The 1-token choice wins on the sum, the long one per character.
    flat = FnModel(lambda idx: torch.zeros(*idx.shape, V))
    doc = T.MCDoc([("Q:", " no"), ("Q:", " a much longer answer")], ["no", "a much longer answer"], 1)
    lls = [ll for ll, _ in Scorer(flat, tok, 64).loglikelihood(doc.requests)]
    n_tokens = [len(tok.encode(" no")), len(tok.encode(" a much longer answer"))]
    assert lls == pytest.approx([-n * math.log(V) for n in n_tokens], rel=1e-5)
    assert mc_predictions(lls, doc.choices) == (0, 1)
    m = score_task(Scorer(flat, tok, 64), spec, [doc])
    assert (m["acc"], m["acc_norm"]) == (0.0, 1.0)
    # Ties go to the first choice, as numpy's argmax does in the harness.
    assert mc_predictions([-1.0, -1.0], ["ab", "cd"]) == (0, 0)


def test_acc_and_acc_norm_against_direct_computation(tok):
    stub = BigramStub(seed=1)
    rng = np.random.default_rng(0)
    words = "red green blue apple river stone quick slow bright dark cold warm tall short".split()
    docs = []
    for i in range(12):
        choices = [" ".join(rng.choice(words, size=rng.integers(1, 5))) for _ in range(4)]
        docs.append(T._mc(f"Question: item {i}?\nAnswer:", choices, int(rng.integers(0, 4))))
    spec = T.TaskSpec("t", "multiple_choice", ("acc", "acc_norm"), "x", None, "test", T.arc_doc)
    m = score_task(Scorer(FnModel(stub), tok, 64, batch_size=5), spec, docs)
    acc, norm = [], []
    for d in docs:
        lls = [direct_ll(stub, tok, c, x) for c, x in d.requests]
        acc.append(float(np.argmax(lls) == d.gold))
        norm.append(float(np.argmax([ll / len(ch) for ll, ch in zip(lls, d.choices)]) == d.gold))
    assert m["acc"] == pytest.approx(np.mean(acc)) and m["acc_norm"] == pytest.approx(np.mean(norm))
    assert m["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))
    assert 0 < m["acc"] < 1 or 0 < m["acc_norm"] < 1  # not a degenerate item set


def test_encode_pair_truncation_and_empty_context(tok):
    stub = BigramStub()
    scorer = Scorer(FnModel(stub), tok, max_length=8)
    ctx, cont = scorer.encode_pair("Answer: ", "yes")  # trailing space moves to the continuation
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = scorer.encode_pair("", "Hello world")
    assert ctx == [tok.eot_id] and tok.decode(cont) == "Hello world"
    long_ctx = " ".join(["word"] * 50)
    ((ll, _),) = scorer.loglikelihood([(long_ctx, " end")])
    assert stub.max_T <= 8  # the model never sees more than max_length tokens
    assert ll == pytest.approx(direct_ll(stub, tok, long_ctx, " end"), abs=1e-4)  # bigram: last token suffices


def test_loglikelihood_task_greedy_acc_and_perplexity(tok):
    stub = BigramStub(bump=40.0)  # the bump token is always the argmax
    ctx = "The last word is"
    prev = tok.encode(ctx)[-1]
    greedy_word = tok.decode([(prev * 31 + 7) % V])
    docs = [T.LLDoc(ctx, greedy_word), T.LLDoc(ctx, " zebra")]
    spec = T.TASKS["lambada_openai"]
    m = score_task(Scorer(FnModel(stub), tok, 64), spec, docs)
    lls = [direct_ll(stub, tok, d.context, d.continuation) for d in docs]
    assert m["acc"] == 0.5
    assert m["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)


def test_rolling_windows_score_every_token_once(tok):
    tokens = list(range(100, 123))
    wins = rolling_windows(tokens, 0, max_length=5)
    assert [t for _, cont in wins for t in cont] == tokens
    assert wins[0][0] == [0]
    for ctx, cont in wins:
        assert len(ctx + cont) - 1 <= 5 + max(0, len(ctx) - 5)
    stub = BigramStub()
    scorer = Scorer(FnModel(stub), tok, max_length=6)
    text = "one two three four five six seven eight nine ten eleven"
    ids = tok.encode(text)
    want = stub.logp(tok.eot_id, ids[0]) + sum(stub.logp(a, b) for a, b in zip(ids, ids[1:]))
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=1e-4)


def test_greedy_generation_and_generate_until(tok):
    stub = BigramStub(bump=40.0)
    vocab_padded = 50304

    def padded(idx):  # a padded vocabulary whose extra ids would win: they must never be generated
        out = torch.full((*idx.shape, vocab_padded), -1e9)
        out[..., :V] = stub(idx)
        out[..., V:] = 1e9
        return out

    scorer = Scorer(FnModel(padded), tok, max_length=64, batch_size=3)
    prompts = [tok.encode("Hello"), tok.encode("A much longer prompt here"), tok.encode("x")]
    gens = scorer.greedy(prompts, 4)
    for p, g in zip(prompts, gens):
        want, prev = [], p[-1]
        for _ in range(4):
            prev = (prev * 31 + 7) % V
            if prev == tok.eot_id:
                break
            want.append(prev)
        assert g == want
    text = tok.decode(gens[0])
    stop = text[1:3]
    out = scorer.generate_until([("Hello", {"until": [stop], "max_gen_toks": 4})])[0]
    assert out == text.split(stop)[0]


# ---- prompt formats and data loading --------------------------------------------------------------


def test_prompt_formats_match_the_harness():
    arc_hf = {
        "question": "Which is a mammal?",
        "choices": {"text": ["shark", "whale"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    arc_icl = {"query": "Question: Which is a mammal?", "choices": ["shark", "whale"], "gold": 1}
    assert T.arc_doc(arc_hf) == T.arc_doc(arc_icl)
    assert T.arc_doc(arc_hf).requests[1] == ("Question: Which is a mammal?\nAnswer:", " whale")
    piqa_hf = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}
    piqa_icl = {"query": "Question: Open a jar\n", "choices": ["twist the lid", "eat the lid"], "gold": 0}
    assert T.piqa_doc(piqa_hf) == T.piqa_doc(piqa_icl)
    wg_hf = {
        "sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    wg_icl = {
        "context_options": [
            "Sarah was a better surgeon than Maria so Sarah",
            "Sarah was a better surgeon than Maria so Maria",
        ],
        "continuation": "got the easier cases.",
        "gold": 1,
    }
    d = T.winogrande_doc(wg_hf)
    assert d == T.winogrande_doc(wg_icl)
    assert d.requests[1] == ("Sarah was a better surgeon than Maria so Maria", " got the easier cases.") and d.gold == 1
    hs = {
        "activity_label": "Baking cookies",
        "ctx_a": "A chef shows pans.",
        "ctx_b": "the pans",
        "endings": ["are [title] washed.", "fly  away."],
        "label": "1",
    }
    d = T.hellaswag_doc(hs)
    assert d.requests[0][0] == "Baking cookies: A chef shows pans. The pans"
    assert d.choices == ["are. washed.", "fly away."] and d.gold == 1
    sciq = {
        "question": "Q?",
        "distractor1": "a",
        "distractor2": "b",
        "distractor3": "c",
        "correct_answer": "d",
        "support": "  Some support.",
    }
    d = T.sciq_doc(sciq)
    assert d.requests[3] == ("Some support.\nQuestion: Q?\nAnswer:", " d") and d.gold == 3
    obqa = {"question_stem": "The sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}, "answerKey": "A"}
    assert T.openbookqa_doc(obqa).requests[0] == ("The sun is", " hot")
    assert T.boolq_doc({"passage": "P.", "question": "is it", "label": 1}).requests == [
        ("P.\nQuestion: is it?\nAnswer:", " no"),
        ("P.\nQuestion: is it?\nAnswer:", " yes"),
    ]
    assert T.lambada_doc({"text": "he said hello to Shane"}) == T.LLDoc("he said hello to", " Shane")
    icl = {"context": "he said hello to", "continuation": "Shane"}
    assert T.lambada_doc(icl) == T.LLDoc("he said hello to", " Shane")


def test_local_files_hub_code_path_and_fail_fast(tmp_path, monkeypatch):
    rows = [
        {"question": f"q{i}?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"} for i in range(5)
    ]
    f = tmp_path / "sub" / "arc_easy_validation.jsonl"
    f.parent.mkdir()
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs, src = T.load_docs(T.TASKS["arc_easy"], data_dir=str(tmp_path), limit=3)
    assert len(docs) == 3 and src["split"] == "validation" and "test split" in src["note"]
    # The hub path is `datasets.load_dataset`; the `json` builder exercises it offline.
    assert T.load_hub_rows("json", None, "train", data_files=str(f)) == rows
    # An unreachable hub fails in seconds with the hint, instead of hanging in retries.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.connection_problem.cache_clear()
    t0 = time.perf_counter()
    from pelab.train.eval.zeroshot import run_zeroshot

    with pytest.raises(hub.HubUnreachable, match="eval.data_dir="):
        run_zeroshot(None, {"tasks": ["arc_easy"], "files": {}}, data_dir=None, hub_timeout=2)
    assert time.perf_counter() - t0 < 10
    # With a data_dir, a task without a local copy is skipped cleanly.
    res = run_zeroshot(None, {"tasks": ["boolq"], "files": {}}, data_dir=str(tmp_path), hub_timeout=2)
    assert res["tasks"]["boolq"]["skipped"].startswith("not available offline")
    hub.connection_problem.cache_clear()


def test_offline_bundle_loads_every_task_with_its_split(monkeypatch):
    data = needs_shared_eval()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.connection_problem.cache_clear()
    want = {
        "arc_easy": (2376, "test"),
        "arc_challenge": (1172, "test"),
        "hellaswag": (1000, "validation"),
        "openbookqa": (500, "test"),
        "piqa": (1838, "validation"),
        "winogrande": (1267, "validation"),
        "sciq": (1000, "validation"),
        "lambada_openai": (5153, "test"),
    }
    for name, (n, split) in want.items():
        docs, src = T.load_docs(T.TASKS[name], data_dir=str(data))
        assert (len(docs), src["split"]) == (n, split), name
        for d in docs[:50]:
            if isinstance(d, T.MCDoc):
                assert 0 <= d.gold < len(d.choices) and len(d.requests) == len(d.choices)
    arc = T.load_docs(T.TASKS["arc_easy"], data_dir=str(data), limit=1)[0][0]
    assert arc.requests[0][0].startswith("Question: ") and arc.requests[0][0].endswith("\nAnswer:")
    with pytest.raises(T.TaskUnavailable, match="not available offline"):
        T.load_docs(T.TASKS["boolq"], data_dir=str(data))
    hub.connection_problem.cache_clear()


# ---- retrieval, perplexity windows, context extension ----------------------------------------------


def test_retrieval_items_have_exact_length_and_depth(tok):
    from pelab.train.eval.retrieval import TASKS as RT
    from pelab.train.eval.retrieval import Builder, run_retrieval, string_match_all

    text = " ".join(f"Sentence number {i} talks about the weather. It was sunny." for i in range(300))
    b = Builder(tok, np.asarray(tok.encode(text)))
    import random

    for task in RT:
        for depth in (0.0, 0.5, 1.0):
            it = b.item(task, 300, depth, random.Random(f"{task}{depth}"))
            assert len(it.prompt) == 300, task
            prompt = tok.decode(it.prompt)
            for a in it.answers:
                assert a in prompt, (task, a)
    it = b.item("passkey", 400, 0.0, random.Random(1))
    first = tok.decode(it.prompt).index(it.answers[0]) / len(tok.decode(it.prompt))
    it = b.item("passkey", 400, 1.0, random.Random(1))
    last = tok.decode(it.prompt).index(it.answers[0]) / len(tok.decode(it.prompt))
    assert first < 0.4 < 0.8 < last
    assert b.item("niah_single", 40, 0.5, random.Random(0)) is None  # too short for the prompt
    assert string_match_all("the numbers are 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)

    class Oracle:  # a scorer that "generates" the right answer: the grid must be all ones
        answers = {}

        def greedy(self, prompts, max_new, stop=None):
            return [tok.encode(" " + ", ".join(self.answers[tuple(p)]) + ".\n") for p in prompts]

    oracle = Oracle()
    real_item = Builder.item

    def spy(self, *a, **k):
        it = real_item(self, *a, **k)
        if it is not None:
            oracle.answers[tuple(it.prompt)] = it.answers
        return it

    Builder.item = spy
    try:
        res = run_retrieval(
            oracle, tok, np.asarray(tok.encode(text)), 100, lengths=[200, 300], depths=[0.0, 1.0], samples=2
        )
    finally:
        Builder.item = real_item
    for task, r in res["tasks"].items():
        assert r["mean"] == 1.0, task
        assert np.array(r["grid"], dtype=float).shape == ((1, 2) if task == "variable_tracking" else (2, 2))


def test_ppl_windows_and_per_position_losses():
    from pelab.train.eval.ppl import ppl_vs_length

    stub = BigramStub()
    lm = FnModel(stub)
    tokens = np.random.default_rng(0).integers(0, V, size=1000)
    res = ppl_vs_length(lm, tokens, 50, [1, 2, 32], max_tokens=400, curve_points=10)["lengths"]
    assert res["1x"]["windows"] == 8 and res["2x"]["windows"] == 4 and "skipped" in res["32x"]
    direct = np.mean([stub.logp(int(a), int(b)) for a, b in zip(tokens[:400], tokens[1:401])])
    assert res["1x"]["loss"] == pytest.approx(-direct, rel=1e-5)
    assert res["2x"]["loss"] == pytest.approx(-direct, rel=1e-5)  # same tokens, bigram model
    assert len(res["2x"]["curve"]["loss"]) == 10 and res["1x"]["ppl"] == pytest.approx(math.exp(res["1x"]["loss"]))


def test_context_extension_knobs():
    from pelab.models.config import GPTConfig
    from pelab.models.gpt import GPT
    from pelab.models.pe.rope import rope_inv_freq
    from pelab.train.eval.checkpoint import CheckpointError, build_model

    tiny = dict(name="t", vocab_size=128, n_layer=2, d_model=64, n_head=2, head_dim=32, mlp_hidden=64)
    # RoPE: overrides go to the constructor (inv_freq is a non-persistent buffer).
    model, pe = build_model({**tiny, "pe": {"name": "rope", "base": 10000.0}}, {"base": 500000.0}, train_len=64)
    assert torch.allclose(model.pes()[0].inv_freq, rope_inv_freq(32, 500000.0)[0])
    model, pe = build_model({**tiny, "pe": {"name": "rope"}}, {"scaling": "yarn", "factor": 4.0}, train_len=64)
    assert pe["original_max_len"] == 64  # defaults to the training length
    assert torch.allclose(model.pes()[0].inv_freq, rope_inv_freq(32, 10000.0, "yarn", 4.0, 64)[0])
    with pytest.raises(CheckpointError, match="pe=alibi cannot extend its context.*grape_m, grape_m_ctx, rope"):
        build_model({**tiny, "pe": {"name": "alibi"}}, {"base": 500000.0}, train_len=64)
    # GRAPE-M: learned frequencies at their RoPE init map exactly onto RoPE's extended frequencies.
    trained = {"name": "grape_m", "base": 10000.0}
    for new, want in [
        ({"base": 500000.0}, rope_inv_freq(32, 500000.0)[0]),
        ({"scaling": "linear", "factor": 8.0}, rope_inv_freq(32, 10000.0, "linear", 8.0)[0]),
        ({"scaling": "yarn", "factor": 8.0, "original_max_len": 64}, rope_inv_freq(32, 10000.0, "yarn", 8.0, 64)[0]),
    ]:
        g = GPT(GPTConfig.from_dict({**tiny, "pe": {**trained, **new}}))
        g.load_state_dict(GPT(GPTConfig.from_dict({**tiny, "pe": trained})).state_dict())  # trained at 10k
        notes = [pe.extend_context(trained) for pe in g.pes()]
        assert all(notes) and torch.allclose(g.pes()[1].freqs()[0], want, rtol=1e-5), new
