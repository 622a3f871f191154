"""pelab checkpoints as an lm-evaluation-harness model named `pelab`, so any harness task can be run.

    pelab-lm-eval --model pelab --model_args checkpoint=runs/<run>,batch_size=16 --tasks arc_easy,hellaswag
    python -m train.eval.lm_eval_adapter --model pelab --model_args checkpoint=<ckpt>,pe.base=500000 --tasks ...

Both commands are `lm_eval`'s own command line (`lm_eval.__main__.cli_evaluate`) with the model
registered first (the harness has no plugin discovery for models, so the plain `lm_eval` command
only knows `pelab` after `import train.eval.lm_eval_adapter`). From Python:

    import lm_eval, train.eval.lm_eval_adapter  # registers "pelab"
    lm_eval.simple_evaluate(model="pelab", model_args="checkpoint=runs/<run>", tasks=["arc_easy"])

model_args: checkpoint (run dir or .ckpt, required), batch_size, max_length (default: the
training length), device, precision (auto | bf16 | fp32), attention_backend, and PE overrides for
context extension as `pe.base=...`, `pe.scaling=...`, `pe.factor=...`, `pe.original_max_len=...`.
The requests are scored by `train.eval.zeroshot.Scorer`, the same code as `python -m train.eval
suite=zeroshot`, so both give the same numbers on the same items. lm_eval is imported lazily:
install it with `pip install -e .[eval]`.
"""

from __future__ import annotations

import sys

import torch
from pelab.train.eval.checkpoint import load
from pelab.train.eval.zeroshot import GPTModel, Scorer

_CLASS = None


def _as_int(v, default=None):
    if v in (None, "", "auto"):
        return default
    return int(float(v))


def lm_class():
    """The harness model class (built on first use, so importing this module needs no lm_eval)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from lm_eval.api.model import LM  # the optional extra [eval]
    except ImportError:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install -e '.[eval]' (or pip install lm-eval)"
        ) from None

    class PelabLM(LM):
        def __init__(
            self,
            checkpoint: str,
            batch_size=16,
            max_length=None,
            device: str = "auto",
            precision: str = "auto",
            attention_backend=None,
            max_batch_size=None,
            **kwargs,
        ):
            super().__init__()
            pe = {k[3:]: v for k, v in kwargs.items() if k.startswith("pe.")}
            unknown = sorted(k for k in kwargs if not k.startswith("pe.") and kwargs[k] is not None)
            if unknown:
                raise ValueError(
                    f"unknown pelab model_args {unknown}; known: checkpoint, batch_size, max_length, "
                    f"device, precision, attention_backend, pe.<base|scaling|factor|original_max_len>"
                )
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
            self.loaded = load(
                checkpoint,
                pe,
                device=device or "auto",
                precision=precision or "auto",
                attention_backend=attention_backend,
            )
            self.lm = GPTModel(self.loaded.model, self.loaded.device, self.loaded.autocast_dtype)
            self.scorer = Scorer(
                self.lm,
                self.loaded.tokenizer,
                max_length=_as_int(max_length, self.loaded.train_len),
                batch_size=_as_int(batch_size, 16) or 16,
            )

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
            # --batch_size / --device of the command line apply unless model_args set them.
            args = dict(arg_dict)
            for key in ("batch_size", "device"):
                value = (additional_config or {}).get(key)
                if value is not None and key not in args:
                    args[key] = value
            return cls(**args)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            from lm_eval.utils import simple_parse_args_string  # the optional extra [eval]

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        @property
        def eot_token_id(self) -> int:
            return self.loaded.tokenizer.eot_id

        @property
        def max_length(self) -> int:
            return self.scorer.max_length

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return self.scorer.encode(string)

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.loaded.tokenizer.decode(tokens)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return self.scorer.generate_until([(r.args[0], r.args[1] if len(r.args) > 1 else {}) for r in requests])

    _CLASS = PelabLM
    return PelabLM


def register(name: str = "pelab"):
    """Register the model with lm-evaluation-harness under `name` (idempotent); returns the class."""
    from lm_eval.api.registry import model_registry, register_model  # the optional extra [eval]

    cls = lm_class()
    if name in model_registry:
        return model_registry.get(name)
    register_model(name)(cls)
    return cls


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the `pelab` model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate  # the optional extra [eval]

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


try:  # `import train.eval.lm_eval_adapter` registers the model when lm_eval is installed
    register()
except ImportError:
    pass


if __name__ == "__main__":
    main()
