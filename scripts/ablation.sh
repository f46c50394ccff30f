#!/usr/bin/env bash
# The lean-init ablation of docs/results.md: one epoch of the first 10k Fashion-MNIST training
# images per variant, the compare recipe (batch 64, SGD Nesterov, lr 0.05, 0.5 warm-up epochs,
# cosine, label smoothing 0.1, seed 42), test top-1 on all 10k test images.
#   scripts/ablation.sh [OUT_DIR]        (default runs/ablation; ~40 min on 2 cores)
# Prints a markdown table and writes it to OUT_DIR/ablation.md. Set VARIANTS="name ..." to run
# only some of them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/ablation}
mkdir -p "$out"
cargo build --release -q -p lean-cli
lean=${CARGO_TARGET_DIR:-target}/release/lean
recipe=(--dataset fashion-mnist --epochs 1 --limit-train 10000 -b 64 --warmup-epochs 0.5 --seed 42)

# name | model and flags
variants=(
  "balanced|--model lean_resnet18_cifar"
  "fanout-init|--model lean_resnet18_cifar.fanout"
  "no-stencil-decay|--model lean_resnet18_cifar --no-decay-stencil"
  "four|--model lean_resnet18_cifar.four"
  "g4|--model lean_resnet18_cifar.g4"
  "g16|--model lean_resnet18_cifar.g16"
  "lr-0.1|--model lean_resnet18_cifar --lr 0.1"
  "lr-0.025|--model lean_resnet18_cifar --lr 0.025"
  "mobilenet_v2_075|--model mobilenet_v2_075_cifar"
  "shufflenet_v2_x1_0|--model shufflenet_v2_x1_0_cifar"
  "dense-resnet18|--model resnet18_cifar"
)

table="| variant | flags | params | MACs | epoch-1 test top-1 (%) | train loss |
|---|---|---|---|---|---|"
for v in "${variants[@]}"; do
  name=${v%%|*}
  flags=${v#*|}
  if [[ -n "${VARIANTS:-}" && " $VARIANTS " != *" $name "* ]]; then continue; fi
  dir="$out/$name"
  if [[ ! -f "$dir/summary.csv" ]]; then
    rm -rf "$dir"
    lr=(--lr 0.05)
    [[ "$flags" == *--lr* ]] && lr=()
    # shellcheck disable=SC2086
    "$lean" train "${recipe[@]}" "${lr[@]}" $flags --output "$dir" >"$out/$name.log" 2>&1
  fi
  model=$(sed -n 's/.*--model \([^ ]*\).*/\1/p' <<<"$flags")
  # Parameters and MACs per image at the training input (1x28x28, 10 classes).
  cost=$("$lean" info "$model" --input-size 1,28,28 2>/dev/null | awk '$1=="total" {printf "%.3f M | %.1f M", $2/1e6, $3/1e6}')
  row=$(python3 - "$dir/summary.csv" <<'PY'
import csv, sys
r = list(csv.DictReader(open(sys.argv[1])))[-1]
print(f"{float(r['eval_top1']):.2f} | {float(r['train_loss']):.3f}")
PY
)
  table+=$'\n'"| $name | \`${flags}\` | ${cost:-? | ?} | $row |"
done
echo "$table" | tee "$out/ablation.md"
