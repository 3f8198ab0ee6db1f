#!/usr/bin/env bash
# The experiment pages of docs/ (docs/experiments.md), regenerated on Fashion-MNIST at IPC 10 on a CPU:
# the lambda ablation, the with/without-CMI convergence figure for DM and DSA, the cross-architecture
# table, the CMI-ordered grids and the continual-learning curve. Every step is one command-line call;
# finished steps are skipped on a restart (sweeps and continual runs resume cell by cell).
#
#   bash benchmarks/fmnist_experiments.sh [OUT_DIR] [pool|lambda|convergence|crossarch|ordering|continual|figures|all]
set -euo pipefail
out=${1:-runs/experiments}
part=${2:-all}
figures=docs/figures
mkdir -p "$out" "$figures"
pool="$out/pool"
want() { [[ $part == "$1" || $part == all ]]; }

if [[ ! -f "$out/pool.json" ]]; then
  infodistill proxies --arch ConvNetGAP-3-32 --count 2 --epochs 2 --out "$pool" --json > "$out/pool.json"
fi

if want lambda; then
  infodistill sweep configs/sweeps/fmnist-lambda-ablation.yaml --set "proxies=$pool" --out "$out/lambda" --report --quiet
fi

if want convergence; then  # DM's curves come from the lambda sweep (it evaluates every 75 iterations)
  infodistill sweep configs/sweeps/fmnist-convergence-dsa.yaml --set "proxies=$pool" --out "$out/convergence-dsa" --quiet
fi

if want crossarch; then
  for run in cells/cmi_weight-100 baseline-fashion-mnist-ipc10-seed0; do
    [[ -f "$out/lambda/$run/cross-arch.json" ]] || infodistill evaluate "$out/lambda/$run/set.safetensors" \
      --models ConvNet-3,AlexNet,VGG11,ResNet18 --epochs 100 --runs 1 --out "$out/lambda/$run/cross-arch.json"
  done
fi

if want ordering; then
  for run in cmi_weight-0 cmi_weight-100; do
    infodistill cmi "$out/lambda/cells/$run/set.safetensors" --proxies "$pool" \
      --ordered-grid "$out/lambda/cells/$run/cmi-order.png" --json > "$out/lambda/cells/$run/cmi-order.json"
  done
fi

if want continual; then
  infodistill continual --method dm --ipc 10 --iterations 100 --epochs 100 --steps 5 --orders 2 \
    --model ConvNet-3-32 --batch-real 64 --out "$out/continual" --quiet --json > "$out/continual.json"
fi

if want figures; then  # the with/without-CMI reports and the figures the docs show
  infodistill report "$out/lambda/cells/cmi_weight-0" "$out/lambda/cells/cmi_weight-100" \
    --baseline "$out/lambda/baseline-fashion-mnist-ipc10-seed0" --out "$out/convergence-dm"
  infodistill report "$out/convergence-dsa/cells/cmi_weight-0" "$out/convergence-dsa/cells/cmi_weight-auto" \
    --baseline "$out/lambda/baseline-fashion-mnist-ipc10-seed0" --out "$out/convergence-dsa/report"
  cp "$out/lambda/report/cmi.png" "$figures/lambda-cmi.png"
  cp "$out/lambda/report/accuracy.png" "$figures/lambda-accuracy.png"
  cp "$out/lambda/report/grids.png" "$figures/lambda-grids.png"
  for method in dm dsa; do
    report="$out/convergence-$method"; [[ $method == dsa ]] && report="$report/report"
    cp "$report/accuracy.png" "$figures/convergence-$method-accuracy.png"
    cp "$report/cmi.png" "$figures/convergence-$method-cmi.png"
  done
  cp "$out/lambda/cells/cmi_weight-0/cmi-order.png" "$figures/cmi-order-dm.png"
  cp "$out/lambda/cells/cmi_weight-100/cmi-order.png" "$figures/cmi-order-dm-cmi.png"
  cp "$out/continual/continual.png" "$figures/continual-dm.png"
fi
