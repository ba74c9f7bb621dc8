#!/usr/bin/env bash
# Centralised baselines of the foundation issue; each run writes results/central_*.json.
#   LeNet on Fashion-MNIST with and without the lock (same epochs and seed; the locked run also
#   reports the accuracy under random keys), the same on digits, and a short ResNet-20 run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-5}
out=results
mkdir -p "$out"
export PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=3
for lock in true false; do
  $PY -m tff_programs.train_central --model=lenet --dataset=fashion_mnist --lock=$lock --epochs="$EPOCHS" \
      --seed=0 --out="$out/central_lenet_fashion_mnist_lock_$lock.json"
done
for lock in true false; do
  $PY -m tff_programs.train_central --model=lenet --dataset=digits --lock=$lock --epochs=50 \
      --seed=0 --out="$out/central_lenet_digits_lock_$lock.json"
done
$PY -m tff_programs.train_central --model=resnet20 --dataset=fashion_mnist --lock=true --epochs=2 \
    --max_train_examples=4000 --seed=0 --out="$out/central_resnet20_fashion_mnist_short.json"
