#!/usr/bin/env bash
# The GPU check, kept in the repository (../shared/device-check.sh writes a .device/run.sh of its own each
# time, which does not know the newer flags). After `bash ../shared/device-check.sh`, make the device call
# with `command: bash tools/device_run.sh` and `carry: [".device"]`: the data comes from .device/, the results
# go under $OUT. Each step is bounded; the limits sum to 550 s, under the 600 s a command may run.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BNREF_DATA_DIR=$PWD/.device/fashion-mnist
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
step() { local name=$1 t=$2 s=$SECONDS; shift 2; echo "=== $name"; timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25; echo "$name: $((SECONDS - s)) s wall (limit $t s)"; }
{ nvidia-smi -L; python3 -c "import torch, jax, flax; print('torch', torch.__version__, torch.cuda.get_device_name(0)); print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__)"; } 2>&1 | tee "$OUT/env.log"
train() { python3 -m bnref.train --epochs 10 --device auto --no-progress --no-download --no-out "$@"; }
step train-jax 90 train --backend jax --json "$OUT/train-jax.json"                  # default: a whole epoch per call
step train-nnx 60 train --backend nnx --json "$OUT/train-nnx.json"
step train-torch 90 train --backend torch --json "$OUT/train-torch.json"
step train-torch-compile 90 train --backend torch --compile --json "$OUT/train-torch-compile.json"
step bench 110 python3 -m bnref.bench --backend all --variants all --steps 50 --rounds 3
step parity 60 python3 -m bnref.parity
step trajectory 50 python3 -m bnref.parity --trajectory --steps 100 --nnx --device auto
