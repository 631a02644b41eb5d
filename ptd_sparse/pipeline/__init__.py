"""The prune-then-distill pipeline: models, training, pruning, student design, distillation, reporting.

Read it in stage order: stages.py chains train -> prune -> design -> [cache] -> distill -> report over one open
run directory (run_directory.Run) and its typed configuration (config.py); caching.py is the cache stage and the
cache's use in distillation, teacher_sources.py what each student learns from, variants.py and prune_methods.py the
registries of student variants and pruning methods; cli.py is the `ptd` command. Data sets and views
(ptd_sparse.data), atomic files (ptd_sparse.files), the torchrun helpers (ptd_sparse.distributed) and the
teacher-logit cache (ptd_sparse.cache) lie below it.
"""
from ptd_sparse.pipeline.design import design_student  # noqa: F401
