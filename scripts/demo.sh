#!/usr/bin/env bash
# The ssl3d demo on synthetic CT: what SparK pretraining buys at 1, 2 and all labeled cases, measured.
# data -> fingerprint, plan, preprocess the unlabeled pool -> ssl_benchmark (SparK pretraining once, then stock
# nnU-Net fine-tuning from scratch and from SparK for every label count and seed, prediction of held-out test
# cases, nnU-Net's evaluation) -> table + plot. Everything goes under $DEMO_DIR (default ./demo_work), so the
# user's own nnU-Net folders are untouched. Rerunning resumes where a killed run stopped.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-$(pwd)/demo_work}"
export nnUNet_raw="$DEMO_DIR/nnUNet_raw"
export nnUNet_preprocessed="$DEMO_DIR/nnUNet_preprocessed"
export nnUNet_results="$DEMO_DIR/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
NP="${DEMO_NP:-2}"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"  # data-augmentation workers; nnU-Net would guess from the hostname

echo "== 1/3 synthetic contrast-enhanced CT -> $nnUNet_raw (16 unlabeled, 20 labeled: 8 to train on, 12 to test)"
ssl_make_demo_data -o "$nnUNet_raw" --seed 0 --n-unlabeled 16 --n-labeled 20 --size small --phase portal-venous

echo "== 2/3 fingerprint, plan and preprocess the unlabeled pool (Dataset801) at a coarse CPU-demo spacing"
# 5 x 3.5 x 3.5 mm: the planned 28x40x48 patch of a tiny network then sees the whole abdomen
ssl_plan_and_preprocess -d 801 -np "$NP" --verify --spacing 5 3.5 3.5

echo
# A reduced small benchmark that fits a coffee break on 2 cores: whole-network fine-tuning only, 2 seeds, 35 x 10
# fine-tuning iterations. The full small preset (frozen arms too, 3 seeds, 300 x 10 iterations, past the knee of
# scratch's curve) is 36 arms of ~15-20 min each on 2 cores: DEMO_FULL=1 runs it.
if [ "${DEMO_FULL:-0}" = 1 ]; then REDUCED=(); else REDUCED=(--arms finetune --seeds 2 --ft-epochs 35); fi
echo "== 3/3 ssl_benchmark: SparK vs scratch, 1 / 2 / all labeled cases, 12 held-out test cases ${REDUCED[*]:-(full small preset)}"
ssl_benchmark -u 801 -l 802 -m spark --scratch --n-train 1 2 all --preset small -device cpu "${REDUCED[@]}" \
    --cka -np "$NP" -o "$DEMO_DIR/benchmark" ${DEMO_BENCH_ARGS:-}
echo
echo "Table: $DEMO_DIR/benchmark/results.md   plot: $DEMO_DIR/benchmark/label_efficiency.png"
echo "Every arm: $DEMO_DIR/benchmark/arms/<arm>/ (run.log, predictions, nnU-Net results); all numbers: results.json"
