"""Teacher-logit caches: the pruned teacher run once, in sparse inference form, over every view of every sample.

    spec = make_spec(teacher_fingerprint(teacher, model_spec), dataset, augmentation, views=4, form="topk", k=10,
                     temperature=10.0)
    cache = build_cache("runs/x/cache/sparsity_0.79", teacher, dataset, spec)   # resumable; one shard per rank
    views = cache.views(index, epoch)        # replay exactly the crop and flip the teacher saw
    teacher_out = cache.teacher(index, epoch)   # logits [B, C] or a TopKTeacher, for ptd_sparse.kd_loss

store.py is the on-disk format and its checks, precompute.py writes a store, replay.py reads one back.
See docs/cache.md for when caching pays and when it does not.
"""
from ptd_sparse.cache.precompute import build_cache, make_spec, teacher_fingerprint, view_table
from ptd_sparse.cache.replay import TeacherCache
from ptd_sparse.cache.store import CacheError, CacheSpaceError, CacheSpec
from ptd_sparse.cache.topk import dense_equivalent
# The identity a store is checked against, part of the cache's API (defined with the data sets).
from ptd_sparse.data import dataset_identity

__all__ = ["CacheError", "CacheSpaceError", "CacheSpec", "TeacherCache", "build_cache", "dataset_identity",
           "dense_equivalent", "make_spec", "teacher_fingerprint", "view_table"]
