"""Zero-shot task definitions (prompt formats of lm-evaluation-harness 0.4) and their data loaders.

Each task turns one dataset row into a document the scorer understands:
  * `MCDoc`: multiple choice, `requests` = one (context, continuation) per choice, `choices` = the
    strings whose character lengths acc_norm divides by, `gold` = index of the right choice;
  * `LLDoc`: one (context, continuation) scored for greedy match and perplexity (LAMBADA).

Rows come, in this order of preference, from
  1. `zeroshot.files.<task>=<file>` (a .jsonl/.json/.parquet file or a `datasets.save_to_disk` dir);
  2. `eval.data_dir`: the files listed per task below, searched recursively (the offline bundle
     `../shared/data/eval` has HF-schema jsonl, llm-foundry ICL jsonl and the OLMES HellaSwag subsample);
     the harness's split is preferred, another split is used (and reported) when that is all there is;
  3. the Hugging Face hub through `datasets.load_dataset` (the harness's dataset and split),
     after a quick reachability check: with no `eval.data_dir` an unreachable hub stops the suite
     at once with a one-line hint; with one, a task without a local copy is reported as skipped.
Both row schemas are understood by every task: the Hugging Face one (field names of the hub
dataset) and the llm-foundry ICL one (`query/choices/gold`, `context_options/continuation/gold`,
`context/continuation`), mapped onto the harness's prompt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pelab.data.hub import hub_problem

log = logging.getLogger("pelab.eval")

HUB_HINT = (
    "pass eval.data_dir=<dir with local copies> (e.g. ../shared/data/eval, see README 'Evaluation'), "
    "or zeroshot.files.<task>=<file>"
)


class TaskUnavailable(RuntimeError):
    """The task's data cannot be found (locally or on the hub)."""


@dataclass
class MCDoc:
    requests: list[tuple[str, str]]
    choices: list[str]
    gold: int


@dataclass
class LLDoc:
    context: str
    continuation: str


@dataclass(frozen=True)
class Local:
    filename: str  # searched recursively under eval.data_dir
    split: str
    note: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # multiple_choice | loglikelihood
    metrics: tuple[str, ...]
    hub_path: str
    hub_name: str | None
    split: str  # the split lm-evaluation-harness evaluates
    to_doc: Callable[[dict], MCDoc | LLDoc]
    local: tuple[Local, ...] = field(default_factory=tuple)
    source_note: str = ""


# ---- prompt formats (lm-evaluation-harness task yamls) ---------------------------------------------


def _mc(context: str, choices: list[str], gold: int, delimiter: str = " ") -> MCDoc:
    return MCDoc([(context, f"{delimiter}{c}") for c in choices], list(choices), int(gold))


def _icl_question(query: str) -> str:
    """llm-foundry ICL queries `Question: ...` (ARC, PIQA) lack the harness's `\\nAnswer:` suffix."""
    q = query.rstrip("\n")
    return q if q.rstrip().endswith("Answer:") else q + "\nAnswer:"


