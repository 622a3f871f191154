"""BABILong-style reasoning in a haystack (Kuratov et al. 2024, the long-context suite of RoPE++), generated
by our own code: bAbI-style stories (Weston et al. 2015, tasks qa1-qa5) whose sentences are scattered, in
order, through held-out text, followed by a question whose one-word answer the model must generate.

  * `qa1` single supporting fact: people move between places; "Where is Mary?"
  * `qa2` two supporting facts: people also pick up and drop objects; "Where is the football?" (its carrier's
    latest place);
  * `qa3` three supporting facts: "Where was the football before the kitchen?" (the object's previous place);
  * `qa4` two-argument relations: "The office is north of the kitchen. ..."; "What is north of the kitchen?"
    or "What is the kitchen north of?";
  * `qa5` three-argument relations: people give objects to each other; "Who gave the milk to Jeff?",
    "What did Fred give to Jeff?" or "Who did Fred give the milk to?".

Every story is simulated from `random.Random(f"{seed}/{task}/{length}/{depth}/{i}")`, so every run scores the
same items, and every question has exactly one correct answer. Items are built in token space to an exact
prompt length L (`babilong.multiples` x the training length, or `babilong.lengths`; a cell whose length
cannot hold the instruction, the story and the question is skipped). By default the story's sentences are placed
at sorted uniform-random depths of the haystack (BABILong); `babilong.depths` instead keeps the story together
at each given depth (a grid axis, as in `retrieval`). The prompt ends with "Answer:" and a short lead that
makes the answer the next word (base models, no chat template, as the RoPE++ evaluation of base models); the
score is exact match of the first generated word with the answer (case-insensitive), greedy decoding.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pelab.train.eval.retrieval import Builder, plot_retrieval

log = logging.getLogger("pelab.eval")

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
TASK_NAMES = {
    "qa1": "single supporting fact",
    "qa2": "two supporting facts",
    "qa3": "three supporting facts",
    "qa4": "two-argument relations",
    "qa5": "three-argument relations",
}
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
GIVERS = ("Fred", "Jeff", "Bill", "Mary")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKES = ("picked up", "got", "grabbed", "took")
DROPS = ("dropped", "discarded", "put down", "left")
DIRECTIONS = ("north", "south", "east", "west")
# Sentences per story (inclusive range), as in bAbI: qa3 stories are the longest.
STORY_FACTS = {"qa1": (4, 10), "qa2": (8, 16), "qa3": (12, 24), "qa4": (2, 2), "qa5": (6, 12)}
INSTRUCTION = (
    "I give you a context with facts about people, objects and places hidden in some random text, and a "
    "question. Answer the question with one word, based only on the facts; where something changed, the "
    "latest fact counts.\n<context>\n"
)
MAX_NEW_TOKENS = 6


@dataclass
class Story:
    facts: list[str]
    question: str
    lead: str  # the start of the answer after "Answer:", so that the answer is the next word
    answer: str


class _World:
    """People moving between places and carrying objects; every event is one sentence."""

    def __init__(self, rng: random.Random, people=PEOPLE):
        self.rng, self.people = rng, people
        self.place = {p: None for p in people}
        self.holder = dict.fromkeys(OBJECTS)
        self.obj_place = dict.fromkeys(OBJECTS)
        self.history = {o: [] for o in OBJECTS}  # the places an object has been at, in order
        self.facts: list[str] = []
        self.gives: list[tuple[str, str, str]] = []  # (giver, object, receiver)

    def _at(self, obj: str, place: str | None) -> None:
        self.obj_place[obj] = place
        if place is not None and (not self.history[obj] or self.history[obj][-1] != place):
            self.history[obj].append(place)

    def _go(self, p: str, place: str) -> None:
        self.place[p] = place
        self.facts.append(f"{p} {self.rng.choice(MOVES)} the {place}.")
        for o, h in self.holder.items():
            if h == p:
                self._at(o, place)

    def move(self) -> None:
        p = self.rng.choice(self.people)
        self._go(p, self.rng.choice([x for x in PLACES if x != self.place[p]]))

    def take(self) -> bool:
        free = [o for o in OBJECTS if self.holder[o] is None]
        placed = [p for p in self.people if self.place[p] is not None]
        if not free or not placed:
            return False
        p, o = self.rng.choice(placed), self.rng.choice(free)
        self.holder[o] = p
        self._at(o, self.place[p])
        self.facts.append(f"{p} {self.rng.choice(TAKES)} the {o} there.")
        return True

    def drop(self) -> bool:
        held = [o for o in OBJECTS if self.holder[o] is not None]
        if not held:
            return False
        o = self.rng.choice(held)
        p, self.holder[o] = self.holder[o], None
        self.facts.append(f"{p} {self.rng.choice(DROPS)} the {o}.")
        return True

    def give(self) -> bool:
        held = [o for o in OBJECTS if self.holder[o] is not None]
        if not held:
            return False
        o = self.rng.choice(held)
        giver = self.holder[o]
        # The receiver is at the giver's place (bAbI's "gave ... to"): co-locate them if needed.
        receiver = self.rng.choice([p for p in self.people if p != giver])
        if self.place[receiver] != self.place[giver]:
            self._go(receiver, self.place[giver])
        self.holder[o] = receiver
        self.gives.append((giver, o, receiver))
        self.facts.append(f"{giver} gave the {o} to {receiver}.")
        return True

    def run(self, n: int, weights: dict) -> None:
        events = list(weights)
        while len(self.facts) < n:
            getattr(self, self.rng.choices(events, [weights[e] for e in events])[0])()


def _story(task: str, rng: random.Random) -> Story | None:
    """One story with a uniquely answerable question, or None (the caller draws again)."""
    lo, hi = STORY_FACTS[task]
    n = rng.randint(lo, hi)
    if task == "qa1":
        w = _World(rng)
        w.run(n, {"move": 1})
        p = rng.choice([x for x in PEOPLE if w.place[x] is not None])
        return Story(w.facts, f"Where is {p}?", f"{p} is in the", w.place[p])
    if task in ("qa2", "qa3"):
        w = _World(rng)
        w.run(n, {"move": 3, "take": 2, "drop": 1})
        if task == "qa2":
            held = [o for o in OBJECTS if w.holder[o] is not None and w.place[w.holder[o]] is not None]
            if not held:
                return None
            o = rng.choice(held)
            return Story(w.facts, f"Where is the {o}?", f"The {o} is in the", w.place[w.holder[o]])
        # "before the <last place>" must name one visit: the last place occurs once in the object's history.
        moved = [o for o in OBJECTS if len(w.history[o]) >= 2 and w.history[o].count(w.history[o][-1]) == 1]
        if not moved:
            return None
        o = rng.choice(moved)
        before, last = w.history[o][-2], w.history[o][-1]
        return Story(w.facts, f"Where was the {o} before the {last}?", f"Before the {last}, the {o} was in the", before)
    if task == "qa4":
        a, b, c = rng.sample(PLACES, 3)
        d1, d2 = rng.choice(DIRECTIONS), rng.choice(DIRECTIONS)
        facts = [f"The {a} is {d1} of the {b}.", f"The {c} is {d2} of the {a}."]
        rng.shuffle(facts)
        if rng.random() < 0.5:  # what is d1 of b? -> a
            return Story(facts, f"What is {d1} of the {b}?", f"{d1.capitalize()} of the {b} is the", a)
        return Story(facts, f"What is the {c} {d2} of?", f"The {c} is {d2} of the", a)
    if task == "qa5":
        w = _World(rng, GIVERS)
        w.run(n, {"move": 2, "take": 2, "give": 3, "drop": 1})
        if not w.gives:
            return None
        giver, o, receiver = w.gives[-1]
        kind = rng.choice(("giver", "object", "receiver"))
        if kind == "giver" and sum(x[1:] == (o, receiver) for x in w.gives) == 1:
            return Story(w.facts, f"Who gave the {o} to {receiver}?", "", giver)
        if kind == "object" and sum((x[0], x[2]) == (giver, receiver) for x in w.gives) == 1:
            return Story(w.facts, f"What did {giver} give to {receiver}?", f"{giver} gave {receiver} the", o)
        if kind == "receiver" and sum(x[:2] == (giver, o) for x in w.gives) == 1:
            return Story(w.facts, f"Who did {giver} give the {o} to?", f"{giver} gave the {o} to", receiver)
        return None
    raise ValueError(f"unknown babilong task {task!r}; choose from {TASKS}")


def make_story(task: str, rng: random.Random) -> Story:
    for _ in range(1000):
        story = _story(task, rng)
        if story is not None:
            return story
    raise RuntimeError(f"no answerable {task} story in 1000 draws")  # never seen; a bug if it happens


def first_word(text: str) -> str:
    m = re.search(r"[A-Za-z]+", text)
    return m.group(0).lower() if m else ""


def build_item(builder: Builder, task: str, length: int, depth: float | None, rng: random.Random):
    """(prompt tokens, story) of exactly `length` tokens, or None when the story does not fit."""
    story = make_story(task, rng)
    if depth is None:  # BABILong: each sentence at its own uniform-random depth, in story order
        depths = sorted(rng.random() for _ in story.facts)
    else:
        depths = [depth] * len(story.facts)
    tail = f"\n</context>\n\nQuestion: {story.question}\nAnswer:" + (f" {story.lead}" if story.lead else "")
    prompt = builder.assemble(length, INSTRUCTION, tail, list(zip(depths, story.facts)), rng, builder.hay)
    return None if prompt is None else (prompt, story)


def run_babilong(
    scorer,
    tokenizer,
    haystack: np.ndarray,
    train_len: int,
    tasks=TASKS,
    lengths=None,
    multiples=(1, 2, 4),
    depths=None,
    samples: int = 20,
    seed: int = 1234,
    limit: int | None = None,
) -> dict:
    """Exact-match accuracy per task and length (and depth, when `depths` is given)."""
    builder = Builder(tokenizer, haystack)
    lengths = [int(x) for x in lengths] if lengths else [int(round(float(m) * train_len)) for m in multiples]
    rows = [None] if not depths else [float(d) for d in depths]
    n = min(int(samples), int(limit)) if limit is not None else int(samples)
    stop = lambda gen: "\n" in tokenizer.decode(gen).lstrip()  # noqa: E731
    out = {
        "lengths": lengths,
        "depths": None if not depths else rows,
        "placement": "scattered (BABILong)" if not depths else "together at each depth",
        "samples": n,
        "train_len": int(train_len),
        "metric": "exact match of the first generated word (greedy)",
        "tasks": {},
    }
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown babilong task {task!r}; choose from {list(TASKS)}")
        grid = [[None] * len(lengths) for _ in rows]
        example = None
        for c, L in enumerate(lengths):
            for r, depth in enumerate(rows):
                items = []
                for i in range(n):
                    item = build_item(builder, task, L, depth, random.Random(f"{seed}/{task}/{L}/{depth}/{i}"))
                    if item is not None:
                        items.append(item)
                if not items:
                    continue
                gens = scorer.greedy([p for p, _ in items], MAX_NEW_TOKENS, stop)
                preds = [first_word(tokenizer.decode(g)) for g in gens]
                grid[r][c] = float(np.mean([p == s.answer.lower() for p, (_, s) in zip(preds, items)]))
                if example is None:
                    prompt, story = items[0]
                    example = {
                        "length": L,
                        "facts": story.facts,
                        "question": story.question,
                        "answer": story.answer,
                        "prompt_tail": tokenizer.decode(prompt[-32:]),
                        "prediction": tokenizer.decode(gens[0]),
                    }
        cells = [v for row in grid for v in row if v is not None]
        per_len = {}
        for c, L in enumerate(lengths):
            col = [grid[r][c] for r in range(len(rows)) if grid[r][c] is not None]
            per_len[str(L)] = float(np.mean(col)) if col else None
        res = {
            "name": TASK_NAMES[task],
            "depths": rows,
            "grid": grid,
            "per_length": per_len,
            "mean": float(np.mean(cells)) if cells else None,
            "example": example,
        }
        if not cells:
            res["skipped"] = f"lengths {lengths} are too short for the {task} stories"
        out["tasks"][task] = res
        log.info("babilong %s mean %s", task, "n/a" if not cells else f"{np.mean(cells):.3f}")
    means = [t["mean"] for t in out["tasks"].values() if t["mean"] is not None]
    out["mean"] = float(np.mean(means)) if means else None
    return out


def plot_babilong(result: dict, path: Path, title: str = "") -> Path:
    """Task x length heat map (scattered facts), or one depth x length panel per task (`depths`)."""
    if result["depths"] is not None:
        return plot_retrieval(result, path, title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, lengths = list(result["tasks"]), result["lengths"]
    grid = np.array(
        [[np.nan if v is None else v for v in result["tasks"][t]["grid"][0]] for t in tasks], dtype=float
    ).reshape(len(tasks), len(lengths))
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 3, 0.5 * len(tasks) + 1.6), dpi=100)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=8, rotation=45)
    ax.set_yticks(range(len(tasks)), [f"{t} ({TASK_NAMES[t]})" for t in tasks], fontsize=8)
    ax.set_xlabel("length (tokens)", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="exact match")
    ax.set_title(("BABILong " + title).strip(), fontsize=9)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
