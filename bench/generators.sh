#!/usr/bin/env bash
# Every generator of issue 14 through the same reject loop on medsynth-mini, scored in one table
# (README, "Other generators"). Needs what these commands make first:
#   bash run.sh mini runs/mini                                    # validator + plain LoRA + its samples
#   python train_classifier.py --arch vit --seed 1 --data examples/pathmnist_subset_28.npz --out runs/vit
#   python train_lora.py --preset mini --prior-preservation --out runs/prior/lora
#   python train_gan.py --out runs/gan
# The "SD + LoRA" row is runs/mini itself (run.sh samples with the settings below at batch 30).
# Usage: bash bench/generators.sh [OUT] [ARM...]   (default OUT runs/generators, every arm)
# Each arm is a folder that resumes when rerun; the table is OUT/compare.md, .json, .png.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/generators}
shift || true
data=examples/pathmnist_subset_28.npz
clf=runs/mini/classifier/classifier.safetensors
judge=runs/vit/classifier.safetensors
lora=runs/mini/lora/lora.safetensors
sd=(--per-class 10 --max-attempts 20 --steps 25 --guidance 3)   # run.sh mini's sampling settings

declare -A arm
arm[one-at-a-time]="--lora $lora ${sd[*]} --batch-size 1"          # the paper's loop
arm[early-reject]="--lora $lora ${sd[*]} --batch-size 30 --early-reject-at 0.4"
arm[guidance-1]="--lora $lora ${sd[*]} --batch-size 30 --classifier-guidance 1"
arm[guidance-3]="--lora $lora ${sd[*]} --batch-size 30 --classifier-guidance 3"
arm[img2img-0.5]="--lora $lora ${sd[*]} --batch-size 30 --init-images $data --strength 0.5"
arm[img2img-0.8]="--lora $lora ${sd[*]} --batch-size 30 --init-images $data --strength 0.8"
arm[prior]="--lora runs/prior/lora/lora.safetensors ${sd[*]} --batch-size 30"
arm[gan]="--generator runs/gan/gan.safetensors --per-class 10 --max-attempts 20 --batch-size 30"
order=(one-at-a-time early-reject guidance-1 guidance-3 img2img-0.5 img2img-0.8 prior gan)
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=("${order[@]}")

set -x
for a in "${arms[@]}"; do
  run="$out/$a"
  # shellcheck disable=SC2086
  python sample_validated.py ${arm[$a]} --classifier "$clf" --seed 0 --out "$run"
  python evaluate.py generation --run "$run" --second-classifier "$judge"
  python evaluate.py fidelity --run "$run" --data "$data" --split test --floor-split train
  python evaluate.py memorization --run "$run" --data "$data" --out "$run/memorization"
  case "$a" in   # seed 002's question for the GAN (run.sh measured it for SD + LoRA): does augmenting help?
    gan) python evaluate.py utility --run "$run" --data "$data" --epochs 10 --out "$run/utility" ;;
  esac
done
# SD + LoRA is run.sh's own run (same settings, batch 30): it only lacks the second judge
python evaluate.py generation --run runs/mini/samples --second-classifier "$judge"
runs=(runs/mini)
for a in "${order[@]}"; do [ -f "$out/$a/run.json" ] && runs+=("$out/$a"); done
python evaluate.py compare "${runs[@]}" --out "$out"
