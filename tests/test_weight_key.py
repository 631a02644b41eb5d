"""weight_key, the key of SparseConv2d's derived dense weights: it changes whenever the contents of the values or of
the pattern change, however they were changed (in place, through .data, through a NumPy view, under inference mode);
it stays the same while they hold the same bytes. The extension's key and the Python fallback of a reference-only
install behave alike."""
from __future__ import annotations

import pytest
import torch

from ptd_sparse import fingerprint
from ptd_sparse._extension import extension_problem

FORMS = ["extension", "python"]


@pytest.fixture(params=FORMS)
def key_of(request, monkeypatch):
    if request.param == "extension" and extension_problem() is not None:
        pytest.skip(f"the extension is not built: {extension_problem()}")
    if request.param == "python":
        monkeypatch.setattr(fingerprint, "_compiled", lambda: None)
    return fingerprint.weight_key


def tensors():
    values = torch.nn.Parameter(torch.randn(37))
    row_ptr = torch.tensor([0, 20, 37], dtype=torch.int32)
    col_idx = torch.arange(37, dtype=torch.int32)
    return values, row_ptr, col_idx


def test_the_key_holds_while_nothing_changes(key_of):
    values, row_ptr, col_idx = tensors()
    assert key_of(values, row_ptr, col_idx) == key_of(values, row_ptr, col_idx)
    # The contents, not the tensor, key the values.
    assert key_of(values.detach().clone(), row_ptr, col_idx) == key_of(values, row_ptr, col_idx)


@pytest.mark.parametrize("change", ["in_place", "data", "numpy", "one_bit"])
def test_every_change_of_the_values_changes_the_key(key_of, change):
    values, row_ptr, col_idx = tensors()
    before = key_of(values, row_ptr, col_idx)
    with torch.no_grad():
        if change == "in_place":
            values.mul_(2)
        elif change == "data":
            values.data[3] += 1.0  # moves no version counter
        elif change == "numpy":
            values.detach().numpy()[5] = 0.25
        else:
            values.detach().view(torch.int32)[36] ^= 1  # the lowest bit of the last value
    assert key_of(values, row_ptr, col_idx) != before


@pytest.mark.parametrize("change", ["in_place", "numpy", "data", "inference_mode", "dtype"])
def test_every_change_of_the_pattern_changes_the_key(key_of, change):
    values, row_ptr, col_idx = tensors()
    before = key_of(values, row_ptr, col_idx)
    if change == "in_place":
        col_idx[0] = 1
    elif change == "numpy":
        col_idx.numpy()[1] = 0  # moves no version counter
    elif change == "data":
        row_ptr.data[1] = 19
    elif change == "inference_mode":
        with torch.inference_mode():  # load_state_dict under inference mode: an inference tensor written in place
            frozen = col_idx.clone()
        before = key_of(values, row_ptr, frozen)
        with torch.inference_mode():
            frozen[2] = 5
        col_idx = frozen
    else:
        col_idx = col_idx.to(torch.int16)  # the compact form eval() builds
    assert key_of(values, row_ptr, col_idx) != before


def test_the_key_follows_contents_not_identity(key_of):
    values, row_ptr, col_idx = tensors()
    # A new tensor with the same contents (load_state_dict of the same state, a freed buffer's reused address) keys
    # the same; another dtype of the values does not.
    assert key_of(values, row_ptr.clone(), col_idx.clone()) == key_of(values, row_ptr, col_idx)
    assert key_of(values.detach().double(), row_ptr, col_idx) != key_of(values, row_ptr, col_idx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_tensors_are_refused(key_of):
    values, row_ptr, col_idx = tensors()
    with pytest.raises(ValueError, match="must be on the CPU"):
        key_of(values.cuda(), row_ptr, col_idx)
