"""Archive-scale inference behind ``cxr-monai predict``: a folder tree or datalist of films streamed
through the predictor, one CSV row per film, resumable, and sharded over torchrun ranks.

``films`` lists the archive (sorted; unreadable folders become failed entries), ``loader`` reads and
pre-processes films in DataLoader workers, ``backends`` runs the batched forward (eager or ONNX Runtime),
``results`` is the append-only, fsynced CSV and its repair and merge, ``shards`` the torchrun side
(rank, world size, gloo barrier, part files), ``run`` puts them together.
"""
