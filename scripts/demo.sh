#!/usr/bin/env bash
# The ssl3d demo on synthetic CT: make data -> fingerprint, plan and preprocess the unlabeled pool.
# Everything goes under $DEMO_DIR (default ./demo_work) so the user's own nnU-Net folders are untouched.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-$(pwd)/demo_work}"
export nnUNet_raw="$DEMO_DIR/nnUNet_raw"
export nnUNet_preprocessed="$DEMO_DIR/nnUNet_preprocessed"
export nnUNet_results="$DEMO_DIR/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
NP="${DEMO_NP:-2}"

echo "== 1/3 synthetic CT data -> $nnUNet_raw"
ssl_make_demo_data -o "$nnUNet_raw" --seed 0 --n-unlabeled 16 --n-labeled 8 --size small

echo "== 2/3 fingerprint, plan and preprocess the unlabeled pool (Dataset801)"
ssl_plan_and_preprocess -d 801 -np "$NP" --verify

echo
echo "Plans:             $nnUNet_preprocessed/Dataset801_SynthCTPool/ssl3dPlans.json"
echo "Fingerprint:       $nnUNet_preprocessed/Dataset801_SynthCTPool/dataset_fingerprint.json"
echo "Preprocessed data: $nnUNet_preprocessed/Dataset801_SynthCTPool/ssl3dPlans_3d_fullres/"
echo "Labeled demo set:  $nnUNet_raw/Dataset802_SynthCTOrgans (for fine-tuning)"

echo
echo "== 3/3 short SparK pretraining on CPU (tiny network; real runs: -device cuda, planned size, 1000 epochs)"
ssl_pretrain -d 801 -m spark -device cpu --size tiny --patch-size 32 64 64 --epochs "${DEMO_EPOCHS:-2}" \
    --iters "${DEMO_ITERS:-10}" --val-iters 2 --batch-size 2 --preview-every 1
RES="$nnUNet_results/Dataset801_SynthCTPool/SparKPretrainer__ssl3dPlans__3d_fullres/fold_0"
echo "Pretraining results: $RES (checkpoint_final.pth, progress.png, previews/)"