def arc_doc(row: dict) -> MCDoc:
    if "query" in row:
        return _mc(_icl_question(row["query"]), row["choices"], row["gold"])
    labels = list(row["choices"]["label"])
    return _mc(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]), labels.index(row["answerKey"]))


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag cleaning (WikiHow `[title]`/`[step]` artifacts, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> MCDoc:
    if "query" in row:  # already preprocessed (OLMES subsample, llm-foundry)
        return _mc(row["query"], list(row["choices"]), row["gold"])
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _mc(
        hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        [hellaswag_preprocess(e) for e in row["endings"]],
        int(row["label"]),
    )


def openbookqa_doc(row: dict) -> MCDoc:
    if "query" in row:
        return _mc(row["query"], list(row["choices"]), row["gold"])
    labels = list(row["choices"]["label"])
    return _mc(row["question_stem"], list(row["choices"]["text"]), labels.index(row["answerKey"].lstrip()))


def piqa_doc(row: dict) -> MCDoc:
    if "query" in row:
        return _mc(_icl_question(row["query"]), list(row["choices"]), row["gold"])
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def sciq_doc(row: dict) -> MCDoc:
    if "query" in row:
        return _mc(row["query"], list(row["choices"]), row["gold"])
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _mc(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def winogrande_doc(row: dict) -> MCDoc:
    """Partial scoring: one context per option (the sentence up to the blank, option filled in), the
    shared continuation is the rest of the sentence."""
    if "context_options" in row:
        contexts, rest, gold = list(row["context_options"]), row["continuation"].strip(), int(row["gold"])
    else:
        blank = row["sentence"].index("_")
        contexts = [row["sentence"][:blank] + opt for opt in (row["option1"], row["option2"])]
        rest, gold = row["sentence"][blank + 1 :].strip(), {"1": 0, "2": 1}[str(row["answer"])]
    return MCDoc([(c, " " + rest) for c in contexts], contexts, gold)


def lambada_doc(row: dict) -> LLDoc:
    if "text" in row:
        words = row["text"].split(" ")
        return LLDoc(" ".join(words[:-1]), " " + words[-1])
    return LLDoc(row["context"], " " + row["continuation"].lstrip())


def boolq_doc(row: dict) -> MCDoc:
    return _mc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["label"]))


MC2 = ("acc", "acc_norm")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "arc_easy",
            "multiple_choice",
            MC2,
            "allenai/ai2_arc",
            "ARC-Easy",
            "test",
            arc_doc,
            (
                Local("arc_easy.jsonl", "test"),
                Local("arc_easy_test.jsonl", "test"),
                Local("arc_easy_validation.jsonl", "validation"),
            ),
        ),
        TaskSpec(
            "arc_challenge",
            "multiple_choice",
            MC2,
            "allenai/ai2_arc",
            "ARC-Challenge",
            "test",
            arc_doc,
            (
                Local("arc_challenge.jsonl", "test"),
                Local("arc_challenge_test.jsonl", "test"),
                Local("arc_challenge_validation.jsonl", "validation"),
            ),
        ),
        TaskSpec(
            "hellaswag",
            "multiple_choice",
            MC2,
            "Rowan/hellaswag",
            None,
            "validation",
            hellaswag_doc,
            (
                Local("hellaswag_validation.jsonl", "validation"),
                Local("hellaswag.jsonl", "validation"),
                Local(
                    "hellaswag_validation_olmes1000.jsonl",
                    "validation",
                    "1,000-item OLMES subsample of validation (seed 1234)",
                ),
            ),
        ),
        TaskSpec(
            "openbookqa",
            "multiple_choice",
            MC2,
            "allenai/openbookqa",
            "main",
            "test",
            openbookqa_doc,
            (
                Local("openbookqa_test.jsonl", "test"),
                Local("openbook_qa.jsonl", "test"),
                Local("openbookqa_validation.jsonl", "validation"),
            ),
        ),
        TaskSpec(
            "piqa",
            "multiple_choice",
            MC2,
            "baber/piqa",
            None,
            "validation",
            piqa_doc,
            (Local("piqa_validation.jsonl", "validation"), Local("piqa.jsonl", "validation")),
        ),
        TaskSpec(
            "winogrande",
            "multiple_choice",
            ("acc",),
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            winogrande_doc,
            (Local("winogrande_xl_validation.jsonl", "validation"), Local("winogrande.jsonl", "validation")),
        ),
        TaskSpec(
            "sciq",
            "multiple_choice",
            MC2,
            "allenai/sciq",
            None,
            "test",
            sciq_doc,
            (Local("sciq_test.jsonl", "test"), Local("sciq_validation.jsonl", "validation")),
        ),
        TaskSpec(
            "lambada_openai",
            "loglikelihood",
            ("acc", "perplexity"),
            "EleutherAI/lambada_openai",
            "default",
            "test",
            lambada_doc,
            (Local("lambada_openai_test.jsonl", "test"), Local("lambada_openai.jsonl", "test")),
        ),
        TaskSpec(
            "boolq",
            "multiple_choice",
            ("acc",),
            "aps/super_glue",
            "boolq",
            "validation",
            boolq_doc,
            (Local("boolq_validation.jsonl", "validation"), Local("boolq.jsonl", "validation")),
        ),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


