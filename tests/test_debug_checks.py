"""The KD loss's value checks: synchronous with a ValueError on CPU tensors and under PTD_DEBUG_CHECKS=1, a
device-side assert (no host read) on other devices. Tensors on the meta device stand in for CUDA tensors here: any
read of their values on the host raises, so a check that passes on them has read nothing (tests/test_gpu.py runs
the real thing on a GPU)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from ptd_sparse import debug_checks
from ptd_sparse._kd_contract import check_topk_teacher

META = torch.device("meta")


@pytest.mark.parametrize("value,enabled", [(None, False), ("0", False), ("1", True), ("yes", False)])
def test_the_debug_mode_is_read_on_every_call(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("PTD_DEBUG_CHECKS", raising=False)
    else:
        monkeypatch.setenv("PTD_DEBUG_CHECKS", value)
    assert debug_checks.enabled() is enabled
    assert debug_checks.synchronous(torch.zeros(1)) is True
    assert debug_checks.synchronous(torch.zeros(1, device=META)) is enabled


def meta_topk_teacher(rows=4, k=3):
    return (torch.zeros(rows, k, dtype=torch.int32, device=META), torch.zeros(rows, k, device=META),
            torch.zeros(rows, device=META))


def test_topk_teacher_checks_read_nothing_on_the_host_off_the_cpu(monkeypatch):
    monkeypatch.delenv("PTD_DEBUG_CHECKS", raising=False)
    check_topk_teacher(*meta_topk_teacher(), 10)
    monkeypatch.setenv("PTD_DEBUG_CHECKS", "1")
    with pytest.raises(RuntimeError, match="meta"):  # the debug mode reads the verdict on the host
        check_topk_teacher(*meta_topk_teacher(), 10)


def test_assert_none_raises_on_the_cpu_with_the_message():
    debug_checks.assert_none(torch.zeros(3, dtype=torch.bool), "never shown")
    with pytest.raises(RuntimeError, match="kd_loss: bad.*PTD_DEBUG_CHECKS=1 raises this as a ValueError"):
        debug_checks.assert_none(torch.tensor([False, True]), "kd_loss: bad")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_loss_reads_its_flags_on_the_host_only_where_that_is_free(monkeypatch):
    from ptd_sparse.kernels import kd_loss as kd

    student = torch.zeros(4, 5, device=META)
    call = kd._Call(student, torch.zeros(4, dtype=torch.long, device=META), 0.5, kd.REDUCTION_BATCHMEAN, -100, True)
    monkeypatch.delenv("PTD_DEBUG_CHECKS", raising=False)
    loss, grad = call.finish(None)
    assert loss.device == META and grad.shape == (4, 5)
    monkeypatch.setenv("PTD_DEBUG_CHECKS", "1")
    with pytest.raises(RuntimeError, match="meta"):
        call.finish(None)
