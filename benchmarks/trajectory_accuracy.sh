#!/usr/bin/env bash
# Accuracy study on Fashion-MNIST through the command line: MTT, DATM and IDC, each with and without
# CMI, against random real subsets of the same size, all scored with the same protocol (ConvNet-3,
# 300 epochs, DSA, 3 runs). A small CPU budget: see benchmarks/README.md for what is scaled down.
#
#   bash benchmarks/trajectory_accuracy.sh [OUT_DIR] [trajectory|idc|all]
#
# Writes every artefact and one JSON per evaluation into OUT_DIR (default runs/bench-trajectory), then
# `cd benchmarks && python collect_accuracy.py ../OUT_DIR` gathers them into OUT_DIR/summary.json.
set -euo pipefail
out=${1:-runs/bench-trajectory}
part=${2:-all}
mkdir -p "$out"
eval_flags=(--epochs 300 --runs 2 --json)
common=(--dataset fashion-mnist --model ConvNet-3-32 --seed 0 --quiet)

if [[ ! -f "$out/proxies.json" ]]; then
  infodistill proxies --arch ConvNetGAP-3-32 --count 2 --epochs 2 --out "$out/proxies" --json > "$out/proxies.json"
fi

if [[ $part == trajectory || $part == all ]]; then
  infodistill experts --model ConvNet-3-32 --count 3 --epochs 12 --train-per-class 1000 \
    --out "$out/experts" --json > "$out/experts.json"
  trajectory=(--ipc 10 --experts "$out/experts" --iterations 150 --syn-steps 10 --expert-epochs 2
              --max-start-epoch 8)
  infodistill distill --method mtt "${common[@]}" "${trajectory[@]}" --out "$out/mtt"
  infodistill distill --method mtt "${common[@]}" "${trajectory[@]}" --proxies "$out/proxies" --out "$out/mtt+cmi"
  datm=(--window-start-max 4 --window-growth-iterations 150)
  infodistill distill --method datm "${common[@]}" "${trajectory[@]}" "${datm[@]}" --out "$out/datm"
  infodistill distill --method datm "${common[@]}" "${trajectory[@]}" "${datm[@]}" --proxies "$out/proxies" \
    --out "$out/datm+cmi"
  infodistill baseline --ipc 10 --seed 0 --out "$out/random-ipc10.safetensors"
  for run in random-ipc10.safetensors mtt/set.safetensors mtt+cmi/set.safetensors datm/set.safetensors \
             datm+cmi/set.safetensors; do
    name=${run%%/*}; name=${name%.safetensors}
    infodistill evaluate "$out/$run" "${eval_flags[@]}" > "$out/eval-$name.json"
  done
fi

if [[ $part == idc || $part == all ]]; then
  idc=(--ipc 1 --iterations 40 --outer-loop 10 --net-steps 4)
  infodistill distill --method idc "${common[@]}" "${idc[@]}" --out "$out/idc"
  infodistill distill --method idc "${common[@]}" "${idc[@]}" --proxies "$out/proxies" --cmi-weight auto \
    --out "$out/idc+cmi"
  infodistill baseline --ipc 1 --seed 0 --out "$out/random-ipc1.safetensors"
  for run in random-ipc1.safetensors idc/set.safetensors idc+cmi/set.safetensors; do
    name=${run%%/*}; name=${name%.safetensors}
    infodistill evaluate "$out/$run" "${eval_flags[@]}" > "$out/eval-$name.json"
  done
fi
