from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "site")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    site: str
    def __init__(self, image: _Optional[bytes] = ..., site: _Optional[str] = ...) -> None: ...

class ClassProbability(_message.Message):
    __slots__ = ("class_name", "probability")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    probability: float
    def __init__(self, class_name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("probabilities", "predicted_class", "warnings", "intended_use", "rows", "columns", "site", "site_calibrated", "site_status", "model_probabilities")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    SITE_CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    SITE_STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedCompositeFieldContainer[ClassProbability]
    predicted_class: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    intended_use: str
    rows: int
    columns: int
    site: str
    site_calibrated: bool
    site_status: str
    model_probabilities: _containers.RepeatedCompositeFieldContainer[ClassProbability]
    def __init__(self, probabilities: _Optional[_Iterable[_Union[ClassProbability, _Mapping]]] = ..., predicted_class: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., intended_use: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ..., site: _Optional[str] = ..., site_calibrated: _Optional[bool] = ..., site_status: _Optional[str] = ..., model_probabilities: _Optional[_Iterable[_Union[ClassProbability, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("image", "target_class", "secondary_capture", "omit_overlay_png", "site")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_CAPTURE_FIELD_NUMBER: _ClassVar[int]
    OMIT_OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    target_class: str
    secondary_capture: bool
    omit_overlay_png: bool
    site: str
    def __init__(self, image: _Optional[bytes] = ..., target_class: _Optional[str] = ..., secondary_capture: _Optional[bool] = ..., omit_overlay_png: _Optional[bool] = ..., site: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("classification", "explained_class", "heatmap_u8", "peak_row", "peak_column", "area_above_half", "overlay_png", "secondary_capture_dicom")
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_CLASS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_U8_FIELD_NUMBER: _ClassVar[int]
    PEAK_ROW_FIELD_NUMBER: _ClassVar[int]
    PEAK_COLUMN_FIELD_NUMBER: _ClassVar[int]
    AREA_ABOVE_HALF_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_CAPTURE_DICOM_FIELD_NUMBER: _ClassVar[int]
    classification: ClassifyResponse
    explained_class: str
    heatmap_u8: bytes
    peak_row: int
    peak_column: int
    area_above_half: float
    overlay_png: bytes
    secondary_capture_dicom: bytes
    def __init__(self, classification: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., explained_class: _Optional[str] = ..., heatmap_u8: _Optional[bytes] = ..., peak_row: _Optional[int] = ..., peak_column: _Optional[int] = ..., area_above_half: _Optional[float] = ..., overlay_png: _Optional[bytes] = ..., secondary_capture_dicom: _Optional[bytes] = ...) -> None: ...

class ClassifyStudyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "backbone", "spatial_size", "class_names", "intended_use", "classify_backend", "calibrated_sites", "unknown_site")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_SITES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    backbone: str
    spatial_size: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    intended_use: str
    classify_backend: str
    calibrated_sites: _containers.RepeatedScalarFieldContainer[str]
    unknown_site: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., backbone: _Optional[str] = ..., spatial_size: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., intended_use: _Optional[str] = ..., classify_backend: _Optional[str] = ..., calibrated_sites: _Optional[_Iterable[str]] = ..., unknown_site: _Optional[str] = ...) -> None: ...
