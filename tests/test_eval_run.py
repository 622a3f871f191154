"""`python -m train.eval` end to end on a tiny gpt_tiny checkpoint, offline: all suites write JSON +
table + plots, results are deterministic, ppl at 1x equals the trainer's val/loss, context-extension
overrides, periodic evaluation during training, continued-training init, and the lm-eval adapter."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY
from tests.test_eval_scoring import shared_eval_dir

FAST_EVAL = [
    "eval.limit=2",
    "ppl.multiples=[1,2,4]",
    "retrieval.lengths=[160,256]",
    "retrieval.depths=[0.0,1.0]",
    "babilong.tasks=[qa1,qa4]",
    "babilong.lengths=[256]",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """4 steps of gpt_tiny + RoPE with periodic ppl evaluation every 2 steps and val/loss at step 4."""
    from pelab.train.config import compose
    from pelab.train.run import run

    run_dir = tmp_path_factory.mktemp("eval_run")
    cfg = compose(
        [
            *TINY,
            f"paths.data={data_root}",
            "trainer.max_steps=4",
            "trainer.val_every=4",
            "trainer.ckpt_every=4",
            "optim.lr=3e-3",
            "eval.every=2",
            "eval.suite=ppl_vs_length",
            "eval.limit=2",
            'eval.overrides=["ppl.multiples=[1,2]"]',
        ]
    )
    run(cfg, run_dir)
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def mini_eval_dir(root: Path) -> Path:
    """Two items per task in the bundle's file names and schemas (used when ../shared/data/eval is absent)."""
    rows = {
        "arc_easy.jsonl": [{"query": "Question: Which is a mammal?", "choices": ["shark", "whale"], "gold": 1}] * 2,
        "arc_challenge_validation.jsonl": [
            {
                "question": "Hot or cold: the sun?",
                "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
                "answerKey": "A",
            }
        ]
        * 2,
        "hellaswag_validation_olmes1000.jsonl": [
            {"ind": 1, "query": "Baking: The chef", "choices": ["bakes a cake.", "flies away."], "gold": 0}
        ]
        * 2,
        "openbook_qa.jsonl": [{"query": "The sun is", "choices": ["hot", "cold"], "gold": 0}] * 2,
        "piqa_validation.jsonl": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}] * 2,
        "winogrande_xl_validation.jsonl": [
            {"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo", "answer": "1"}
        ]
        * 2,
        "sciq_validation.jsonl": [
            {
                "question": "What is H2O?",
                "distractor1": "salt",
                "distractor2": "sand",
                "distractor3": "air",
                "correct_answer": "water",
                "support": "",
            }
        ]
        * 2,
        "lambada_openai.jsonl": [{"context": "He opened the door and said hello to", "continuation": "Shane"}] * 2,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, rs in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root


def _eval_cfg(*overrides: str):
    from pelab.train.config import compose

    return compose(list(overrides), config_name="eval")


def test_periodic_eval_metrics_reach_metrics_csv(tiny_run):
    rows = {int(r["step"]): r for r in _rows(tiny_run)}
    for step in (2, 4):
        for key in ("eval/ppl/1x", "eval/loss/1x", "eval/ppl/2x"):
            assert rows[step][key] not in ("", None), (step, key)
    assert float(rows[4]["eval/loss/1x"]) < float(rows[2]["eval/loss/1x"])  # the model learned in between
    assert "eval/ppl/1x" not in rows.get(1, {}) or not rows[1]["eval/ppl/1x"]


def test_ppl_at_training_length_equals_val_loss_and_is_deterministic(tiny_run, tmp_path):
    from pelab.train.eval.run import run_eval

    val = [float(r["val/loss"]) for r in _rows(tiny_run) if r.get("val/loss") and int(r["step"]) == 4][0]
    cfg = _eval_cfg(f"checkpoint={tiny_run}", "suite=ppl_vs_length", "ppl.multiples=[1,2]", f"eval.out_dir={tmp_path}")
    doc = run_eval(cfg)
    one = doc["suites"]["ppl_vs_length"]["lengths"]["1x"]
    assert one["windows"] == 2048 // 64 and one["length"] == 64
    assert abs(one["loss"] - val) < 1e-5, (one["loss"], val)
    first = (tmp_path / "eval.json").read_text()
    run_eval(cfg)
    assert (tmp_path / "eval.json").read_text() == first  # evaluated twice: identical numbers, identical file
    assert (tmp_path / "eval_ppl_vs_length.png").stat().st_size > 1000


