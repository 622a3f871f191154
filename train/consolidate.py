"""`python -m train.consolidate <sharded ckpt dir> <out.ckpt>`: one file from an FSDP sharded checkpoint.

An FSDP run with `trainer.fsdp.state_dict_type=sharded` writes each checkpoint as a directory:
one torch.distributed.checkpoint (DCP) shard per rank (`__<rank>_0.distcp` + `.metadata`) holding
the model and optimizer tensors, and `meta.pt` (step, loops, LR scheduler, RNG, ...) from rank 0.
This tool reads every shard in one process (no GPU, no process group) and writes an ordinary
Lightning checkpoint file:

- `state_dict`: full tensors under the same names a single-device run uses (`model.embed.weight`, ...);
- `optimizer_states`: AdamW state with full-shape moments, keyed by parameter name, with the
  param groups in the optimizer's order -- `torch.optim.Optimizer.load_state_dict` maps them by
  position (1 GPU, DDP) and FSDP maps them by name, so the file resumes on any number of GPUs
  with any strategy;
- everything from `meta.pt` unchanged.

The write is atomic (temporary file, fsync, rename); `out` may be the input's own `last.ckpt`
link, which is then replaced by the single file (the step directories stay).

Tensors are loaded at their saved precision (fp32 parameters and moments) on the CPU: the host
needs about 16 bytes per parameter of memory (12 GB for gpt_770m).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from pelab.train.checkpoints import AtomicCheckpointIO, is_sharded_checkpoint, replace_dir
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


def load_sharded(path: str | Path) -> dict:
    """The full Lightning checkpoint dict of a sharded (DCP) checkpoint directory."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"{path} is not a sharded checkpoint directory (expected meta.pt and DCP shard files); "
            f"a single-file checkpoint needs no consolidation"
        )
    # torch's converter writes the shards' contents as one torch.save file (beside the checkpoint: the
    # same disk), which is read back lazily and deleted.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        dcp_to_torch_save(path, Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=False, mmap=True)
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {k: _plain(v) for k, v in state.pop("model").items()}
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_optimizer_state(state.pop(k)) for k in optimizers]
    if state:
        checkpoint["extra_distributed_state"] = state
    return checkpoint


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone().contiguous()
    return v


def _optimizer_state(osd: dict) -> dict:
    """FSDP's name-keyed optimizer state as loaded from DCP, with plain full tensors."""
    state = {name: {k: _plain(v) for k, v in s.items()} for name, s in osd["state"].items()}
    return {"state": state, "param_groups": [dict(g) for g in osd["param_groups"]]}


def consolidate(src: str | Path, out: str | Path) -> dict:
    """Write the single-file checkpoint of sharded checkpoint `src` to `out`; returns a summary."""
    checkpoint = load_sharded(src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".consolidating")
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp)
    replace_dir(tmp, out)  # also replaces a `last.ckpt` symlink or directory
    n = sum(t.numel() for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor))
    return {
        "src": str(src),
        "out": str(out),
        "global_step": checkpoint.get("global_step"),
        "tensors": len(checkpoint["state_dict"]),
        "numel": n,
        "optimizers": len(checkpoint["optimizer_states"]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__.split("\n")[0])
    p.add_argument("src", help="sharded checkpoint directory (e.g. runs/<run>/checkpoints/last.ckpt)")
    p.add_argument("out", help="single-file checkpoint to write (e.g. runs/<run>/checkpoints/consolidated.ckpt)")
    args = p.parse_args(argv)
    try:
        info = consolidate(args.src, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"wrote {info['out']}: step {info['global_step']}, {info['tensors']} tensors ({info['numel']:,} values), "
        f"{info['optimizers']} optimizer state(s)"
    )


if __name__ == "__main__":
    main()
