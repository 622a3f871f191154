"""Zero-shot scoring as lm-evaluation-harness does it, for any model that maps token ids to logits.

The scorer needs only `logits_at(idx, rows)`; `FnModel` wraps any `logits_fn(idx) -> (B, T, V)`
(tests use fixed-logit stubs) and `GPTModel` wraps a pelab `GPT`, forming logits only at the rows
that are scored (never (B, T, V) for a whole batch) under bf16 autocast on GPU.

Definitions follow lm-evaluation-harness 0.4 (`lm_eval/api/model.py` TemplateLM, `api/task.py`
ConfigurableTask, `models/huggingface.py`):
  * a request is (context, continuation); trailing whitespace of the context moves to the
    continuation; continuation tokens = tokens(context + continuation) minus the tokens of the
    context; an empty context is replaced by the end-of-text token;
  * the model sees (context + continuation)[-(max_length + 1):][:-1]; the log-likelihood is the sum
    of the continuation tokens' log-probabilities; `is_greedy` = every continuation token is the argmax;
  * multiple choice: acc = [argmax_i ll_i == gold], acc_norm = [argmax_i ll_i / len(choice_i) == gold]
    with len in characters of the choice string (without the leading delimiter), ties to the first;
  * loglikelihood tasks (LAMBADA): acc = mean is_greedy, perplexity = exp(-mean ll);
  * rolling log-likelihood: disjoint windows of max_length predicted tokens, each with as much
    preceding context as fits, the first one after the end-of-text token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from pelab.data.hub import require_hub
from pelab.train.eval import tasks as T
from torch import Tensor

log = logging.getLogger("pelab.eval")


# ---- models ----------------------------------------------------------------------------------------


class FnModel:
    """Any `logits_fn(idx (B, T) long) -> logits (B, T, V)` as a scorer model (tests, stubs, other LMs)."""

    def __init__(
        self, logits_fn: Callable[[Tensor], Tensor], device: str | torch.device = "cpu", vocab_size: int | None = None
    ):
        self.fn = logits_fn
        self.device = torch.device(device)
        self.vocab_size = vocab_size

    @torch.no_grad()
    def logits_at(self, idx: Tensor, rows: Tensor) -> Tensor:
        logits = self.fn(idx).float()
        return logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))

    @torch.no_grad()
    def target_logprobs(self, idx: Tensor, rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """log p(targets) at `rows` and whether each target is the argmax, both (B, K)."""
        return _target_logprobs(self.logits_at(idx, rows), targets)

    @torch.no_grad()
    def token_losses(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self.fn(idx).float()
        return torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]


def _target_logprobs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return logp, logits.argmax(-1) == targets


class GPTModel:
    """A pelab `GPT` as a scorer model: hidden states for the batch, logits only at the scored rows.

    bf16 autocast when `autocast_dtype` is set (GPU), fp32 otherwise; the LM head is computed as the
    trainer's fused loss computes it (hidden states and weight in the autocast dtype, fp32 softmax)."""

    def __init__(
        self,
        model,
        device: torch.device | str | None = None,
        autocast_dtype: torch.dtype | None = None,
        head_chunk_rows: int = 4096,
    ):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.vocab_size = int(model.cfg.vocab_size)
        self.head_chunk_rows = head_chunk_rows

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def hidden(self, idx: Tensor) -> Tensor:
        with self._autocast():
            return self.model.hidden_states(idx)

    def head(self, h: Tensor) -> Tensor:
        w = self.model.head_weight
        if self.autocast_dtype is not None:
            h, w = h.to(self.autocast_dtype), w.to(self.autocast_dtype)
        else:
            w = w.to(h.dtype)
        return (h @ w.t()).float()

    @torch.no_grad()
    def logits_at(self, idx: Tensor, rows: Tensor) -> Tensor:
        h = self.hidden(idx)
        h = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
        return self.head(h)

    @torch.no_grad()
    def target_logprobs(self, idx: Tensor, rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """log p(targets) at `rows` and whether each target is the argmax, both (B, K); the head is
        formed in row chunks, so long continuations (rolling windows) never hold (B, K, V) logits."""
        h = self.hidden(idx)
        B, K = rows.shape
        h = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1])).reshape(B * K, -1)
        t = targets.reshape(B * K)
        logp = torch.empty(B * K, dtype=torch.float32, device=h.device)
        best = torch.empty(B * K, dtype=torch.bool, device=h.device)
        for s in range(0, B * K, self.head_chunk_rows):
            e = s + self.head_chunk_rows
            logp[s:e], best[s:e] = _target_logprobs(self.head(h[s:e]), t[s:e])
        return logp.view(B, K), best.view(B, K)

    @torch.no_grad()
    def token_losses(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Per-position cross-entropy (B, T) in fp32, the LM head formed in row chunks."""
        h = self.hidden(idx)
        B, T, d = h.shape
        h, t = h.reshape(B * T, d), targets.reshape(B * T)
        out = torch.empty(B * T, dtype=torch.float32, device=h.device)
        for s in range(0, B * T, self.head_chunk_rows):
            logits = self.head(h[s : s + self.head_chunk_rows])
            tt = t[s : s + self.head_chunk_rows]
            out[s : s + self.head_chunk_rows] = torch.logsumexp(logits, -1) - logits.gather(1, tt[:, None])[:, 0]
        return out.view(B, T)


# ---- scorer ----------------------------------------------------------------------------------------


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token once: disjoint blocks of at most
    `max_length` predicted tokens, each with as much preceding context as fits in `max_length` inputs."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix_token], tokens[:first])]
    start = first
    while start < len(tokens):
        end = min(len(tokens), start + max_length)
        out.append((tokens[max(0, end - max_length - 1) : start], tokens[start:end]))
        start = end
    return out


class Scorer:
    """Log-likelihoods, rolling log-likelihoods and greedy generation over a scorer model."""

    def __init__(
        self,
        lm,
        tokenizer,
        max_length: int,
        batch_size: int = 16,
        batch_tokens: int | None = None,
        prefix_token_id: int | None = None,
    ):
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = max(1, int(batch_size))
        self.batch_tokens = int(batch_tokens) if batch_tokens else None
        self.prefix_token_id = int(tokenizer.eot_id if prefix_token_id is None else prefix_token_id)

    # -- tokenisation, as the harness's TemplateLM does it
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # -- batching
    def _batches(self, order: list[int], lengths: list[int]) -> Iterable[list[int]]:
        i = 0
        while i < len(order):
            rows = self.batch_size
            if self.batch_tokens:
                rows = max(1, min(rows, self.batch_tokens // max(1, lengths[order[i]])))
            yield order[i : i + rows]
            i += rows

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces it, per pair."""
        inputs, targets = [], []
        for ctx, cont in pairs:
            cont = list(cont)
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            full = (list(ctx) + cont)[-(self.max_length + 1) :]
            n = min(len(cont), len(full) - 1)  # a continuation longer than the window is scored in part
            inputs.append(full[:-1])
            targets.append(full[-n:])
        # Longest first, ties broken by content: the batches do not depend on the request order.
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), inputs[i], targets[i]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        dev = self.lm.device
        for batch in self._batches(order, [len(x) for x in inputs]):
            T = max(len(inputs[i]) for i in batch)
            K = max(len(targets[i]) for i in batch)
            idx = torch.zeros(len(batch), T, dtype=torch.long)
            rows = torch.zeros(len(batch), K, dtype=torch.long)
            tgt = torch.zeros(len(batch), K, dtype=torch.long)
            mask = torch.zeros(len(batch), K, dtype=torch.bool)
            for r, i in enumerate(batch):
                L, n = len(inputs[i]), len(targets[i])
                idx[r, :L] = torch.tensor(inputs[i])
                rows[r, :n] = torch.arange(L - n, L)
                rows[r, n:] = L - 1
                tgt[r, :n] = torch.tensor(targets[i])
                mask[r, :n] = True
            tgt, mask = tgt.to(dev), mask.to(dev)
            logp, best = self.lm.target_logprobs(idx.to(dev), rows.to(dev), tgt)
            ll = (logp.double() * mask).sum(-1).cpu()
            greedy = (best | ~mask).all(-1).cpu()
            for r, i in enumerate(batch):
                results[i] = (float(ll[r]), bool(greedy[r]))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        windows, owner = [], []
        for j, text in enumerate(texts):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(j)
        totals = [0.0] * len(texts)
        for j, (ll, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[j] += ll
        return totals

    # -- greedy generation (no KV cache: one full forward per new token, logits at the last row only)
    @torch.no_grad()
    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Callable[[list[int]], bool] | None = None
    ) -> list[list[int]]:
        """Greedy continuation tokens of each prompt (at most `max_new_tokens`; a row stops at the
        end-of-text token or when `stop(generated)` is true). Ids beyond the tokenizer are never chosen."""
        vocab = getattr(self.tokenizer, "vocab_size", None)
        eot = self.tokenizer.eot_id
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), list(prompts[i])))
        out: list[list[int]] = [[] for _ in prompts]
        dev = self.lm.device
        for batch in self._batches(order, [len(p) + max_new_tokens for p in prompts]):
            seqs = [list(prompts[i]) for i in batch]
            done = [False] * len(batch)
            for _ in range(max_new_tokens):
                live = [r for r in range(len(batch)) if not done[r]]
                if not live:
                    break
                T = max(len(seqs[r]) for r in live)
                idx = torch.zeros(len(live), T, dtype=torch.long)
                rows = torch.zeros(len(live), 1, dtype=torch.long)
                for j, r in enumerate(live):
                    idx[j, : len(seqs[r])] = torch.tensor(seqs[r])
                    rows[j, 0] = len(seqs[r]) - 1
                logits = self.lm.logits_at(idx.to(dev), rows.to(dev))[:, 0].float()
                if vocab is not None and logits.shape[-1] > vocab:
                    logits[:, vocab:] = float("-inf")
                nxt = logits.argmax(-1).tolist()
                for j, r in enumerate(live):
                    tok = int(nxt[j])
                    i = batch[r]
                    if tok == eot:
                        done[r] = True
                        continue
                    seqs[r].append(tok)
                    out[i].append(tok)
                    if stop is not None and stop(out[i]):
                        done[r] = True
        return out

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """lm-eval `generate_until`: greedy continuation of each context, cut before the first stop string."""
        results = []
        for context, kwargs in requests:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256)))
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0) or 0.0) > 0:
                log.warning("pelab generate_until decodes greedily; ignoring do_sample=True")
            ctx = self.encode(context)[-max(1, self.max_length - max_new) :] if context else [self.prefix_token_id]

            def stop(gen, until=until):
                text = self.tokenizer.decode(gen)
                return any(s and s in text for s in until)

            gen = self.greedy([ctx], max_new, stop)[0]
            text = self.tokenizer.decode(gen)
            for s in until:
                if s and s in text:
                    text = text.split(s)[0]
            results.append(text)
        return results


