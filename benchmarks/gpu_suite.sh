#!/usr/bin/env bash
# The GPU figures in one command (its parts' time limits sum to under 9 minutes on one GPU), into
# benchmarks/results/gpu_*.md:
#   gpu_throughput.md        samples/s, MFU and peak memory of avbert_base in bf16 at the paper's
#                            window for ZeRO-1/2/3 and each sharing mode, activation checkpointing
#                            on and off (model_throughput.py)
#   gpu_step_overhead.md     pemt's step (eager and train.compile) and loop against a bare DDP
#                            loop (step_overhead.py)
#   gpu_sparse_attention.md  dense vs block-sparse attention, time and memory, 62-962 tokens
#   gpu_flex_attention.md    the same, with FlexAttention's kernel for the pattern beside the gathered one
#   gpu_batchnorm.md         the CNNs' global BatchNorm: explicit ops vs torch's fused kernels, time, memory
#                            and agreement, on one process and across two (batchnorm.py)
#   gpu_suite.log            the device, the software, and each part's outcome and duration
#
#   benchmarks/gpu_suite.sh                 # on a GPU machine, after `make setup`
#   benchmarks/gpu_suite.sh --device cpu    # the same script at reduced sizes, into a temp folder
#
# A part that fails or runs past its share of the time is recorded and the others still run;
# the script exits non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="${2:?--device cuda|cpu}"; fi
PY="${PY:-.venv/bin/python}"
if [[ "$DEVICE" == cuda ]]; then
    RESULTS="${RESULTS:-benchmarks/results}"
    PREFIX=gpu
else
    RESULTS="${RESULTS:-$(mktemp -d -t pemt-gpu-suite-XXXX)}"
    PREFIX=cpu_smoke
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/${PREFIX}_suite.log"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
failed=0

{
    echo "# $(date -u +%FT%TZ) pemt $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" 2>/dev/null
    if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
} | tee "$LOG"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "## $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tail -n 40 >>"$LOG"
    local rc=${PIPESTATUS[0]}
    echo "## $name: exit $rc after $((SECONDS - started)) s" | tee -a "$LOG"
    if [[ $rc -ne 0 ]]; then failed=1; fi
}

if [[ "$DEVICE" == cuda ]]; then
    part throughput 210 "$PY" benchmarks/model_throughput.py --device cuda --batch 8 --steps 6 \
        --out "$RESULTS/gpu_throughput.md"
    # ZeRO-1/3 are in the throughput table; compiling both models takes a minute of this share.
    part step_overhead 150 "$PY" benchmarks/step_overhead.py --models tiny mid --variants bare zero2 compiled loop \
        --steps 15 --warmup 3 --ranks 1 --out "$RESULTS/gpu_step_overhead.md"
    part sparse_attention 60 "$PY" benchmarks/sparse_attention.py --device cuda --precision bf16 --batch 8 \
        --out "$RESULTS/gpu_sparse_attention.md"
    # Each length compiles the kernel (forward and backward): the paper's 16 tokens per clip fits the share.
    part flex_attention 60 "$PY" benchmarks/sparse_attention.py --device cuda --precision bf16 --batch 8 --flex \
        --lengths 16 --out "$RESULTS/gpu_flex_attention.md"
    # --ranks 2: SyncBatchNorm's kernels across two processes on the one GPU (gloo), against one process.
    part batchnorm 45 "$PY" benchmarks/batchnorm.py --device cuda --precision bf16 --ranks 2 \
        --out "$RESULTS/gpu_batchnorm.md"
else  # the same scripts and precision on the smallest sizes (about 2 min; tests/test_benchmarks.py runs it)
    part throughput 300 "$PY" benchmarks/model_throughput.py --device cpu --batch 2 --steps 1 --stages 2 \
        --out "$RESULTS/cpu_smoke_throughput.md"
    part step_overhead 300 "$PY" benchmarks/step_overhead.py --models tiny --variants bare zero2 loop --steps 2 \
        --warmup 1 --ranks 2 --out "$RESULTS/cpu_smoke_step_overhead.md"
    part sparse_attention 120 "$PY" benchmarks/sparse_attention.py --device cpu --precision bf16 --batch 1 \
        --repeats 1 --lengths 1 2 --out "$RESULTS/cpu_smoke_sparse_attention.md"
    part batchnorm 60 "$PY" benchmarks/batchnorm.py --device cpu --precision bf16 --clips 2 --crop 32 --repeats 2 \
        --ranks 2 --out "$RESULTS/cpu_smoke_batchnorm.md"
fi
echo "results in $RESULTS" | tee -a "$LOG"
exit $failed
