"""Perplexity against context length: how the loss behaves at and beyond the training length.

For each multiple m of the training length T (1, 2, 4, 8, 16 by default) the held-out text is cut
into non-overlapping windows of L = m*T + 1 tokens, window i = tokens[i*L' : i*L' + L'+1] with
L' = m*T (the trainer's validation windows at m = 1), and each window is scored from its first token
with no cache: loss at position p is the loss of predicting token p+1 from the p+1 tokens before it.
Reported per length: mean loss and perplexity, the loss over the first T positions and beyond
them, and the per-position loss curve (binned). Windows are evaluated one batch at a time under
no_grad, through the model's attention kernels (flash/cuDNN, or the `chunked` backend with
`eval.attention_backend=chunked`), so no T x T matrix is formed; the LM head is formed in row chunks.

Held-out text: the validation shard (shard 0) of the checkpoint's training data, so that at 1x with
`ppl.max_tokens` = the training config's `data.val_tokens` the windows are exactly the trainer's
validation windows and the loss equals its logged `val/loss`; or any text file (`ppl.text_file`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from pelab.data.atomic import atomic_open
from pelab.data.ready import ensure_prepared
from pelab.data.shards import find_shards, read_shard

log = logging.getLogger("pelab.eval")


def heldout_tokens(train_cfg, tokenizer, text_file: str | None = None) -> tuple[np.ndarray, str]:
    """(token ids, description) of the held-out text: a text file, or the training data's val shard."""
    if text_file:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found")
        return np.asarray(tokenizer.encode(path.read_text(encoding="utf-8")), dtype=np.int64), f"file:{path}"
    if train_cfg is None:
        raise ValueError(
            "no training config next to the checkpoint tells where its validation data is; "
            "pass ppl.text_file=<held-out text file>"
        )
    data_cfg = train_cfg.data
    try:
        shard_dir = ensure_prepared(data_cfg)
    except Exception as e:  # noqa: BLE001  (missing shards: say what to do)
        raise ValueError(
            f"the training data's shards are not available ({str(e).splitlines()[0]}); prepare "
            f"them (python -m data.prepare data={data_cfg.name}) or pass ppl.text_file=<held-out text>"
        ) from None
    val = find_shards(shard_dir, data_cfg.name)[0][0]
    return read_shard(val), f"val shard {val}"  # memory-mapped; windows are copied as they are scored


def _bins(length: int, points: int) -> np.ndarray:
    """Bin edges over positions 0..length, geometric (the curves are plotted on a log axis)."""
    geo = np.geomspace(1, length, max(2, min(points, length))).round().astype(np.int64)
    return np.unique(np.concatenate([[0], geo, [length]]))


def ppl_vs_length(
    lm,
    tokens: np.ndarray,
    train_len: int,
    multiples=(1, 2, 4, 8, 16),
    max_tokens: int | None = None,
    limit: int | None = None,
    batch_tokens: int = 32768,
    curve_points: int = 256,
) -> dict:
    """Loss and perplexity at each multiple of the training length (see the module docstring)."""
    n_tok = int(len(tokens))
    budget = int(max_tokens) if max_tokens else n_tok - 1
    out = {}
    for m in multiples:
        L = int(round(float(m) * train_len))
        key = f"{m:g}x"
        fits = (n_tok - 1) // L
        if fits == 0:
            out[key] = {
                "length": L,
                "multiple": float(m),
                "skipped": f"needs {L + 1} tokens of held-out text, which has {n_tok}",
            }
            continue
        n_win = min(fits, max(1, budget // L))
        if limit is not None:
            n_win = min(n_win, max(1, int(limit)))
        pos_sum = np.zeros(L, dtype=np.float64)
        rows = max(1, batch_tokens // L)
        for s in range(0, n_win, rows):
            ids = range(s, min(n_win, s + rows))
            win = torch.from_numpy(np.stack([np.asarray(tokens[i * L : (i + 1) * L + 1], dtype=np.int64) for i in ids]))
            win = win.to(lm.device)
            losses = lm.token_losses(win[:, :-1], win[:, 1:])
            pos_sum += losses.double().sum(0).cpu().numpy()
        per_pos = pos_sum / n_win
        edges = _bins(L, curve_points)
        curve_pos = ((edges[:-1] + edges[1:] - 1) / 2).tolist()
        curve_loss = [float(per_pos[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
        loss = float(per_pos.mean())
        entry = {
            "length": L,
            "multiple": float(m),
            "windows": n_win,
            "tokens": n_win * L,
            "loss": loss,
            "ppl": math.exp(loss),
            "loss_within_train_len": float(per_pos[:train_len].mean()),
        }
        if L > train_len:
            entry["loss_beyond_train_len"] = float(per_pos[train_len:].mean())
        entry["curve"] = {"position": curve_pos, "loss": curve_loss}
        out[key] = entry
        log.info("ppl_vs_length %5s L=%-6d windows=%-4d loss %.4f ppl %.2f", key, L, n_win, loss, math.exp(loss))
    return {"train_len": int(train_len), "heldout_tokens": n_tok, "lengths": out}


def plot_ppl(result: dict, path: Path, title: str = "") -> Path:
    import matplotlib  # heavy; only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = result["train_len"]
    done = [(k, v) for k, v in result["lengths"].items() if "loss" in v]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    if done:
        a1.plot([v["length"] for _, v in done], [v["ppl"] for _, v in done], "o-")
        for k, v in done:
            a1.annotate(k, (v["length"], v["ppl"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        a1.set_xscale("log", base=2)
        a1.set_yscale("log")
    a1.axvline(T, color="grey", ls="--", lw=1, label=f"training length {T}")
    a1.set_xlabel("evaluation length (tokens)")
    a1.set_ylabel("perplexity")
    a1.set_title("perplexity vs evaluation length")
    a1.legend(fontsize=8)
    for k, v in reversed(done):
        pos = np.asarray(v["curve"]["position"]) + 1
        a2.plot(pos, v["curve"]["loss"], lw=1, label=f"{k} ({v['length']})")
    a2.axvline(T, color="grey", ls="--", lw=1)
    a2.set_xscale("log")
    a2.set_xlabel("position in window (tokens)")
    a2.set_ylabel("loss (nats)")
    a2.set_title("per-position loss")
    a2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
