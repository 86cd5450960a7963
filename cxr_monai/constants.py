"""Names and numbers fixed across the project: class order, ImageNet statistics, the research-use notice."""

from __future__ import annotations

#: Class order everywhere (label index = position). Defined once; import it, never retype it.
CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Normal", "Pneumonia")
NUM_CLASSES: int = len(CLASS_NAMES)

#: The paper's three transfer-learning backbones (torchvision names).
BACKBONES: tuple[str, ...] = ("vgg16", "resnet50", "efficientnet_b0")

#: ImageNet channel statistics for inputs scaled to [0, 1] (all three torchvision backbones use them).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The paper's input size (pixels, square).
DEFAULT_SPATIAL_SIZE: int = 224

#: Printed on every output a person reads.
RESEARCH_USE_NOTICE: str = "Research use only - NOT FOR CLINICAL USE"
