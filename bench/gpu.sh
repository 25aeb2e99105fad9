#!/usr/bin/env bash
# Benchmark 6 of issues 9 and 17: the one prepared GPU check, for a lent H100/H200, unattended.
#
#   bash bench/gpu.sh [extra gpu_check.py options]        # from the repository root or anywhere
#   bash bench/gpu.sh --space latent                      # only the latent path (or: --space pixel)
#
# Prints the card (nvidia-smi), then runs bench/gpu_check.py, each case with bf16 autocast,
# channels_last and torch.compile added in turn, reporting throughput, peak GPU memory
# (max_memory_allocated, reset per case) and MFU (FLOPs from FlopCounterMode):
#   latent path (the gpu preset): 2D 256^2 and 3D 128^3 images -> autoencoder training images/s
#     (2D: the preset's autoencoder; 3D: widths [32,64,64] at batch 2; also without autocast, as
#     the autoencoder stage runs it), the denoiser's training images/s on 64^2 / 32^3 x 4 latents,
#     and sampling samples/s end to end (10 Euler steps on latents + one decode to full size);
#   pixel path: 2D 128^2 and 3D 64^3 training images/s and sampling samples/s.
# Every eager case runs first (latent before pixel), the torch.compile ones last.
# Writes $OUT/gpu_check.json (and a copy of the log) when OUT is set. Needs a Python with a CUDA
# build of torch plus this project's dependencies (diffusers, monai, ...): $PYTHON if set, else
# .venv/bin/python, else python3 -- the first whose torch sees a GPU. Nothing is downloaded.
# Time: about 7 minutes on one H100 (GPU_CHECK_BUDGET_S, default 420 s: a case that would end
# after it, estimated from its eager run and the longest compile so far, is skipped and listed;
# the JSON keeps everything measured before the cut, so the later compile cases may be missing).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv
else
    echo "nvidia-smi not found"
fi

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    if "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY="$candidate"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no Python whose torch sees a CUDA GPU (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
    exit 2
fi
"$PY" -c "import torch, diffusers, monai; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" || {
    echo "$PY lacks this project's dependencies (pip install -e . with a CUDA torch)" >&2
    exit 2
}

JSON_ARGS=()
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    JSON_ARGS=(--json "$OUT/gpu_check.json")
fi
"$PY" bench/gpu_check.py --budget-s "${GPU_CHECK_BUDGET_S:-420}" "${JSON_ARGS[@]}" "$@" 2>&1 | tee ${OUT:+"$OUT/gpu_check.log"}
exit "${PIPESTATUS[0]}"
