"""Explanations: Captum Grad-CAM (``gradcam``), the heat-map overlay (``overlay``), the per-image
record (``record``), the DICOM Secondary Capture (``secondary_capture``), explaining files in batches
(``files``) and one patient's studies over time (``progression``)."""