# ---- reading rows ------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json / .parquet file or of a `datasets.save_to_disk` directory."""
    p = Path(path)
    if p.is_dir():
        import datasets  # heavy (~2 s); only for save_to_disk directories

        return list(datasets.load_from_disk(str(p)))
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy; only for parquet files

        return pq.read_table(p).to_pylist()
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=64)
def _find(data_dir: str, filename: str) -> Path | None:
    root = Path(data_dir)
    direct = root / filename
    if direct.exists():
        return direct
    hits = sorted(root.rglob(filename))
    return hits[0] if hits else None


def load_hub_rows(path: str, name: str | None, split: str, data_files=None) -> list[dict]:
    """Rows of a dataset through `datasets.load_dataset` (a hub id, or a builder such as `json` with
    `data_files`: the same code path, testable offline)."""
    import datasets  # heavy (~2 s); only when a task comes from the hub

    kwargs = {"data_files": data_files} if data_files else {}
    return list(datasets.load_dataset(path, name, split=split, **kwargs))


def load_docs(
    spec: TaskSpec,
    data_dir: str | None = None,
    files: dict | None = None,
    limit: int | None = None,
    hub_timeout: float = 5.0,
) -> tuple[list, dict]:
    """(documents, provenance) of a task; `limit` keeps the first documents, as `lm_eval --limit` does."""
    files = files or {}
    rows, source = None, None
    if spec.name in files and files[spec.name]:
        path = Path(files[spec.name]).expanduser()
        if not path.exists():
            raise TaskUnavailable(f"zeroshot.files.{spec.name}={path} does not exist")
        rows, source = read_rows(path), {"source": str(path), "split": "file"}
    elif data_dir:
        if not Path(data_dir).is_dir():
            raise TaskUnavailable(f"eval.data_dir={data_dir} is not a directory")
        for loc in spec.local:
            hit = _find(str(Path(data_dir).resolve()), loc.filename)
            if hit is not None:
                rows = read_rows(hit)
                source = {"source": str(hit), "split": loc.split}
                note = [loc.note] if loc.note else []
                if loc.split != spec.split:
                    note.append(f"the harness evaluates the {spec.split} split; only {loc.split} is available locally")
                if note:
                    source["note"] = "; ".join(note)
                break
    if rows is None:
        problem = hub_problem(hub_timeout)
        if problem:
            where = f"no local copy in eval.data_dir={data_dir}" if data_dir else "no eval.data_dir"
            raise TaskUnavailable(f"not available offline ({where}; hub: {problem})")
        try:
            rows = load_hub_rows(spec.hub_path, spec.hub_name, spec.split)
        except Exception as e:  # noqa: BLE001
            raise TaskUnavailable(
                f"loading {spec.hub_path} ({spec.hub_name}, {spec.split}) from the hub failed: "
                f"{str(e).splitlines()[0][:200]}; {HUB_HINT}"
            ) from None
        source = {"source": f"hf:{spec.hub_path}" + (f"/{spec.hub_name}" if spec.hub_name else ""), "split": spec.split}
    if limit is not None:
        rows = rows[: int(limit)]
    try:
        docs = [spec.to_doc(r) for r in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise TaskUnavailable(
            f"rows of {source['source']} do not fit task {spec.name} ({e.__class__.__name__}: {e})"
        ) from None
    if not docs:
        raise TaskUnavailable(f"{source['source']} holds no rows")
    return docs, source
