"""Evaluation of pelab checkpoints: `python -m train.eval checkpoint=<run dir or .ckpt> suite=<name>`.

Modules: `run` (the command: eval.json / eval.md), `suites` (every suite as one object: options, run,
metrics, markdown), `checkpoint` (model + tokenizer + training config, context-extension overrides),
`zeroshot` (lm-evaluation-harness-style scoring for any logits function), `tasks` (task prompts and
data loaders), `ppl` (perplexity vs length), `retrieval` (passkey / needle / RULER-style tasks),
`babilong` (bAbI-style reasoning facts in a haystack), `callback` (periodic evaluation during
training), `lm_eval_adapter` (the `pelab` model for lm-evaluation-harness).
"""
