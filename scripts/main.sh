#!/usr/bin/env bash
# Install cxr-monai, then run the main job on the data it can reach:
#   1. `cxr-monai prepare`: build the patient-disjoint datalist from the two public datasets.
# Data location: $CXR_DATA (default ../shared/data), holding covid-chestxray-dataset/ and chest_xray/.
# Outputs go to $CXR_OUT (default out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

data="${CXR_DATA:-../shared/data}"
out="${CXR_OUT:-out}"
if [[ ! -d "$data/covid-chestxray-dataset" || ! -d "$data/chest_xray" ]]; then
    echo "No data found under '$data'. Put the covid-chestxray-dataset checkout (metadata.csv + images/)" >&2
    echo "and the Kaggle chest_xray folder ({train,val,test}/{NORMAL,PNEUMONIA}/) there, or set CXR_DATA." >&2
    exit 1
fi
cxr-monai prepare --covid-dir "$data/covid-chestxray-dataset" --kaggle-dir "$data/chest_xray" --out "$out/prep"
