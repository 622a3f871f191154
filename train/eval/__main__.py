"""`python -m train.eval checkpoint=<run dir or .ckpt> suite=<zeroshot|ppl_vs_length|retrieval|babilong|all> [...]`.

What it writes: pelab.train.eval.run; the suites: pelab.train.eval.suites; options: conf/eval.yaml.
"""

from pelab.train.config import hydra_entry


def task(cfg) -> None:  # defined here: Hydra names the job after this module
    from pelab.train.eval.run import eval_job  # torch and the suites are imported once the config composed

    eval_job(cfg)


main = hydra_entry(task, "eval")

if __name__ == "__main__":
    main()
