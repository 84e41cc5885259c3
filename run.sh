#!/usr/bin/env bash
# The whole medsynth chain into one run folder; every stage is one of the four scripts and reads
# what the previous stage wrote, so any stage can be rerun or swapped on its own:
#   1. train_classifier.py   -> RUN/classifier/      (the validator)
#   2. evaluate.py classifier -> RUN/eval_classifier/ (how good the validator is on real test images)
#   3. train_lora.py         -> RUN/lora/            (the generator's LoRA)
#   4. sample_validated.py   -> RUN/samples/         (the reject loop: only validated images kept)
#   5. evaluate.py generation -> RUN/samples/metrics.json, confusion.png (the paper's scores)
#   6. evaluate.py report     -> RUN/report.md        (links everything above)
# Rerunning the same command resumes an interrupted stage and skips finished ones.
#
# Usage: bash run.sh [tiny|paper] [RUN_DIR]
#   tiny  (default) offline, CPU, a few minutes: a tiny random-weight SD built on the fly and the
#         bundled 600-image PathMNIST subset. It shows the machinery, NOT image quality.
#   paper GPU: SD1.5 from the hub (MODEL=path or hub id to override), PathMNIST-224 downloaded with
#         an MD5 check, the paper's recipe, 10 validated images per class.
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-tiny}
run=${2:-runs/$preset}

case "$preset" in
  tiny)
    data=${DATA:-examples/pathmnist_subset_28.npz}
    clf=(--data "$data" --epochs 5)
    lora=(--preset tiny --data "$data" --max-steps 60)
    sample=(--per-class 2 --max-attempts 3 --steps 8 --batch-size 6)
    ;;
  paper)
    data=${DATA:-pathmnist_224}
    clf=(--data "${CLF_DATA:-pathmnist}")
    lora=(--preset paper --data "$data" --model "${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}")
    sample=(--per-class 10 --max-attempts 20 --steps 50)
    ;;
  *) echo "error: unknown preset '$preset' (use tiny or paper)" >&2; exit 2 ;;
esac

set -x
python train_classifier.py "${clf[@]}" --out "$run/classifier"
python evaluate.py classifier --classifier "$run/classifier/classifier.safetensors" \
    --data "${clf[1]}" --out "$run/eval_classifier"
python train_lora.py "${lora[@]}" --out "$run/lora"
python sample_validated.py --lora "$run/lora/lora.safetensors" \
    --classifier "$run/classifier/classifier.safetensors" "${sample[@]}" --out "$run/samples"
python evaluate.py generation --run "$run/samples"
python evaluate.py report --run "$run" --preset "$preset"
