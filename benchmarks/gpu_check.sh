#!/usr/bin/env bash
# The sampler's and trainer's GPU paths on a lent GPU (one H100 or H200) in under 8 minutes, imports included.
#
#     bash benchmarks/gpu_wheels.sh           # once, where pip can download: .whl/site.tar.xz (nibabel, SimpleITK)
#     bash benchmarks/gpu_check.sh            # on the GPU node, from the checkout with .whl/ beside it
#     bash benchmarks/gpu_check.sh --dry-run  # every stage, tiny, on the CPU (checks the check itself)
#
# Stages (benchmarks/gpu_check.py, one process; training.prepare runs beside it): host syncs while sampling
# (torch.cuda.set_sync_debug_mode), sampling speed (slices/s, achieved TFLOP/s against the chip's bf16 peak, fp32,
# bf16, bf16 channels_last; the batch `auto` picks), batch-size independence, bf16 vs fp32 output, the `auto` plan
# against the measured peak, out of memory while sampling, training speed and peak memory per batch with and
# without checkpointing, resume under deterministic algorithms, torch.compile last (if the time left allows). Each
# prints one PASS/FAIL/SKIP line with its threshold; the full log goes to $OUT/gpu_check.log (else the work
# folder); the exit status is 1 if any stage failed.
# Environment: PYTHON (default python3), WORK (default a new temporary folder).
set -uo pipefail

export GPU_CHECK_START="$(date +%s.%N)"  # the total-time stage counts from here (installs and imports included)
DRY=()
[[ "${1:-}" == "--dry-run" ]] && DRY=(--dry-run)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
WORK="${WORK:-$(mktemp -d)}"
LOG="${OUT:-$WORK}/gpu_check.log"
mkdir -p "$WORK" "$(dirname "$LOG")"
: > "$LOG"
echo "gpu_check: git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), work folder $WORK, log $LOG" | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$LOG"

# The packages the GPU node lacks travel as .whl/site.tar.xz (benchmarks/gpu_wheels.sh): unpacked into a temporary
# folder put first on the path. Never torch: the archive holds none, and the node's torch is the one to test.
SITE=""
if ! "$PY" -c "import nibabel, SimpleITK" 2>>"$LOG"; then
  if [[ ! -f .whl/site.tar.xz ]]; then
    echo "FAIL wheels: nibabel or SimpleITK is missing and .whl/site.tar.xz is not there (run benchmarks/gpu_wheels.sh where pip can download, and carry .whl)" | tee -a "$LOG"
    exit 1
  fi
  SITE="$(mktemp -d)"
  if ! "$PY" - "$SITE" .whl/site.tar.xz <<'EOF' 2>&1 | tee -a "$LOG"; then
import sys, tarfile
target, archive = sys.argv[1], sys.argv[2]
with tarfile.open(archive) as tar:
    names = tar.getnames()
    if any(n.lstrip("./").split("/")[0] == "torch" for n in names):
        sys.exit("the archive holds torch: refusing to install it")
    tar.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
print(f"installed {len(names)} files from {archive} into {target}")
EOF
    echo "FAIL wheels: .whl/site.tar.xz could not be unpacked" | tee -a "$LOG"
    exit 1
  fi
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the resume stage (read when CUDA starts)

timeout -k 10 570 "$PY" benchmarks/gpu_check.py --log "$LOG" --work "$WORK" "${DRY[@]}"
status=$?
if (( status == 124 || status == 137 )); then
  echo "FAIL gpu_check: stopped after 570 s (the budget is 480 s); see $LOG" | tee -a "$LOG"
elif (( status != 0 && status != 1 )); then
  echo "FAIL gpu_check: exit status $status; see $LOG" | tee -a "$LOG"
fi
[[ -n "$SITE" ]] && rm -rf "$SITE"
exit $(( status == 0 ? 0 : 1 ))
