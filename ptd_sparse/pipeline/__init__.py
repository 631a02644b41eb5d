"""The prune-then-distill pipeline: models, data, training, pruning, student design, distillation, reporting.

Read it in stage order: stages.py chains train -> prune -> design -> distill -> report; cli.py is the `ptd` command.
"""
from ptd_sparse.pipeline.design import design_student  # noqa: F401
