"""`python -m train [overrides]`: pretrain one (model, PE, data) cell; `-m` for a Hydra multirun.

The run directory (`runs/<model>-<pe>-<data>-s<seed>` by default) holds config.yaml, metrics.csv,
checkpoints/, loss.png and summary.json; rerunning the same command continues from
checkpoints/last.ckpt. The training itself: pelab.train.run; the options: conf/ and pelab.train.schema.
"""

from pelab.train.config import hydra_entry


def task(cfg) -> float | None:  # defined here: Hydra names the job (and its log file, __main__.log) after this module
    from pelab.train.run import train_job  # Lightning is imported once the config composed

    return train_job(cfg)


main = hydra_entry(task, "config")

if __name__ == "__main__":
    main()