def test_cli_runs_every_suite_offline(tiny_run, tmp_path):
    data = shared_eval_dir() or mini_eval_dir(tmp_path / "mini_eval")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "train.eval",
        f"checkpoint={tiny_run}",
        "suite=all",
        f"eval.data_dir={data}",
        *FAST_EVAL,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tiny_run / "eval.json").read_text())
    assert doc["header"]["step"] == 4 and doc["header"]["pe"]["name"] == "rope"
    zs = doc["suites"]["zeroshot"]["tasks"]
    assert list(zs) == [
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "openbookqa",
        "piqa",
        "winogrande",
        "sciq",
        "lambada_openai",
        "boolq",
    ]
    assert zs["boolq"] == {"skipped": zs["boolq"]["skipped"]} and zs["boolq"]["skipped"].startswith(
        "not available offline"
    )
    for task, r in zs.items():
        if task != "boolq":
            assert r["n"] == 2 and 0.0 <= r["acc"] <= 1.0, task
    assert "acc_norm" in zs["arc_easy"] and "acc_norm" not in zs["winogrande"]
    assert zs["lambada_openai"]["perplexity"] > 1
    ppl = doc["suites"]["ppl_vs_length"]["lengths"]
    assert [v["length"] for v in ppl.values()] == [64, 128, 256] and all(v["ppl"] > 1 for v in ppl.values())
    rt = doc["suites"]["retrieval"]["tasks"]
    assert set(rt) == {"passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"}
    assert all(r["mean"] is not None and len(r["grid"][0]) == 2 for r in rt.values())
    md = (tiny_run / "eval.md").read_text()
    for section in (
        "## zeroshot",
        "## ppl_vs_length",
        "## retrieval",
        "## babilong",
        "| arc_easy |",
        "skipped: not available offline",
    ):
        assert section in md
    assert doc["suites"]["babilong"]["tasks"]["qa1"]["per_length"]["256"] is not None
    for png in ("eval_ppl_vs_length.png", "eval_retrieval.png", "eval_babilong.png"):
        assert (tiny_run / png).stat().st_size > 1000
    assert "eval.json" in proc.stdout
    # Bad input: one clear message, exit 2.
    bad = subprocess.run(
        [sys.executable, "-m", "train.eval", f"checkpoint={tmp_path}/nope", "suite=ppl_vs_length"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "not found" in bad.stdout + bad.stderr


def test_context_extension_overrides(tiny_run, tmp_path):
    from pelab.train.eval.run import run_eval

    base = ["suite=ppl_vs_length", "ppl.multiples=[1,4]", f"eval.out_dir={tmp_path}", "eval.limit=2"]
    plain = run_eval(_eval_cfg(f"checkpoint={tiny_run / 'checkpoints' / 'last.ckpt'}", *base))
    abf = run_eval(_eval_cfg(f"checkpoint={tiny_run}", *base, "pe.base=500000"))
    pi = run_eval(_eval_cfg(f"checkpoint={tiny_run}", *base, "pe.scaling=linear", "pe.factor=4"))
    assert (tmp_path / "eval-base500000.json").exists() and (tmp_path / "eval-linear4.json").exists()
    assert abf["header"]["pe"]["base"] == 500000 and abf["header"]["pe_overrides"] == {"base": 500000}
    assert pi["header"]["pe"]["original_max_len"] == 64  # the training length
    losses = [d["suites"]["ppl_vs_length"]["lengths"]["4x"]["loss"] for d in (plain, abf, pi)]
    assert len(set(losses)) == 3  # each override changes the model's positions
    assert json.loads((tmp_path / "eval.json").read_text())["header"]["pe_overrides"] == {}


def test_init_from_for_continued_training(tiny_run):
    from pelab.models.config import GPTConfig
    from pelab.models.gpt import GPT
    from pelab.train.eval.checkpoint import checkpoint_state, init_from, model_state_dict

    state = checkpoint_state(tiny_run / "checkpoints" / "last.ckpt")
    cfg = dict(state["pelab"]["model_cfg"])
    cfg["pe"] = {**cfg["pe"], "base": 500000.0}
    model = GPT(GPTConfig.from_dict(cfg))
    init_from(model, tiny_run, cfg["pe"])
    for k, v in model_state_dict(state).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.pes()[0].base == 500000.0


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed (pip install -e '.[eval]')"
)
def test_lm_eval_adapter_on_a_local_task(tiny_run, tmp_path, monkeypatch):
    import lm_eval
    import pelab.train.eval.lm_eval_adapter as adapter
    from lm_eval.tasks import TaskManager
    from pelab.train.eval.checkpoint import load
    from pelab.train.eval.zeroshot import GPTModel, Scorer, run_zeroshot

    rows = [
        {"question": q, "choices": {"text": ch, "label": ["A", "B", "C"]}, "answerKey": k}
        for q, ch, k in [
            ("Which is a mammal?", ["shark", "whale", "trout"], "B"),
            ("What melts ice?", ["heat", "cold", "dark"], "A"),
            ("Which is a color?", ["seven", "blue", "quickly"], "B"),
            ("Sky at noon?", ["green", "blue", "black"], "B"),
            ("Which floats?", ["rock", "iron", "wood"], "C"),
            ("Fish live in", ["water", "sand", "fire"], "A"),
        ]
    ]
    data = tmp_path / "arc_local.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "".join(
            json.dumps({"text": t, "q": t.split()[0]}) + "\n"
            for t in ["The quick brown fox jumps over the lazy dog. " * 12, "Python is a programming language."]
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(f"""task: pelab_local_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tasks / "rolling.yaml").write_text(f"""task: pelab_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    (tasks / "gen.yaml").write_text(f"""task: pelab_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
output_type: generate_until
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{text}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="pelab",
        model_args=f"checkpoint={tiny_run},batch_size=4",
        tasks=["pelab_local_arc", "pelab_local_text", "pelab_local_gen"],
        task_manager=tm,
        log_samples=True,
    )
    harness = res["results"]["pelab_local_arc"]
    loaded = load(tiny_run)
    scorer = Scorer(GPTModel(loaded.model), loaded.tokenizer, loaded.train_len, batch_size=4)
    ours = run_zeroshot(scorer, {"tasks": ["arc_easy"], "files": {"arc_easy": str(data)}})["tasks"]["arc_easy"]
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    # Rolling log-likelihood (texts longer than the 64-token window) and greedy generation, as our scorer gives them.
    lls = scorer.loglikelihood_rolling([r["text"] for r in map(json.loads, texts.read_text().splitlines())])
    words = sum(len(re.split(r"\s+", r["text"])) for r in map(json.loads, texts.read_text().splitlines()))
    assert res["results"]["pelab_local_text"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(lls) / words), rel=1e-6
    )
    gens = [s["resps"][0][0] for s in res["samples"]["pelab_local_gen"]]
    assert gens == scorer.generate_until(
        [(s["doc"]["q"], {"until": ["."], "max_gen_toks": 5}) for s in res["samples"]["pelab_local_gen"]]
    )
    # The lm_eval command line with the model registered (`pelab-lm-eval`, `python -m train.eval.lm_eval_adapter`).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.eval.lm_eval_adapter",
            "--model",
            "pelab",
            "--model_args",
            f"checkpoint={tiny_run}",
            "--tasks",
            "pelab_local_arc",
            "--include_path",
            str(tasks),
            "--limit",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pelab_local_arc" in proc.stdout and "acc" in proc.stdout
    assert adapter.register() is adapter.lm_class()
