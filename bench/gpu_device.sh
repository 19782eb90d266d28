#!/usr/bin/env bash
# The GPU figures on a machine with CUDA (issue 22 item 5, issue 23's GPU figure), in two parts
# that can run as separate calls:
#   path:    bench/gpu_path.py on a 1,200-case photo phantom: `casebase train` with the CLI
#            defaults on the device (AMP), embedding throughput, Grad-CAM, index build, query
#            latency, Flat search at 1M and 10M vs FAISS on the CPU (faiss-gpu where
#            installed, else the torch-cuda backend);
#   volumes: bench/volumes.py --only ct: the 3-D CT phantom trained, indexed and evaluated on
#            the GPU (its key in volumes.json gets "on GPU").
# Each part runs under its own timeout and copies its JSON to $OUT as soon as it ends. Run from
# the repository root:   OUT=/tmp/gpu_out PY=python3 bash bench/gpu_device.sh path volumes
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia.txt" 2>&1
$PY -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'faiss', faiss.__version__, 'faiss-gpu', hasattr(faiss, 'StandardGpuResources'))" 2>&1 | tee "$OUT/env.txt"
for part in "$@"; do
  case "$part" in
    path)
      $PY -m retrieval.cli phantom /tmp/ph1200 --n 1200 --seed 21 --modality photo >/dev/null 2>"$OUT/photo_phantom.log"
      (cd bench && timeout "${GPU_PATH_S:-300}" $PY gpu_path.py --model train --index build \
        --manifest /tmp/ph1200/manifest.csv --n 1000000,10000000 --reps 3) 2>&1 | tee "$OUT/gpu_path.log"
      cp bench/results/gpu_path.json "$OUT/" 2>/dev/null ;;
    volumes)
      $PY -m retrieval.cli phantom /tmp/vol/ct_phantom --dim 3 --n 300 --seed 0 --modality ct >/dev/null 2>"$OUT/ct_phantom.log"
      (cd bench && timeout "${VOLUMES_S:-300}" $PY volumes.py --only ct --work /tmp/vol --label "on GPU") 2>&1 | tee "$OUT/volumes.log"
      cp bench/results/volumes.json "$OUT/" 2>/dev/null ;;
    *) echo "unknown part $part (path, volumes)" >&2 ;;
  esac
done
ls -la "$OUT"
