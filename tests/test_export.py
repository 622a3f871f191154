"""`python -m train.export`: every PE (and KV-shift, document masking, the options) round-trips through a
Hugging Face folder with pelab's logits (fp32, CPU, 1e-4) and pelab's greedy tokens; RoPE/NoPE in the native
Qwen3/Llama layouts; the tokenizer; bad input."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_pe import ALL_PES, pe_spec

pytest.importorskip("transformers")

from pelab.train.modeling_pelab import PES  # noqa: E402  (needs transformers)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50257  # GPT-2: the export cuts the padded embedding (50304 rows) back to it

# (id, pe spec, model overrides, expected layout)
# Every PE with a Hugging Face implementation (train/modeling_pelab.py PES; a PE without one is
# trained and evaluated in pelab, and `python -m train.export` says it has none).
EXPORTABLE = [n for n in ALL_PES if n in PES]
CASES = [(n, pe_spec(n), {}, "qwen3" if n == "nope" else "custom") for n in EXPORTABLE] + [
    ("rope-after_norm", pe_spec("rope", before_qk_norm=False), {}, "qwen3"),
    ("rope-linear-after_norm", pe_spec("rope", before_qk_norm=False, scaling="linear", factor=4.0), {}, "qwen3"),
    ("rope-no_qk_norm", pe_spec("rope"), {"qk_norm": False}, "llama"),
    ("nope-no_qk_norm", pe_spec("nope"), {"qk_norm": False}, "llama"),
    ("rope-yarn", pe_spec("rope", scaling="yarn", factor=8.0, original_max_len=16), {}, "custom"),
    ("rope-kv_shift", pe_spec("rope", before_qk_norm=False), {"kv_shift": True}, "custom"),
    ("fox-kv_shift", pe_spec("fox"), {"kv_shift": True}, "custom"),
    ("alibi-document_mask", pe_spec("alibi"), {"document_mask": True, "eot_id": 50256}, "custom"),
    ("grape_m-rodrigues", pe_spec("grape_m", form="rodrigues"), {}, "custom"),
    ("grape_m-per_head", pe_spec("grape_m", share_across_heads=False), {}, "custom"),
    ("grape_m_ctx-first_release", pe_spec("grape_m_ctx", init_mode="first_release"), {}, "custom"),
    ("grape_a_k-linear", pe_spec("grape_a_k", gate="linear"), {}, "custom"),
    ("grape_ap-paper", pe_spec("grape_ap", query_probe_norm=True, learn_alpha=True), {}, "custom"),
    ("fox-pro", pe_spec("fox", output_gate=True, output_norm=True), {}, "custom"),
]


def tiny_checkpoint(path: Path, pe: dict, **model) -> Path:
    """An untrained GQA model in the Lightning checkpoint layout, with every PE parameter and QK-norm gain
    moved off its initial value (unequal gains within rotary pairs)."""
    from pelab.models.config import GPTConfig
    from pelab.models.gpt import GPT

    cfg = dict(name="tiny", vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=40)
    cfg = GPTConfig(**{**cfg, **model}, pe=dict(pe))
    torch.manual_seed(0)
    gpt = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "norm" in name or ".pe." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {f"model.{k}": v for k, v in gpt.state_dict().items()}
    torch.save({"state_dict": sd, "pelab": {"model_cfg": cfg.__dict__}, "global_step": 7}, path)
    return path


def pelab_model(ckpt: Path):
    from pelab.train.eval.checkpoint import load

    return load(ckpt, device="cpu", precision="fp32", train_len=32).model


@torch.no_grad()
def pelab_greedy(model, idx: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = model(idx)[:, -1, :VOCAB].argmax(-1, keepdim=True)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_export_round_trips_logits_and_greedy_tokens(case, tmp_path):
    from pelab.train.export import export
    from transformers import AutoModelForCausalLM

    name, pe, model_overrides, layout = case
    ckpt = tiny_checkpoint(tmp_path / "run" / "last.ckpt", pe, **model_overrides)
    out = tmp_path / f"hf-{name}"
    summary = export(ckpt, out, verify=False, train_len=32)
    assert summary["layout"] == layout, summary
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=layout == "custom").eval()
    assert (type(hf).__name__, hf.dtype) == (
        {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}.get(layout, "PelabForCausalLM"),
        torch.float32,
    )
    ours = pelab_model(ckpt)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 24), generator=g)
    if model_overrides.get("document_mask"):
        idx[:, [5, 14]] = 50256  # documents begin at end-of-text tokens
    with torch.no_grad():
        want = ours(idx)[..., :VOCAB]
        got = hf(input_ids=idx).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    prompt = idx[:1, :10]
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, pelab_greedy(ours, prompt, 6))


def test_export_folder_tokenizer_card_and_left_padded_generation(tmp_path):
    from pelab.data.tokenizer import load_tokenizer
    from pelab.train.export import export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_checkpoint(tmp_path / "run" / "last.ckpt", pe_spec("fox"), kv_shift=True)
    out = tmp_path / "hf"
    summary = export(ckpt, out, train_len=32)  # verify=true: reloaded and checked inside
    assert summary["max_logit_difference"] < 1e-4
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_pelab.py", "tokenizer.json", "README.md"} <= files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temp folder left beside it
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pelab.PelabForCausalLM"
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == 50256 and config["pe"]["name"] == "fox"
    # The modeling file stands alone: no pelab import.
    tree = ast.parse((out / "modeling_pelab.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in imported if m.split(".")[0] == "pelab"], imported
    # AutoTokenizer gives pelab's ids and text.
    hf_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ours = load_tokenizer("gpt2")
    text = (REPO / "README.md").read_text()[:20000]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text and hf_tok.eos_token_id == 50256
    assert hf_tok("a<|endoftext|>")["input_ids"] == [64, 50256]  # Hugging Face's GPT-2: the special token
    # A left-padded batch generates what each prompt generates alone.
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    hf_tok.pad_token, hf_tok.padding_side = hf_tok.eos_token, "left"
    prompts = ["The grass is green and", "A much longer prompt, which needs no padding at all, ends"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    together = hf.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=50256)[:, -5:]
    for row, p in zip(together, prompts):
        alone = hf_tok(p, return_tensors="pt")
        assert torch.equal(row, hf.generate(**alone, max_new_tokens=5, do_sample=False)[0, -5:])


def test_the_tokenizer_of_an_hf_tokenizer_run_is_copied(tmp_path):
    from pelab.train.export import hf_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3, "</s>": 4}
    tk = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    from pelab.data.tokenizer import load_tokenizer

    ours = load_tokenizer("hf", str(tmp_path))
    hf = hf_tokenizer(ours)
    assert hf("ab a b", add_special_tokens=False)["input_ids"] == ours.encode("ab a b") == [3, 1, 2]
    assert hf.eos_token == "</s>"


def test_cli_and_bad_input(tmp_path, capsys):
    from pelab.train.export import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    ckpt = tiny_checkpoint(tmp_path / "run" / "last.ckpt", pe_spec("alibi"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "train.export", f"checkpoint={ckpt}", f"out={out}", "train_len=32"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["layout"] == "custom"
    assert (out / "model.safetensors").is_file()
    bad = [
        ((f"checkpoint={ckpt}", f"out={out}", "train_len=32"), "exists and is not empty"),
        (
            (f"checkpoint={ckpt}", f"out={tmp_path / 'q'}", "train_len=32", "layout=qwen3"),
            "cannot be exported as qwen3",
        ),
        ((f"checkpoint={ckpt}", f"out={tmp_path / 'x'}"), "pass train_len=<tokens>"),
        ((f"checkpoint={tmp_path / 'nope'}", f"out={tmp_path / 'y'}"), "not found"),
        ((f"checkpoint={ckpt}", "out"), "bad argument 'out'"),
        ((f"checkpoint={ckpt}", f"out={tmp_path / 'z'}", "dtype=int8"), "dtype must be"),
    ]
    for args, message in bad:
        with pytest.raises(SystemExit) as err:
            main(list(args))
        assert message in str(err.value), (args, str(err.value))
    assert not any((tmp_path / d).exists() for d in "qxyz")


def test_overwrite_replaces_the_folder_and_a_failed_export_leaves_it(tmp_path, capsys):
    from pelab.data.atomic import atomic_dir
    from pelab.train.export import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        (d / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    ckpt = tiny_checkpoint(tmp_path / "run" / "last.ckpt", pe_spec("rope", before_qk_norm=False))
    main([f"checkpoint={ckpt}", f"out={out}", "train_len=32", "overwrite=true"])
    assert "old.txt" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
