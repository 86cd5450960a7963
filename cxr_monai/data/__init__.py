"""Dataset assembly: the three sources, patient-grouped splits, and the MONAI datalist every later step reads.

Reuse from training and evaluation::

    from cxr_monai.data import load_datalist, items_for_fold, get_test_items
    datalist = load_datalist("out/prep/datalist.json")
    train, val = items_for_fold(datalist, fold=0)
    test = get_test_items(datalist)
"""

from __future__ import annotations

from cxr_monai.data.assemble import (
    PreparedDataset,
    PrepareOptions,
    assemble_dataset,
    counts_by_source,
    write_prepared,
)
from cxr_monai.data.datalist import (
    DATALIST_FILENAME,
    SUMMARY_FILENAME,
    count_table,
    get_test_items,
    items_for_fold,
    load_datalist,
    num_folds,
)
from cxr_monai.data.figure import FIGURE_FILENAME
from cxr_monai.data.findings import DEFAULT_FINDING_MAP, classify_finding, load_finding_map
from cxr_monai.data.near_duplicates import CACHE_DIRNAME
from cxr_monai.data.sources import (
    COVID_SOURCE,
    DEFAULT_COVID_VIEWS,
    KAGGLE_SOURCE,
    DataItem,
    SiteCSV,
    kaggle_patient_id,
    scan_covid_dir,
    scan_kaggle_dir,
    scan_site_csv,
    site_csv,
)

__all__ = [
    "CACHE_DIRNAME",
    "COVID_SOURCE",
    "DATALIST_FILENAME",
    "DEFAULT_COVID_VIEWS",
    "DEFAULT_FINDING_MAP",
    "FIGURE_FILENAME",
    "KAGGLE_SOURCE",
    "SUMMARY_FILENAME",
    "DataItem",
    "PrepareOptions",
    "PreparedDataset",
    "SiteCSV",
    "assemble_dataset",
    "classify_finding",
    "count_table",
    "counts_by_source",
    "get_test_items",
    "items_for_fold",
    "kaggle_patient_id",
    "load_datalist",
    "load_finding_map",
    "num_folds",
    "scan_covid_dir",
    "scan_kaggle_dir",
    "scan_site_csv",
    "site_csv",
    "write_prepared",
]
