"""The config of every pelab command: schemas for Hydra, composition, one-line errors, the model config.

`register_schemas()` stores the schema of every config group in Hydra's ConfigStore: the dataclasses
of train/schema.py, a PE's options from its constructor (`schema/pe/<name>`), an optimizer's from its
function (`schema/optim/<name>`) and the eval suites' option blocks (`eval_schema`); conf/config.yaml
and conf/eval.yaml list them first in their defaults, so every YAML file and override is checked
against them while Hydra composes. `compose()` is what the commands see; `hydra_entry()` runs a
command under Hydra and reports a config problem as one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
from pelab.data.tokenizer import tokenizer_from_cfg
from pelab.models import pe as pe_registry
from pelab.models.config import GPTConfig
from pelab.models.kernels import check_backend
from pelab.train import optim
from pelab.train.eval import suites
from pelab.train.schema import EvalRunConfig, TrainConfig, options_dataclass

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config problem found before any heavy work; the message names the fix."""


# ---- resolvers -------------------------------------------------------------------------------------


def short_dirname(name: str, limit: int = 200) -> str:
    """A sweep cell's directory name (its overrides), cut to fit file-system limits (255 bytes) with a
    hash of the full name so distinct cells stay distinct."""
    if len(name.encode()) <= limit:
        return name
    return name.encode()[: limit - 9].decode(errors="ignore") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def checked_run_name(name: Any) -> str:
    """`run_name` as the run directory's name under paths.runs: refused when empty or a path."""
    text = "" if name is None else str(name)
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text:
        raise ConfigError(
            f"run_name={text!r} must name one directory inside paths.runs (not empty, no '/', not '.' or '..'); "
            f"e.g. run_name=my-run, or paths.runs=<dir> to write elsewhere"
        )
    return text


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("pelab.if", lambda cond, a, b: a if cond else b, replace=True)
    OmegaConf.register_new_resolver("pelab.dirname", short_dirname, replace=True)
    OmegaConf.register_new_resolver("pelab.run_name", checked_run_name, replace=True)
    # Every registered PE, comma-separated: the PE matrix of conf/sweep/pe_matrix.yaml.
    OmegaConf.register_new_resolver("pelab.pe_names", lambda: ",".join(pe_registry.available()), replace=True)


# ---- schemas -----------------------------------------------------------------------------------------


def pe_schema(name: str) -> type:
    """The `pe` group's schema for PE `name`: its name and constructor options."""
    return options_dataclass(f"PE_{name}", [("name", str, name), *pe_registry.options(name)])


def eval_schema() -> type:
    """The root of `python -m train.eval`: the run options plus one options block per eval suite."""
    blocks = [(s.options_key, s.Options, s.Options()) for s in suites.SUITES.values()]
    return options_dataclass("EvalConfig", blocks, bases=(EvalRunConfig,))


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (again: PEs and optimizers registered since count too)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=eval_schema())
    for name in pe_registry.available():
        cs.store(group="schema/pe", name=name, node=pe_schema(name))
    for name in optim.available():
        cs.store(group="schema/optim", name=name, node=optim.optim_schema(name))


register_resolvers()
register_schemas()


