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
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"  # data-augmentation workers; nnU-Net would guess from the hostname

echo "== 1/5 synthetic CT data -> $nnUNet_raw"
ssl_make_demo_data -o "$nnUNet_raw" --seed 0 --n-unlabeled 16 --n-labeled 8 --size small

echo "== 2/5 fingerprint, plan and preprocess the unlabeled pool (Dataset801)"
ssl_plan_and_preprocess -d 801 -np "$NP" --verify

echo
echo "Plans:             $nnUNet_preprocessed/Dataset801_SynthCTPool/ssl3dPlans.json"
echo "Fingerprint:       $nnUNet_preprocessed/Dataset801_SynthCTPool/dataset_fingerprint.json"
echo "Preprocessed data: $nnUNet_preprocessed/Dataset801_SynthCTPool/ssl3dPlans_3d_fullres/"
echo "Labeled demo set:  $nnUNet_raw/Dataset802_SynthCTOrgans (for fine-tuning)"

echo
echo "== 3/5 short SparK pretraining on CPU (tiny network; real runs: -device cuda, planned size, 1000 epochs)"
ssl_pretrain -d 801 -m spark -device cpu --size tiny --patch-size 32 64 64 --epochs "${DEMO_EPOCHS:-4}" \
    --iters "${DEMO_ITERS:-10}" --val-iters 2 --batch-size 2 --preview-every 1
RES="$nnUNet_results/Dataset801_SynthCTPool/SparKPretrainer__ssl3dPlans__3d_fullres/fold_0"
echo "Pretraining results: $RES (checkpoint_final.pth, progress.png, previews/)"

echo
echo "== 4/5 fine-tune on the labeled set (Dataset802) with stock nnUNetv2_train: from scratch and from SparK"
FT_ARGS=(-d 802 -p "$RES" -f 0 -device cpu --epochs "${DEMO_FT_EPOCHS:-60}" --iters "${DEMO_FT_ITERS:-10}"
         --val-iters 2 --no-final-val -np "$NP")
ssl_finetune "${FT_ARGS[@]}" --scratch
ssl_finetune "${FT_ARGS[@]}"

echo
echo "== 5/5 predict the fold-0 validation cases with stock nnUNetv2_predict, score with nnUNetv2_evaluate_folder"
export nnUNet_extTrainer="$(ssl_nnunet_ext_path)"
PRE802="$nnUNet_preprocessed/Dataset802_SynthCTOrgans"
RAW802="$nnUNet_raw/Dataset802_SynthCTOrgans"
EVAL="$DEMO_DIR/eval"
rm -rf "$EVAL" && mkdir -p "$EVAL/images" "$EVAL/gt"
python -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))[0]['val']))" "$PRE802/splits_final.json" |
while read -r case; do
    ln -s "$RAW802/imagesTr/${case}_0000.nii.gz" "$EVAL/images/"
    ln -s "$RAW802/labelsTr/${case}.nii.gz" "$EVAL/gt/"
done
for PLANS in ssl3d_sparkPlans_scratch ssl3d_sparkPlans; do
    nnUNetv2_predict -i "$EVAL/images" -o "$EVAL/$PLANS" -d 802 -c 3d_fullres -p "$PLANS" -tr SSLFinetuneTrainer \
        -f 0 -device cpu --disable_tta -npp 1 -nps 1
    nnUNetv2_evaluate_folder "$EVAL/gt" "$EVAL/$PLANS" -djfile "$RAW802/dataset.json" \
        -pfile "$PRE802/$PLANS.json" -np 1
done
echo
echo "Dice on the held-out fold-0 cases (tiny networks, minutes of CPU training; see README for real settings):"
python "$(dirname "$0")/demo_report.py" "$RAW802/dataset.json" "$EVAL/ssl3d_sparkPlans_scratch/summary.json" \
    "$EVAL/ssl3d_sparkPlans/summary.json"
