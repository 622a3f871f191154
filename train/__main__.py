"""`python -m train [overrides]`: pretrain one (model, PE, data) cell; `-m` for a Hydra multirun.

The run directory (`runs/<model>-<pe>-<data>-s<seed>` by default) holds config.yaml, metrics.csv,
checkpoints/, loss.png and summary.json; rerunning the same command continues from
checkpoints/last.ckpt. The training itself: pelab.train.run; the options: conf/ and pelab.train.schema.
"""

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads libgomp). libgomp's default spin
# at every barrier made a gpt_tiny CPU step 12x slower when other processes share the cores (8.3 s vs
# 0.67 s on 2 cores, bench/RESULTS.md); on idle cores steps take about a third longer, which
# OMP_WAIT_POLICY=ACTIVE wins back on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pelab.train.config import hydra_entry  # noqa: E402


def task(cfg) -> float | None:  # defined here: Hydra names the job (and its log file, __main__.log) after this module
    from pelab.train.run import train_job  # Lightning is imported once the config composed

    return train_job(cfg)


main = hydra_entry(task, "config")

if __name__ == "__main__":
    main()