# ---- composition and errors --------------------------------------------------------------------------


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config `python -m train <overrides>` (config_name="eval": `python -m train.eval`) would see,
    without Hydra's runtime keys. Inside a running Hydra app (the periodic evaluation) the app's
    Hydra state is used as it is."""
    register_schemas()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def unknown_keys(node: Any, where: str = "") -> list[str]:
    """Keys of a composed config that its schema does not have (Hydra's `+key=...` adds any key, and
    would otherwise be ignored silently): "'foo' is not a key of trainer; valid keys: ..."."""
    if not isinstance(node, DictConfig):
        return []
    problems = []
    keys = [k for k in node.keys() if where or k != "hydra"]  # a sweep cell's config also holds Hydra's own
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in keys:
            if key not in known:
                problems.append(f"'{key}' is not a key of {where or 'the config'}; valid keys: {', '.join(known)}")
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            problems += unknown_keys(child, f"{where}.{key}" if where else str(key))
    return problems


def check_known_keys(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg)
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def config_error_message(e: BaseException) -> str | None:
    """One line for a config problem (unknown key, wrong type, unknown choice, bad override syntax,
    ConfigError), naming the key and, for an unknown key, the valid ones. None for any other error."""
    if isinstance(e, ConfigError):
        return str(e)
    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    cause = e if isinstance(e, OmegaConfBaseException) else (e.__cause__ or e.__context__)
    if isinstance(e, MissingConfigException) or not isinstance(cause, OmegaConfBaseException):
        text = str(e).split("\nConfig search path")[0]
        return _one_line(text.replace(":\n\t", ": ").replace("\n\t", ", ").replace("\n\n", ". "))
    head = str(e).splitlines()[0].rstrip(":. ") if isinstance(e, HydraException) else ""
    head = re.sub(r"^(In '[^']*'): \w+ raised while composing config$", r"\1", head)
    full_key = getattr(cause, "full_key", None) or ""
    node = getattr(cause, "parent_node", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and isinstance(node, DictConfig):
        where = full_key.rpartition(".")[0] or "the config"
        detail = f"'{cause.key}' is not a key of {where}; valid keys: {', '.join(map(str, node.keys()))}"
    elif isinstance(cause, ValidationError):
        detail = f"{_one_line(cause.msg.splitlines()[0])} (key {full_key})"
    else:
        detail = _one_line(getattr(cause, "msg", None) or str(cause))
    return f"{head}: {detail}" if head else detail


# Keys whose values are paths: a sweep cell's directory (`.../pe=rope,seed=1`) is passed as it is.
PATH_KEYS = ("checkpoint", "init_from", "eval.out_dir", "eval.data_dir", "paths.runs", "paths.data", "hydra.sweep.dir")


def quote_path_value(arg: str) -> str:
    """`checkpoint=runs/multirun/x/pe=rope,seed=1` -> `checkpoint='runs/multirun/x/pe=rope,seed=1'`: Hydra's
    override grammar reads `=` and `,` in a value as syntax, so a path value holding `=` (never valid
    unquoted), or an existing path holding `,`, is quoted."""
    key, sep, value = arg.partition("=")
    if not sep or key not in PATH_KEYS or not value or value[0] in "'\"" or "'" in value:
        return arg
    if "=" in value or ("," in value and Path(value).expanduser().exists()):
        return f"{key}='{value}'"
    return arg


def hydra_entry(task_function: Callable[[DictConfig], Any], config_name: str) -> Callable[[], None]:
    """The command-line entry point running `task_function` under Hydra (overrides, `-m` multiruns,
    launchers, sweep callbacks) on conf/<config_name>.yaml. A config problem prints one line and exits
    with status 2 (set HYDRA_FULL_ERROR=1 for Hydra's own report)."""
    hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task_function)

    def main() -> None:
        sys.argv[1:] = [quote_path_value(arg) for arg in sys.argv[1:]]
        user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing; we print one line
        try:
            hydra_main()
        except Exception as e:
            message = None if user_wants_traceback else config_error_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return main


# ---- the model ---------------------------------------------------------------------------------------


def to_dict(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_vocab_size(cfg: DictConfig) -> int:
    """Model vocabulary: `model.vocab_size` when set, else the configured tokenizer's."""
    tok = cfg.data.tokenizer
    tokenizer_vocab = tokenizer_from_cfg(tok).vocab_size
    requested = cfg.model.get("vocab_size")
    if requested and int(requested) < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={requested} is smaller than the {tok.name} tokenizer's {tokenizer_vocab} "
            f"tokens; drop model.vocab_size (it defaults to the tokenizer's) or pick a matching tokenizer"
        )
    return int(requested or tokenizer_vocab)


def model_config(cfg: DictConfig, *, vocab_size: int | None = None) -> GPTConfig:
    """The `GPTConfig` of a composed config (also of a run's saved config.yaml): the `model` group plus
    the PE (`pe`), `kv_shift` and `trainer.attention_backend`; the vocabulary and the end-of-text id
    default to the tokenizer's. `vocab_size` skips the tokenizer (synthetic data in tests)."""
    d = to_dict(cfg.model)
    d["vocab_size"] = vocab_size or model_vocab_size(cfg)
    d["pe"] = to_dict(cfg.pe)
    d["kv_shift"] = bool(cfg.kv_shift)
    backend = OmegaConf.select(cfg, "trainer.attention_backend")
    if backend:
        try:
            check_backend(backend)
        except ValueError as e:
            raise ConfigError(f"trainer.attention_backend: {e}") from None
        d["attention_backend"] = backend
    if d.get("document_mask") and d.get("eot_id") is None:  # documents begin with the tokenizer's eot
        d["eot_id"] = tokenizer_from_cfg(cfg.data.tokenizer).eot_id
    try:
        return GPTConfig.from_dict(d)
    except ValueError as e:  # GPTConfig's own checks (head sizes, ...)
        raise ConfigError(f"model: {e}") from None
