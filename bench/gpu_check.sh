#!/usr/bin/env bash
# The GPU integration check of pelab on one CUDA GPU (Hopper/Blackwell for fa4), in parts that each fit
# one ten-minute slot; every part writes its tables and raw rows to OUT and prints a short table last.
#
#   bench/gpu_check.sh PART OUT [pytest args]
#
#   1  `make test-gpu`: pytest -m gpu (every attention path through the model, incl. fa4 when
#      flash-attn-4 is installed; `python -m train` per PE with documents off/on; `python -m train.eval
#      suite=ppl_vs_length`; the kernel tests at T=4096). Table: OUT/test_gpu.md (from test_gpu.json,
#      rewritten after every test, so a stopped run still lists what passed, failed and never ran).
#      TEST_GPU_LIMIT=<s> stops pytest after that many seconds (SIGINT: the tables are still written).
#   2  The issue-14 runs through `python -m train`: gpt_355m, T=4096, micro-batch 8, 8 steps,
#      data.val_tokens=16384, model.document_mask=true for grape_ap, fox, rope, and grape_ap without.
#      RUNS_AT_ONCE (default 2) runs share the GPU (their tokens/s is then not a benchmark number).
#      Table: OUT/runs/runs.md; each run's log, metrics.csv and summary.json under OUT/runs/<name>/.
#   3  First half of the gpt_355m bench row (T=4096, micro-batch 20): the issue-14 target cells, each
#      with its document-masked cell where the kernel masks documents, and the RoPE row. OUT/bench.json,
#      OUT/latest.json (x_rope against this call's RoPE row, x_no_docs against the same cell).
#   4  Second half (its own RoPE row): GRAPE-A-K/QK, GRAPE-AP (with documents), RoPE++, GRAPE-M.
#      DENSE_REF=alibi:20,grape_a_qk:4,grape_ap:1 adds the official dense-bias cells; PES=... replaces
#      the cell list of part 3 or 4 (bench.bench --pes syntax: pe, pe@backend, pe+docs).
#      Each cell is its own process (compile ~15-20 s of its ~35 s at 2 warm-up + 3 timed steps).
#      `python -m bench.gpu_report merge OUT3/latest.json OUT4/latest.json > bench/results/latest.json`
#      joins the halves (each keeps its own RoPE yardstick). `make bench` runs the whole row in one go.
#
# PY (default python3) runs everything; the Triton, Inductor and FlashAttention-4 compile caches and the
# 355M runs' checkpoints go to GPU_CACHE (default bench/out/gpu_cache), kept between parts on the same
# machine (later parts start warm), never to OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bench/gpu_check.sh PART OUT [pytest args]}
OUT=$(realpath -m "${2:?usage: bench/gpu_check.sh PART OUT [pytest args]}")
shift 2
PY=${PY:-python3}
CACHE=$(realpath -m "${GPU_CACHE:-bench/out/gpu_cache}")
mkdir -p "$OUT" "$CACHE"
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor WANDB_MODE=offline PYTHONUNBUFFERED=1
# FlashAttention-4's on-disk cache of compiled kernels (each process would otherwise JIT them again)
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$CACHE/fa4
BENCH=(--models gpt_355m --seq-len 4096 --micro-batch 20 --backends auto --warmup 2 --steps 3 --no-isolated
  --cell-timeout 150 --out "$OUT/bench.json" --latest "$OUT/latest.json")

$PY - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, torch
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "| torch", torch.__version__)
for p in ("triton", "flash-attn-4", "nvidia-cutlass-dsl"):
    try:
        print(f"{p}: {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p}: not installed")
from pelab.models.kernels import fa4
print("fa4 backend:", fa4.missing() or "available")
EOF
cat "$OUT/env.txt"
start=$(date +%s)

case $PART in
1)
  lim=()
  [ -n "${TEST_GPU_LIMIT:-}" ] && lim=(timeout -s INT -k 30 "$TEST_GPU_LIMIT")
  rm -f "$OUT/test_gpu_rows.jsonl"
  PELAB_GPU_RESULTS=$OUT/test_gpu.json PELAB_GPU_REPORT=$OUT/test_gpu_rows.jsonl "${lim[@]}" \
    $PY -m pytest -q -m gpu -p bench.gpu_report tests/test_gpu.py tests/test_kernels.py tests/test_pathsum_kernel.py \
    "$@" >"$OUT/test_gpu.log" 2>&1
  echo "pytest exit $? after $(($(date +%s) - start)) s (log: $OUT/test_gpu.log)"
  tail -n 5 "$OUT/test_gpu.log"
  $PY -m bench.gpu_report tests "$OUT/test_gpu.json" "$OUT/test_gpu_rows.jsonl"
  ;;
2)
  data=$CACHE/data
  common=(model=gpt_355m data=sample "paths.data=$data" data.val_tokens=16384 trainer.seq_len=4096
    trainer.micro_batch_size=8 trainer.global_batch_tokens=32768 trainer.max_steps=8 resume=false)
  $PY -m data.prepare data=sample "paths.data=$data" data.val_tokens=16384 >"$OUT/prepare.log" 2>&1 ||
    { echo "data.prepare failed:"; tail -n 20 "$OUT/prepare.log"; exit 1; }
  run() {  # name pe document_mask
    local dir=$OUT/runs/$1
    mkdir -p "$dir"
    $PY -m train "${common[@]}" "pe=$2" "model.document_mask=$3" "hydra.run.dir=$CACHE/runs/$1" >"$dir/train.log" 2>&1
    echo $? >"$dir/rc"
    cp "$CACHE/runs/$1/metrics.csv" "$CACHE/runs/$1/summary.json" "$dir/" 2>/dev/null
    echo "$1: exit $(cat "$dir/rc") at $(($(date +%s) - start)) s"
  }
  n=0
  for spec in grape_ap-docs:grape_ap:true fox-docs:fox:true rope-docs:rope:true grape_ap-nodocs:grape_ap:false; do
    IFS=: read -r name pe docs <<<"$spec"
    run "$name" "$pe" "$docs" &
    n=$((n + 1))
    [ $((n % ${RUNS_AT_ONCE:-2})) -eq 0 ] && wait
  done
  wait
  rm -rf "$CACHE/runs"  # the 355M checkpoints (~4 GB each)
  $PY -m bench.gpu_report runs "$OUT/runs"
  ;;
3)
  $PY -m bench.bench "${BENCH[@]}" \
    --pes "${PES:-rope,rope@cudnn,rope+docs,nope,alibi,alibi@flex_const,alibi+docs,fox,fox@fa4,fox+docs,grape_a_q,grape_a_q@fa4}"
  ;;
4)
  $PY -m bench.bench "${BENCH[@]}" --dense-ref "${DENSE_REF:-}" \
    --pes "${PES:-rope,grape_a_k,grape_a_qk,grape_ap,grape_ap+docs,ropepp_eh,ropepp_ec,grape_m,grape_m_ctx}"
  ;;
*)
  echo "unknown part $PART (1, 2, 3 or 4)" >&2
  exit 2
  ;;
esac
echo "part $PART done in $(($(date +%s) - start)) s; outputs in $OUT"
