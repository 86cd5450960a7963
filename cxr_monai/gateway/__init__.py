"""The DICOM network side: a Storage SCP that queues received chest films on disk (``scp``, ``queue``),
a worker that classifies and explains them and C-STOREs a Secondary Capture and a Structured Report to
a destination with retries (``service``)."""
