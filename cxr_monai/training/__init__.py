"""What the ``cxr_classifier`` bundle configs call, and the cross-validation driver.

* :mod:`~cxr_monai.training.datalists`: datalist items for one role of a run;
* :mod:`~cxr_monai.training.adversarial`: the optional source-adversarial head (gradient reversal);
* :mod:`~cxr_monai.training.handlers`: ignite handlers (fine-tuning schedule, training log, resume,
  early stopping);
* :mod:`~cxr_monai.training.trunk_features`: head-only training on cached frozen-trunk features;
* :mod:`~cxr_monai.training.layout`: the trained-bundle layout;
* :mod:`~cxr_monai.training.crossval`: folds run one after another, summary and final model.

The names below are re-exported because trained bundles written before the subpackage existed name
them as ``cxr_monai.training.<name>`` in their configs; those bundles must keep loading.
"""

from cxr_monai.training.adversarial import SourceAdversarialIteration, build_adversary
from cxr_monai.training.datalists import check_sources, datalist_folds, fold_items, source_class_sampler
from cxr_monai.training.handlers import (
    EarlyStopOnValidation,
    FineTuneSchedule,
    ResumeFromCheckpoint,
    SaveResumeCheckpoint,
    TrainingLog,
)
from cxr_monai.training.inference_inputs import inference_items
from cxr_monai.training.layout import (
    BUNDLE_NAME,
    CONFIG_FILES,
    INFERENCE_PARAMETERS,
    RUN_INFO,
    TRAINING_LOG,
    best_epoch,
    default_bundle_root,
    latest_checkpoint,
    prepare_output_dir,
    read_training_log,
    relocate_trained_bundle,
)
from cxr_monai.training.trunk_features import (
    TrunkFeaturesd,
    check_trunk_feature_options,
    trainable_network,
    training_loader,
    trunk_feature_chain,
)

__all__ = [
    "BUNDLE_NAME",
    "CONFIG_FILES",
    "INFERENCE_PARAMETERS",
    "RUN_INFO",
    "TRAINING_LOG",
    "EarlyStopOnValidation",
    "FineTuneSchedule",
    "ResumeFromCheckpoint",
    "SaveResumeCheckpoint",
    "SourceAdversarialIteration",
    "TrainingLog",
    "TrunkFeaturesd",
    "best_epoch",
    "build_adversary",
    "check_sources",
    "check_trunk_feature_options",
    "datalist_folds",
    "default_bundle_root",
    "fold_items",
    "inference_items",
    "latest_checkpoint",
    "prepare_output_dir",
    "read_training_log",
    "relocate_trained_bundle",
    "source_class_sampler",
    "trainable_network",
    "training_loader",
    "trunk_feature_chain",
]
