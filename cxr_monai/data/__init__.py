"""Dataset assembly: the three sources, patient-grouped splits, and the MONAI datalist every later step reads.

Reuse from training and evaluation::

    from cxr_monai.data import load_datalist, items_for_fold, get_test_items
    datalist = load_datalist("out/prep/datalist.json")
    train, val = items_for_fold(datalist, fold=0)
    test = get_test_items(datalist)
"""

from __future__ import annotations

from cxr_monai.data.assemble import PreparedDataset, PrepareOptions, assemble_dataset, write_prepared
from cxr_monai.data.datalist import (
    DATALIST_FILENAME,
    SUMMARY_FILENAME,
    count_table,
    get_test_items,
    items_for_fold,
    load_datalist,
    num_folds,
)
from cxr_monai.data.sources import (
    COVID_SOURCE,
    DEFAULT_COVID_VIEWS,
    KAGGLE_SOURCE,
    DataItem,
    kaggle_patient_id,
    scan_covid_dir,
    scan_kaggle_dir,
    scan_site_csv,
)

__all__ = [
    "COVID_SOURCE",
    "DATALIST_FILENAME",
    "DEFAULT_COVID_VIEWS",
    "KAGGLE_SOURCE",
    "SUMMARY_FILENAME",
    "DataItem",
    "PrepareOptions",
    "PreparedDataset",
    "assemble_dataset",
    "count_table",
    "get_test_items",
    "items_for_fold",
    "kaggle_patient_id",
    "load_datalist",
    "num_folds",
    "scan_covid_dir",
    "scan_kaggle_dir",
    "scan_site_csv",
    "write_prepared",
]
