"""suite=babilong: the story generator against an independent bAbI solver, exact-length prompts with the
facts in order, exact-match scoring, and `python -m train.eval suite=babilong` offline on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

MOVE = re.compile(r"(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.")
TAKE = re.compile(r"(\w+) (?:picked up|got|grabbed|took) the (\w+) there\.")
DROP = re.compile(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.")
GIVE = re.compile(r"(\w+) gave the (\w+) to (\w+)\.")
REL = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
FACT = re.compile("|".join(f"(?:{p.pattern})" for p in (MOVE, TAKE, DROP, GIVE, REL)))


def solve(facts: list[str], question: str) -> str:
    """An independent bAbI solver: replays the facts and answers the question."""
    place, holder, obj_at, history, gives, rels = {}, {}, {}, {}, [], []

    def at(o, p):
        obj_at[o] = p
        if not history.get(o) or history[o][-1] != p:
            history.setdefault(o, []).append(p)

    for f in facts:
        if m := MOVE.fullmatch(f):
            place[m[1]] = m[2]
            for o, h in holder.items():
                if h == m[1]:
                    at(o, m[2])
        elif m := TAKE.fullmatch(f):
            holder[m[2]] = m[1]
            at(m[2], place[m[1]])
        elif m := DROP.fullmatch(f):
            holder[m[2]] = None
        elif m := GIVE.fullmatch(f):
            holder[m[2]] = m[3]
            gives.append((m[1], m[2], m[3]))
        elif m := REL.fullmatch(f):
            rels.append((m[1], m[2], m[3]))
        else:
            raise AssertionError(f"not a bAbI fact: {f!r}")
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return obj_at[m[1]]
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return place[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        h = history[m[1]]
        assert h.count(m[2]) == 1 and h[-1] == m[2]
        return h[-2]
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        (a,) = [a for a, d, b in rels if (d, b) == (m[1], m[2])]
        return a
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        (b,) = [b for a, d, b in rels if (a, d) == (m[1], m[2])]
        return b
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        (g,) = {g for g, o, r in gives if (o, r) == (m[1], m[2])}
        return g
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        (o,) = {o for g, o, r in gives if (g, r) == (m[1], m[2])}
        return o
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        (r,) = {r for g, o, r in gives if (g, o) == (m[1], m[2])}
        return r
    raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3", "qa4", "qa5"])
def test_every_story_is_answered_by_an_independent_solver(task):
    from pelab.train.eval.babilong import STORY_FACTS, make_story

    answers = set()
    for i in range(300):
        story = make_story(task, random.Random(f"t/{task}/{i}"))
        assert solve(story.facts, story.question) == story.answer, (story.facts, story.question)
        assert len(story.facts) >= STORY_FACTS[task][0]
        answers.add(story.answer)
        assert make_story(task, random.Random(f"t/{task}/{i}")) == story  # seeded
    assert len(answers) >= 4  # answers vary


@pytest.fixture(scope="module")
def tok():
    from pelab.data.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def haystack_file(tmp_path_factory) -> Path:
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    return path


def prompt_facts(text: str) -> tuple[list[str], str]:
    context = text.split("<context>\n", 1)[1].split("\n</context>", 1)[0]
    question = re.search(r"Question: (.*)\n", text)[1]
    return [m[0] for m in FACT.finditer(context)], question


@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0])
def test_items_have_the_exact_length_and_the_story_in_order(tok, haystack_file, depth):
    from pelab.train.eval.babilong import Builder, build_item

    hay = np.asarray(tok.encode(haystack_file.read_text()[:200_000]), dtype=np.int64)
    builder = Builder(tok, hay)
    for task in ("qa1", "qa3", "qa5"):
        prompt, story = build_item(builder, task, 700, depth, random.Random(f"{task}/{depth}"))
        assert len(prompt) == 700
        text = tok.decode(prompt)
        facts, question = prompt_facts(text)
        assert facts == story.facts and question == story.question
        assert text.endswith(story.lead)
        ctx = text.split("<context>\n", 1)[1]
        found = list(FACT.finditer(ctx))
        gaps = [b.start() - a.end() for a, b in zip(found, found[1:])]
        if depth is not None:  # kept together
            assert max(gaps) <= 2
        else:  # scattered through the haystack
            assert max(gaps) > 200
    assert build_item(builder, "qa3", 120, None, random.Random(0)) is None  # too short: skipped


class SolverScorer:
    """Greedy 'generation' by the independent solver reading the prompt: every answer right."""

    def __init__(self, tok, wrong: bool = False):
        self.tok, self.wrong = tok, wrong

    def greedy(self, prompts, max_new_tokens, stop=None):
        out = []
        for p in prompts:
            answer = solve(*prompt_facts(self.tok.decode(p)))
            out.append(self.tok.encode(" " + ("nowhere" if self.wrong else answer) + ".\nQuestion"))
        return out


def test_scores_are_exact_match_of_the_generated_answer(tok, haystack_file):
    from pelab.train.eval.babilong import run_babilong
    from pelab.train.eval.suites import SUITES, flat_metrics

    hay = np.asarray(tok.encode(haystack_file.read_text()[:200_000]), dtype=np.int64)
    kw = dict(lengths=[160, 600], samples=3, seed=7)
    right = run_babilong(SolverScorer(tok), tok, hay, 300, **kw)
    wrong = run_babilong(SolverScorer(tok, wrong=True), tok, hay, 300, **kw)
    assert right["tasks"]["qa4"]["grid"] == [[1.0, 1.0]] and right["mean"] == 1.0
    assert right["tasks"]["qa3"]["per_length"]["160"] is None  # qa3 stories do not fit in 160 tokens
    assert wrong["mean"] == 0.0
    m = flat_metrics({"babilong": right})
    assert m["eval/babilong/qa1"] == 1.0 and m["eval/babilong/avg"] == 1.0
    table = "\n".join(SUITES["babilong"].markdown(right))
    assert "| qa3 three supporting facts | 1.000 | - | 1.000 |" in table and "| **mean** | 1.000 |" in table
    depth = run_babilong(SolverScorer(tok), tok, hay, 300, tasks=["qa1"], depths=[0.0, 1.0], **kw)
    assert depth["tasks"]["qa1"]["grid"] == [[1.0, 1.0], [1.0, 1.0]]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """An (untrained) gpt_tiny-shaped checkpoint in the Lightning layout, without a config.yaml."""
    from pelab.models.config import GPTConfig
    from pelab.models.gpt import GPT

    cfg = GPTConfig(name="tiny", vocab_size=50257, n_layer=2, d_model=64, n_head=2, head_dim=32, mlp_hidden=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    path = tmp_path_factory.mktemp("babilong_ckpt") / "tiny.ckpt"
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "pelab": {"model_cfg": cfg.__dict__}, "global_step": 3}, path)
    return path


def test_cli_writes_the_table_and_heat_map_offline_and_deterministically(tiny_ckpt, haystack_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "train.eval",
        f"checkpoint={tiny_ckpt}",
        "suite=babilong",
        "eval.train_len=128",
        f"eval.out_dir={tmp_path}",
        f"babilong.text_file={haystack_file}",
        "babilong.multiples=[1,2]",
        "eval.limit=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = (tmp_path / "eval.json").read_text()
    doc = json.loads(first)["suites"]["babilong"]
    assert (
        doc["lengths"] == [128, 256]
        and doc["samples"] == 2
        and set(doc["tasks"]) == {"qa1", "qa2", "qa3", "qa4", "qa5"}
    )
    for t in doc["tasks"].values():
        assert all(v is None or 0.0 <= v <= 1.0 for v in t["grid"][0])
    assert doc["tasks"]["qa1"]["per_length"]["256"] is not None and doc["tasks"]["qa1"]["example"]["answer"]
    md = (tmp_path / "eval.md").read_text()
    assert "## babilong" in md and "| qa1 single supporting fact |" in md and "![babilong](eval_babilong.png)" in md
    assert (tmp_path / "eval_babilong.png").stat().st_size > 1000
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "eval.json").read_text() == first
