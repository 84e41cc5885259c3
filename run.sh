#!/usr/bin/env bash
# The whole medsynth chain into one run folder; every stage is one of the four scripts and reads
# what the previous stage wrote, so any stage can be rerun or swapped on its own:
#   1. train_classifier.py   -> RUN/classifier/      (the validator)
#   2. evaluate.py classifier -> RUN/eval_classifier/ (how good the validator is on real test images)
#   3. train_lora.py         -> RUN/lora/            (the generator's LoRA)
#      evaluate.py reconstruction -> RUN/reconstruction/ (what the size path and the VAE cost the validator)
#      evaluate.py conditioning -> RUN/conditioning/  (does the LoRA listen to the class prompt?)
#   4. sample_validated.py   -> RUN/samples/         (the reject loop: only validated images kept)
#   5. evaluate.py generation -> RUN/samples/metrics.json, confusion.png (the paper's scores)
#   6. evaluate.py fidelity, memorization, utility -> RUN/samples/fidelity.json, RUN/memorization/, RUN/utility/
#   7. evaluate.py report     -> RUN/report.md        (links everything above)
# Rerunning the same command resumes an interrupted stage and skips finished ones.
#
# Usage: bash run.sh [mini|tiny|paper|study|study-quick] [RUN_DIR]
#   mini  (default) offline, CPU, about 15 minutes: medsynth-mini (examples/medsynth-mini, a small
#         SD pretrained from scratch on real PathMNIST by pretrain.py) fine-tuned with LoRA on the
#         bundled 600-image PathMNIST subset, 10 validated images per class: real-looking tissue.
#   tiny  offline, CPU, about a minute: a tiny random-weight SD built on the fly. It shows the
#         machinery, NOT image quality (its images are noise).
#   paper GPU: SD1.5 from the hub (MODEL=path or hub id to override), PathMNIST-224 downloaded with
#         an MD5 check, the paper's recipe, 10 validated images per class.
#   study the four papers' experiments in miniature on mini (about 90 minutes on a 2-core CPU):
#         every arm into runs/study/, then docs/study.md (`python evaluate.py study`, which see)
#   study-quick  the same arms, every count cut down (minutes), report in runs/study-quick/study.md
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-mini}
case "$preset" in
  study) set -x; exec python evaluate.py study --out "${2:-runs/study}" ;;
  study-quick) set -x; exec python evaluate.py study --quick --out "${2:-runs/study-quick}" ;;
esac
run=${2:-runs/$preset}

evals=()
case "$preset" in
  mini)
    data=${DATA:-examples/pathmnist_subset_28.npz}
    clf=(--data "$data")
    lora=(--preset mini --data "$data")
    base=examples/medsynth-mini
    sample=(--per-class 10 --max-attempts 20 --batch-size 30)   # steps, guidance: the LoRA's recorded ones
    evals=(fidelity memorization utility)
    ;;
  tiny)
    data=${DATA:-examples/pathmnist_subset_28.npz}
    clf=(--data "$data" --epochs 5)
    lora=(--preset tiny --data "$data" --max-steps 60)
    sample=(--per-class 2 --max-attempts 3 --steps 8 --batch-size 6)
    ;;
  paper)
    data=${DATA:-pathmnist_224}
    clf=(--data "${CLF_DATA:-pathmnist}")
    base=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
    lora=(--preset paper --data "$data" --model "$base")
    sample=(--per-class 10 --max-attempts 20 --steps 50)
    ;;
  *) echo "error: unknown preset '$preset' (use mini, tiny, paper, study or study-quick)" >&2; exit 2 ;;
esac

set -x
python train_classifier.py "${clf[@]}" --out "$run/classifier"
python evaluate.py classifier --classifier "$run/classifier/classifier.safetensors" \
    --data "${clf[1]}" --out "$run/eval_classifier"
python train_lora.py "${lora[@]}" --out "$run/lora"
python evaluate.py reconstruction --model "${base:-$run/lora/tiny-sd}" \
    --classifier "$run/classifier/classifier.safetensors" --data "${clf[1]}" --out "$run/reconstruction"
python evaluate.py conditioning --lora "$run/lora/lora.safetensors" --data "$data" --split test \
    --out "$run/conditioning"
python sample_validated.py --lora "$run/lora/lora.safetensors" \
    --classifier "$run/classifier/classifier.safetensors" "${sample[@]}" --out "$run/samples"
python evaluate.py generation --run "$run/samples"
for e in "${evals[@]}"; do
  case "$e" in
    fidelity) python evaluate.py fidelity --run "$run/samples" --data "${clf[1]}" --split test --floor-split train ;;
    memorization) python evaluate.py memorization --run "$run/samples" --data "${clf[1]}" --out "$run/memorization" ;;
    utility) python evaluate.py utility --run "$run/samples" --data "${clf[1]}" --epochs 10 --out "$run/utility" ;;
  esac
done
python evaluate.py report --run "$run" --preset "$preset" --data "${clf[1]}"
