"""Stability monitoring: per-step device statistics, the OLMo-core spike rule, and a periodic probe.

Per step (`StepStats`, called from `LMModule.training_step`): loss, mean logsumexp and its square
(the unscaled z-loss), pre-clip grad norm, whether clipping fired and the spike flags are stacked
into one small device tensor; nothing reaches the host until the logging step, where the whole
interval is copied in one transfer.

Spike rule (OLMo-core `SkipStepOptimizer` / `StabilityMonitorCallback`): a step's loss (or grad
norm) is a spike when it exceeds the mean of the previous `window` (128) values by more than
`sigma` (6) standard deviations; checking starts once `max(2, window // 2)` values are known.
Detection runs on the device from a ring buffer.

Every `probe_every` steps (`StabilityMonitor`, rank 0): a no-grad eager forward on a fixed batch of
validation windows recomputes each layer's attention scores in query chunks from
`CausalSelfAttention.project` (q, k after the PE, plus the PE's additive bias), giving the exact
per-head max logit and the attention entropy; it also measures residual-stream RMS, output-logit
max/mean and every PE's `stats()`. Around the optimizer step of that step it takes per-layer
parameter RMS, (pre-clip) gradient RMS and update-RMS / parameter-RMS.
Every `nr_every` steps and at the end it adds the "Behind RoPE" diagnostic: per layer the fraction
of pre-softmax score variance not explained by the offset i - j (NR) and the per-offset mean score.

Additive biases are taken relative to their diagonal (bias[i, j] - bias[i, i]): the kernels'
factored biases drop per-row constants the softmax ignores (ALiBi's -m*i, FoX's cumsum up to i),
and every PE here has a true bias that vanishes at j = i, so this recovers the true bias exactly.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from pelab.data.atomic import atomic_write_json
from pelab.models.kernels.documents import same_document
from pelab.models.pe.common import repeat_kv
from pelab.train.loggers import log_offset_curves
from pelab.train.metrics import MetricSink
from pelab.train.schema import MonitorConfig
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

log = logging.getLogger("pelab")


# ---- spike rule ---------------------------------------------------------------------------------


def spike_flags(
    values, window: int = MonitorConfig.spike_window, sigma: float = MonitorConfig.spike_sigma
) -> list[bool]:
    """Host reference of the spike rule for one series: value t is a spike when
    value_t - mean(prev) > sigma * std(prev), prev = the up to `window` values before t (unbiased std),
    checked once at least max(2, window // 2) previous values exist. Non-finite values are never
    spikes and are replaced by their predecessor in the history."""
    out, hist = [], collections.deque(maxlen=window)
    for v in values:
        v = float(v)
        flag = False
        if len(hist) >= max(2, window // 2) and math.isfinite(v):
            t = torch.tensor(list(hist), dtype=torch.float64)
            std, mean = torch.std_mean(t)
            flag = bool(v - float(mean) > sigma * float(std))
        out.append(flag)
        hist.append(v if math.isfinite(v) else (hist[-1] if hist else 0.0))
    return out


class SpikeDetector:
    """The spike rule for several series at once, on the device, without host syncs."""

    def __init__(self, n_series: int, window: int, sigma: float):
        self.n, self.window, self.sigma = n_series, int(window), float(sigma)
        self.min_history = max(2, self.window // 2)
        self.buf: Tensor | None = None
        self.count = 0  # values seen (host int: it advances once per call)

    def update(self, values: Tensor) -> Tensor:
        """values: (n_series,) float on the device -> (n_series,) bool spike flags."""
        values = values.detach().float()
        if self.buf is None or self.buf.device != values.device:
            self.buf = (
                torch.zeros(self.n, self.window, device=values.device)
                if self.buf is None
                else self.buf.to(values.device)
            )
        k = min(self.count, self.window)
        finite = torch.isfinite(values)
        if k >= self.min_history:
            std, mean = torch.std_mean(self.buf[:, :k], dim=1)
            flags = finite & (values - mean > self.sigma * std)
        else:
            flags = torch.zeros(self.n, dtype=torch.bool, device=values.device)
        prev = self.buf[:, (self.count - 1) % self.window] if self.count else torch.zeros_like(values)
        self.buf[:, self.count % self.window] = torch.where(finite, values, prev)
        self.count += 1
        return flags

    def state_dict(self) -> dict:
        return {"buf": None if self.buf is None else self.buf.detach().cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.buf = state["buf"]
        self.count = int(state["count"])


class StepStats:
    """Per-step scalars of one logging interval kept on the device; `flush` copies them once."""

    FIELDS = ("loss", "lse", "lse_sq", "grad_norm", "clipped", "loss_spike", "grad_spike")

    def __init__(self, spike_window: int, spike_sigma: float, spike_score_window: int):
        self.detector = SpikeDetector(2, spike_window, spike_sigma)
        self.score_window = int(spike_score_window)
        self.trace: list[Tensor] = []
        self.last_grad_norm: Tensor | None = None
        self.loss_spikes = self.grad_spikes = self.skipped = 0
        self.spike_steps: collections.deque = collections.deque()  # steps with any spike, within the score window
        self.spikes = 0

    def record(self, loss: Tensor, lse: Tensor, lse_sq: Tensor, grad_norm: Tensor, clip: float) -> Tensor:
        """Append this step's values; returns the device bool "loss or grad norm spiked"."""
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float()
        flags = self.detector.update(torch.stack([loss, grad_norm]))
        self.last_grad_norm = grad_norm
        step = {
            "loss": loss,
            "lse": lse.detach().float(),
            "lse_sq": lse_sq.detach().float(),
            "grad_norm": grad_norm,
            "clipped": (grad_norm > clip).float(),
            "loss_spike": flags[0].float(),
            "grad_spike": flags[1].float(),
        }
        self.trace.append(torch.stack([step[f] for f in self.FIELDS]))
        return flags.any()

    def should_skip(self, spike: Tensor, strategy=None) -> bool:
        """Host decision for optim.skip_spikes (one sync; all ranks agree through a reduction)."""
        s = spike.float()
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            s = strategy.reduce(s, reduce_op="sum")
        skip = bool(s > 0)
        self.skipped += int(skip)
        return skip

    def flush(self, step: int) -> dict[str, float]:
        """Metrics of the interval ending at `step` (one device->host copy)."""
        if not self.trace:
            return {}
        # One (FIELD -> per-step values) series per field, from one device->host copy.
        series = dict(zip(self.FIELDS, torch.stack(self.trace).double().cpu().unbind(1)))
        self.trace = []
        n = len(series["loss"])
        for i in range(n):
            ls, gs = bool(series["loss_spike"][i]), bool(series["grad_spike"][i])
            if ls or gs:
                s = step - n + 1 + i
                self.spike_steps.append(s)
                self.spikes += 1
                log.warning(
                    "step %d: %s spike (loss %.4f, grad norm %.4g)",
                    s,
                    " and ".join(x for x, f in (("loss", ls), ("grad-norm", gs)) if f),
                    series["loss"][i],
                    series["grad_norm"][i],
                )
        self.loss_spikes += int(series["loss_spike"].sum())
        self.grad_spikes += int(series["grad_spike"].sum())
        while self.spike_steps and self.spike_steps[0] <= step - self.score_window:
            self.spike_steps.popleft()
        return {
            "train/z_loss": float(series["lse_sq"][-1]),
            "train/loss_max": float(series["loss"].max()),
            "stability/grad_norm_max": float(series["grad_norm"].max()),
            "stability/clip_rate": float(series["clipped"].mean()),
            "stability/spikes": self.spikes,
            "stability/loss_spikes": self.loss_spikes,
            "stability/grad_spikes": self.grad_spikes,
            "stability/skipped_steps": self.skipped,
            "stability/spike_score": 100.0 * len(self.spike_steps) / max(1, min(step, self.score_window)),
        }

    def state_dict(self) -> dict:
        return {
            "detector": self.detector.state_dict(),
            "loss_spikes": self.loss_spikes,
            "spikes": self.spikes,
            "grad_spikes": self.grad_spikes,
            "skipped": self.skipped,
            "spike_steps": list(self.spike_steps),
        }

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.loss_spikes, self.grad_spikes = int(state["loss_spikes"]), int(state["grad_spikes"])
        self.spikes, self.skipped = int(state["spikes"]), int(state["skipped"])
        self.spike_steps = collections.deque(int(s) for s in state["spike_steps"])
        self.trace = []


# ---- attention probe: pure functions ------------------------------------------------------------


@torch.no_grad()
def attention_stats(
    q: Tensor,
    k: Tensor,
    bias=None,
    scale: float | None = None,
    chunk: int = 256,
    score_map: bool = False,
    doc_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Exact statistics of the causal pre-softmax scores S = q k^T * scale + bias (diagonal-anchored).

    q: (B, T, H, D), k: (B, T, Hkv, D) as `CausalSelfAttention.project` returns them; bias an
    `AttentionBias` or None; doc_ids (B, T) hides keys of other documents, as the kernels do. Returns
    fp32 per-head tensors: "max_logit" (H,) over batch and visible entries, "entropy" (H,) softmax
    entropy in nats averaged over batch and queries, and with `score_map` the batch-mean score map
    "map" (H, T, T) (zero where hidden)."""
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    qh = q.transpose(1, 2).float()
    kh = repeat_kv(k.transpose(1, 2).float(), H, dim=1)
    max_logit = torch.full((H,), float("-inf"), device=q.device)
    ent = torch.zeros(H, device=q.device)
    smap = torch.zeros(H, T, T, device=q.device) if score_map else None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        r = torch.arange(e - s, device=q.device)
        sc = torch.matmul(qh[:, :, s:e], kh[:, :, :e].transpose(-1, -2)) * scale  # (B, H, r, e)
        if bias is not None:
            tile = bias.tile(slice(s, e), e).float()
            sc = sc + (tile - tile[:, :, r, s + r][..., None])
        masked = torch.arange(e, device=q.device)[None, :] > (s + r)[:, None]  # above the diagonal
        if doc_ids is not None:
            masked = masked | ~same_document(doc_ids[:, s:e], doc_ids[:, :e])
        sc0 = sc.masked_fill(masked, 0.0)
        max_logit = torch.maximum(max_logit, sc.masked_fill(masked, float("-inf")).amax(dim=(0, 2, 3)))
        lse = torch.logsumexp(sc.masked_fill(masked, float("-inf")), dim=-1, keepdim=True)
        p = torch.exp(sc0 - lse).masked_fill(masked, 0.0)
        ent += (lse[..., 0] - (p * sc0).sum(-1)).sum(dim=(0, 2))
        if smap is not None:
            smap[:, s:e, :e] += sc0.sum(0)
    out = {"max_logit": max_logit, "entropy": ent / (B * T)}
    if smap is not None:
        out["map"] = smap / B
    return out


def relative_decomposition(S: Tensor) -> tuple[Tensor, Tensor]:
    """Split causal score maps S (..., T, T) into the part explained by the offset i - j.

    Returns (nr, offset_mean): offset_mean (..., T) is the mean of each diagonal o = i - j over its
    causal entries; nr (...) = ||S - S_rel||^2 / ||S - mean(S)||^2 over causal entries j <= i, the
    fraction of score variance that is not a function of the relative offset (0: purely relative).
    Entries above the diagonal are ignored. Computed in float64."""
    T = S.shape[-1]
    S = S.double()
    i = torch.arange(T, device=S.device)[:, None]
    j = torch.arange(T, device=S.device)[None, :]
    causal = j <= i
    off = (i - j).clamp(min=0)
    flat = S.masked_fill(~causal, 0.0).flatten(-2)
    sums = torch.zeros(*S.shape[:-2], T, dtype=S.dtype, device=S.device)
    sums.scatter_add_(-1, off.flatten().expand_as(flat), flat)
    counts = (T - torch.arange(T, device=S.device)).to(S.dtype)
    offset_mean = sums / counts
    rel = offset_mean[..., off]
    n = T * (T + 1) / 2
    mean = sums.sum(-1) / n
    within = ((S - rel).masked_fill(~causal, 0.0) ** 2).sum((-1, -2))
    total = ((S - mean[..., None, None]).masked_fill(~causal, 0.0) ** 2).sum((-1, -2))
    nr = torch.where(total > 0, within / total.clamp(min=torch.finfo(S.dtype).tiny), torch.zeros_like(total))
    return nr.float(), offset_mean.float()


def curve_offsets(T: int, n: int = 96) -> list[int]:
    """Offsets kept in the saved per-offset curves: all of 0..15, then log-spaced up to T - 1."""
    dense = list(range(min(T, 16)))
    if T <= 16:
        return dense
    logs = torch.logspace(math.log10(16), math.log10(T - 1), max(2, n - 16)).round().long().tolist()
    return sorted(set(dense) | set(logs))


# ---- parameter / gradient / update RMS -------------------------------------------------------------


def param_groups(model: torch.nn.Module) -> tuple[list[str], list[Tensor], Tensor]:
    """(group names, trainable params, group index per param): "embed", "L<i>" per block, "head"."""
    names, params, idx = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        g = f"L{parts[1]}" if parts[0] == "blocks" else ("embed" if parts[0] == "embed" else "head")
        if g not in names:
            names.append(g)
        params.append(p)
        idx.append(names.index(g))
    order = sorted(
        range(len(names)),
        key=lambda i: (names[i] != "embed", names[i] == "head", int(names[i][1:]) if names[i].startswith("L") else 0),
    )
    remap = {old: new for new, old in enumerate(order)}
    return [names[i] for i in order], params, torch.tensor([remap[i] for i in idx])


def group_sq_norms(tensors: list[Tensor], index: Tensor, n_groups: int) -> Tensor:
    """Sum of squared norms per group (fp32, on the tensors' device); None entries count as zero."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    dev = tensors[present[0]].device if present else torch.device("cpu")
    out = torch.zeros(n_groups, device=dev)
    if present:
        norms = torch.stack([torch.linalg.vector_norm(tensors[i], dtype=torch.float32) for i in present])
        out.index_add_(0, index[present].to(dev), norms.square())
    return out


# ---- the callback -----------------------------------------------------------------------------------


class StabilityMonitor(L.Callback):
    """Probe metrics every `probe_every` steps (rank 0) into the sink's probes.csv and the loggers,
    Behind-RoPE curves into <run_dir>/diagnostics/nr-step-XXXXXXXX.json."""

    def __init__(self, run_dir: Path, monitor: MonitorConfig, sink: MetricSink):
        self.run_dir = Path(run_dir)
        self.sink = sink
        self.probe_every, self.nr_every = int(monitor.probe_every or 0), int(monitor.nr_every or 0)
        self.probe_batch, self.probe_seq_len = int(monitor.probe_batch), int(monitor.probe_seq_len)
        self.chunk = int(monitor.chunk)
        self.resid_layers = None if monitor.resid_layers is None else [int(i) for i in monitor.resid_layers]
        self._probe_idx: Tensor | None = None
        self._groups = None
        self._before = None
        self._grad_sq = None
        self._last_probe = -1
        self.probe_seconds = 0.0  # time spent in probes (overhead accounting)
        self.disabled = False

    # -- schedule
    def is_probe_step(self, trainer, step: int) -> bool:
        return not self.disabled and (
            (self.probe_every > 0 and step % self.probe_every == 0)
            or (self.nr_every > 0 and step % self.nr_every == 0)
            or step == trainer.max_steps
        )

    def is_nr_step(self, trainer, step: int) -> bool:
        return (self.nr_every > 0 and step % self.nr_every == 0) or step == trainer.max_steps

    # -- hooks
    def on_fit_start(self, trainer, pl_module):
        if isinstance(pl_module.model, FSDP):
            # Sharded parameters: a rank-0 eager probe cannot see whole weights. Per-step stats still run.
            log.info("monitor: probes (attention logits, RMS, NR) are off under FSDP; per-step metrics stay on")
            self.probe_every = self.nr_every = 0
            self.disabled = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        if not trainer.is_global_zero or not self.is_probe_step(trainer, step):
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            if self._groups is None:
                self._groups = param_groups(pl_module.model)
            names, params, index = self._groups
            grad_sq = group_sq_norms([p.grad for p in params], index, len(names))
            # Gradients are clipped by now; report them before clipping (clipping scales all alike).
            pre = getattr(getattr(pl_module, "step_stats", None), "last_grad_norm", None)
            if pre is not None:
                post = grad_sq.sum().sqrt()
                grad_sq = grad_sq * torch.where(post > 0, (pre.to(post.device) / post).square(), torch.zeros_like(post))
            self._grad_sq = grad_sq
            self._before = [p.detach().clone() for p in params]  # snapshot for the update
        self.probe_seconds += time.perf_counter() - t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or not self.is_probe_step(trainer, step):
            return
        self.probe(trainer, pl_module, step, nr=self.is_nr_step(trainer, step))

    def on_train_end(self, trainer, pl_module):
        if (
            trainer.is_global_zero
            and not self.disabled
            and self._last_probe != trainer.global_step
            and trainer.global_step > 0
        ):
            self.probe(trainer, pl_module, trainer.global_step, nr=True)

    # -- the probe
    def _probe_batch(self, trainer, device) -> Tensor:
        if self._probe_idx is None:
            windows = trainer.datamodule.val_windows
            n = min(self.probe_batch, len(windows))
            T = min(self.probe_seq_len, windows.seq_len)
            self._probe_idx = torch.from_numpy(windows.windows(np.arange(n))[:, :T])
        return self._probe_idx.to(device)

    def probe(self, trainer, pl_module, step: int, nr: bool = False) -> dict:
        t0 = time.perf_counter()
        model = pl_module.model
        m: dict[str, float] = {}
        scalars: dict[str, Tensor] = {}
        if self._before is not None:
            names, params, index = self._groups
            with torch.no_grad():
                p_sq = group_sq_norms(self._before, index, len(names))
                for before, p in zip(self._before, params):
                    before.sub_(p.detach())
                u_sq = group_sq_norms(self._before, index, len(names))
            self._before = None
            numel = torch.zeros(len(names)).index_add_(0, index, torch.tensor([float(p.numel()) for p in params]))
            numel = numel.to(p_sq.device)
            for i, g in enumerate(names):
                scalars[f"stability/param_rms/{g}"] = (p_sq[i] / numel[i]).sqrt()
                scalars[f"stability/grad_rms/{g}"] = (self._grad_sq[i] / numel[i]).sqrt()
                scalars[f"stability/update_ratio/{g}"] = (u_sq[i] / p_sq[i].clamp(min=1e-30)).sqrt()
            scalars["stability/update_ratio"] = (u_sq.sum() / p_sq.sum().clamp(min=1e-30)).sqrt()
            scalars["stability/param_norm"] = p_sq.sum().sqrt()
        device = next(model.parameters()).device
        idx = self._probe_batch(trainer, device)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            out = probe_forward(model, idx, nr=nr, resid_layers=self.resid_layers, chunk=self.chunk)
        scalars.update(out["scalars"])
        keys = list(scalars)
        if keys:
            values = torch.stack([scalars[k].detach().float().to(device).reshape(()) for k in keys]).tolist()
            m.update(zip(keys, values))
        m = dict(sorted(m.items()))
        if nr:
            self._write_nr(trainer, step, step * pl_module.tokens_per_step, out["nr"])
            for i, layer in enumerate(out["nr"]["layers"]):
                m[f"attn/nr/L{i}"] = layer["nr"]
        self.probe_seconds += time.perf_counter() - t0
        m["throughput/probe_s"] = time.perf_counter() - t0
        self._last_probe = step
        self.sink.record(trainer, step, m, table="probes")
        return m

    def _write_nr(self, trainer, step: int, tokens: int, nr: dict) -> None:
        doc = {"step": step, "tokens": tokens, **nr}
        atomic_write_json(self.run_dir / "diagnostics" / f"nr-step-{step:08d}.json", doc, indent=None)
        log_offset_curves(trainer.loggers, doc)


def _rms(x: Tensor) -> Tensor:
    return x.float().pow(2).mean().sqrt()


@torch.no_grad()
def probe_forward(model, idx: Tensor, nr: bool = False, resid_layers=None, chunk: int = 256) -> dict:
    """Eager forward of `model` (a `models.gpt.GPT`) on token ids (B, T) that measures every layer's
    attention scores. Blocks run through `Block.forward` directly, so compiled blocks run eagerly and
    the compiled training graph is untouched. Returns {"scalars": {name: 0-d tensor}, "nr": {...}}."""
    n_layer = len(model.blocks)
    resid = sorted({0, n_layer // 2, n_layer - 1} if resid_layers is None else {i % n_layer for i in resid_layers})
    T = idx.shape[1]
    positions = torch.arange(T, device=idx.device)
    docs = model.document_ids(idx)
    per_layer: list[dict] = []

    def pre_hook(attn, args):  # args: the block's (x, positions, document ids)
        q, k, _, bias = attn.project(*args)
        per_layer.append(attention_stats(q, k, bias, chunk=chunk, score_map=nr, doc_ids=args[2]))

    hooks = [b.attn.register_forward_pre_hook(pre_hook) for b in model.blocks]
    s: dict[str, Tensor] = {}
    try:
        x = model.embed(idx)
        s["stability/resid_rms/embed"] = _rms(x)
        for i, block in enumerate(model.blocks):
            x = block.forward(x, positions, docs)
            if i in resid:
                s[f"stability/resid_rms/L{i}"] = _rms(x)
        h = model.norm(x).flatten(0, 1)
    finally:
        for hk in hooks:
            hk.remove()
    w = model.head_weight[: model.cfg.vocab_size]
    lmax = torch.full((), float("-inf"), device=h.device)
    lsum = torch.zeros((), device=h.device, dtype=torch.float64)
    rows = max(1, 2**24 // w.shape[0])  # <= 64 MB of fp32 logits at a time
    for r in range(0, h.shape[0], rows):
        logits = (h[r : r + rows] @ w.to(h.dtype).t()).float()
        lmax = torch.maximum(lmax, logits.max())
        lsum += logits.double().sum()
    s["stability/output_logit_max"] = lmax
    s["stability/output_logit_mean"] = (lsum / (h.shape[0] * w.shape[0])).float()
    for i, st in enumerate(per_layer):
        s[f"attn/max_logit/L{i}"] = st["max_logit"].max()
        s[f"attn/entropy/L{i}"] = st["entropy"].mean()
    s["attn/max_logit"] = torch.stack([st["max_logit"].max() for st in per_layer]).max()
    s["attn/entropy_min"] = torch.stack([st["entropy"].min() for st in per_layer]).min()
    for i, pe in enumerate(model.pes()):
        for name, v in pe.stats().items():
            if torch.is_tensor(v) and v.numel() == 1:
                s[f"pe/{name}/L{i}"] = v.detach().reshape(())
            elif torch.is_tensor(v) and v.numel() <= 64:  # small vectors (e.g. per-head values)
                for j, x in enumerate(v.detach().flatten()):
                    s[f"pe/{name}/{j}/L{i}"] = x
            elif isinstance(v, (int, float)):
                s[f"pe/{name}/L{i}"] = torch.tensor(float(v))
    out = {"scalars": s}
    if nr:
        offsets = curve_offsets(T)
        layers = []
        for st in per_layer:
            nr_heads, _ = relative_decomposition(st["map"])
            nr_layer, curve = relative_decomposition(st["map"].mean(0))
            layers.append(
                {
                    "nr": float(nr_layer),
                    "nr_heads": [round(float(v), 6) for v in nr_heads],
                    "max_logit_heads": [round(float(v), 5) for v in st["max_logit"]],
                    "entropy_heads": [round(float(v), 5) for v in st["entropy"]],
                    "offset_mean": [round(float(curve[o]), 5) for o in offsets],
                }
            )
        out["nr"] = {"seq_len": T, "batch": int(idx.shape[0]), "offsets": offsets, "layers": layers}
    return out
