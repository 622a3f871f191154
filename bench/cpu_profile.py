"""CPU profile of the default job's training step (gpt_tiny, 4 x 128 tokens per micro-batch, 2 micro-batches).

    OMP_WAIT_POLICY=PASSIVE python -m bench.cpu_profile                      # what `python -m train` runs
    OMP_WAIT_POLICY=ACTIVE python -m bench.cpu_profile --loss-from <git rev> # an earlier LM-head loss, spinning OpenMP

Prints seconds per step (median), tokens/s, minor page faults per step and torch.profiler's top operators
by self CPU time. OMP_WAIT_POLICY must be set in the environment: libgomp reads it when torch loads.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
from pelab.models import gpt as gpt_module
from pelab.models.gpt import GPT
from pelab.train.config import compose, model_config


def loss_from(rev: str):
    """`linear_cross_entropy` of models/loss.py at git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:models/loss.py"], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("loss_at_" + rev)
    exec(compile(source, f"{rev}:models/loss.py", "exec"), module.__dict__)
    return module.linear_cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss-from", help="git revision whose models/loss.py to use")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    if args.loss_from:
        gpt_module.linear_cross_entropy = loss_from(args.loss_from)
    torch.manual_seed(0)
    model = GPT(model_config(compose([])))  # the default job's model: gpt_tiny + RoPE
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mb, seq, accum = 4, 128, 2
    batches = torch.randint(0, 50257, (args.steps + 2, accum, mb, seq + 1))

    def step(b):
        for m in range(accum):
            out = model.loss(b[m, :, :-1], b[m, :, 1:])
            (out["loss"] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    times, faults = [], []
    for b in batches[1 : args.steps + 1]:
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(batches[-1])
    s = statistics.median(times)
    print(
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} threads={torch.get_num_threads()} "
        f"loss={'models/loss.py@' + args.loss_from if args.loss_from else 'this tree'}: "
        f"{s:.3f} s/step (median of {len(times)}), {accum * mb * seq / s:.0f} tokens/s, "
        f"{statistics.median(faults):.0f} minor page faults/step"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