# ---- metrics -----------------------------------------------------------------------------------------


def mc_predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax ll, argmax ll / len(choice)) as the harness computes them (first index on ties)."""
    lls = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), se


def score_task(scorer: Scorer, task, docs: list) -> dict:
    """Metrics of one task (`tasks.TaskSpec`) over its documents, as lm-evaluation-harness reports them."""
    if task.kind == "loglikelihood":
        res = scorer.loglikelihood([(d.context, d.continuation) for d in docs])
        lls = [ll for ll, _ in res]
        acc, acc_se = mean_stderr([float(g) for _, g in res])
        out = {"acc": acc, "acc_stderr": acc_se, "perplexity": math.exp(-float(np.mean(lls)))}
        return {k: v for k, v in out.items() if k.split("_stderr")[0] in task.metrics}
    flat, spans = [], []
    for d in docs:
        spans.append((len(flat), len(flat) + len(d.requests)))
        flat.extend(d.requests)
    res = scorer.loglikelihood(flat)
    accs, norms = [], []
    for d, (a, b) in zip(docs, spans):
        pred, pred_norm = mc_predictions([ll for ll, _ in res[a:b]], d.choices)
        accs.append(float(pred == d.gold))
        norms.append(float(pred_norm == d.gold))
    out = {}
    out["acc"], out["acc_stderr"] = mean_stderr(accs)
    if "acc_norm" in task.metrics:
        out["acc_norm"], out["acc_norm_stderr"] = mean_stderr(norms)
    return out


# GRAPE's average (camera-ready tables): the mean accuracy of these seven tasks.
GRAPE_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa", "winogrande", "sciq")


def run_zeroshot(
    scorer: Scorer, cfg, data_dir: str | None = None, limit: int | None = None, hub_timeout: float = 5.0
) -> dict:
    """Every task of `cfg.tasks`: metrics, item count, source and split, or `skipped` with the reason."""
    files = {k: str(v) for k, v in dict(cfg.get("files") or {}).items() if v}
    results, docs_cache = {}, {}
    names = list(cfg["tasks"])
    if data_dir is None and not files:
        # fail fast, with the hint, before any scoring
        require_hub("the zero-shot tasks cannot be downloaded", T.HUB_HINT, hub_timeout)
    for name in names:
        spec = T.get_task(name)
        try:
            docs, source = T.load_docs(spec, data_dir=data_dir, files=files, limit=limit, hub_timeout=hub_timeout)
        except T.TaskUnavailable as e:
            results[name] = {"skipped": str(e)}
            log.warning("zeroshot %s skipped: %s", name, e)
            continue
        docs_cache[name] = docs
        metrics = score_task(scorer, spec, docs)
        results[name] = {**metrics, "n": len(docs), **source}
        log.info(
            "zeroshot %-15s n=%-5d %s",
            name,
            len(docs),
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not k.endswith("stderr")),
        )
    done = [t for t in GRAPE_TASKS if t in results and "acc" in results[t]]
    summary = {"tasks": results}
    if done:
        summary["average"] = {
            "acc": float(np.mean([results[t]["acc"] for t in done])),
            "tasks": done,
            "complete": len(done) == len(GRAPE_TASKS),
        }
    return summary
