"""What a training loop over images needs besides the model, below both ptd_sparse.cache and ptd_sparse.pipeline:
data sets and their identity (datasets.py), augmentation views drawn and applied per batch (views.py). Atomic file
writes are in ptd_sparse/files.py, the torchrun helpers in ptd_sparse/distributed.py; none of them imports the cache
or the pipeline, so the cache serves a plain PyTorch training loop as well as the pipeline's."""
from ptd_sparse.data.datasets import (DATASETS, FASHION_MNIST_FILES, Dataset, MissingDataError, Split, batches,
                                      dataset_identity, load_dataset, resolve_root, split_validation)
from ptd_sparse.data.views import Augmentation, Views, apply_views, normalize, sample_views

__all__ = ["DATASETS", "FASHION_MNIST_FILES", "Augmentation", "Dataset", "MissingDataError", "Split", "Views",
           "apply_views", "batches", "dataset_identity", "load_dataset", "normalize", "resolve_root", "sample_views",
           "split_validation"]
