"""What a training loop over images needs besides the model, below both ptd_sparse.cache and ptd_sparse.pipeline:
data sets and their identity (datasets.py: the built-in ones, in memory; streaming.py: a user's factory or image
folder, read through a DataLoader), augmentation views drawn and applied per batch (views.py). Atomic file
writes are in ptd_sparse/files.py, the torchrun helpers in ptd_sparse/distributed.py; none of them imports the cache
or the pipeline, so the cache serves a plain PyTorch training loop as well as the pipeline's."""
from ptd_sparse.data.datasets import (DATASETS, FASHION_MNIST_FILES, Dataset, MissingDataError, Split, batches,
                                      dataset_identity, load_dataset, resolve_root, split_validation, take_images)
from ptd_sparse.data.streaming import (DataError, StreamSplit, check_model_fits, is_streaming,
                                       load_streaming, open_dataset, preprocessing)
from ptd_sparse.data.views import Augmentation, Views, apply_views, normalize, sample_views

__all__ = ["DATASETS", "FASHION_MNIST_FILES", "Augmentation", "DataError", "Dataset", "MissingDataError", "Split",
           "StreamSplit", "Views", "apply_views", "batches", "check_model_fits", "dataset_identity",
           "is_streaming", "load_dataset", "load_streaming", "normalize", "open_dataset", "preprocessing",
           "resolve_root", "sample_views", "split_validation", "take_images"]
