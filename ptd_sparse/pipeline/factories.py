"""Models from the user's own constructor: `package.module:factory` with keyword arguments.

The factory builds an ordinary PyTorch model (nn.Conv2d, nn.Linear, BatchNorm, its own forward). The pipeline turns
every convolution into a MaskedConv2d and every linear layer into a MaskedLinear (same weights, an all-true mask),
so that pruning edits masks and training runs the masked sparse convolution, as for the zoo's models; the model's
forward is untouched. Its designed students are copies with rewritten widths (ptd_sparse.pipeline.rewrite_widths).

Naming a factory runs its module's code. The pipeline does so only for factories this process was told to trust:
those named in the configuration (teacher.model, student.model) or on the command line (`ptd import --model`).
A model.json that names any other factory is refused, so a checkpoint folder alone never makes the package import
code (docs/design.md: checkpoints never run code from a file).
"""
from __future__ import annotations

from torch import nn

from ptd_sparse.named_callable import SEPARATOR, NamedCallableError, resolve_named_callable
from ptd_sparse.nn import MaskedConv2d, MaskedLinear

_trusted: set[str] = set()


class FactoryError(ValueError):
    """A factory name is malformed, cannot be imported, is not trusted, or does not return a model."""


def is_factory(name: str) -> bool:
    return isinstance(name, str) and SEPARATOR in name


def trust(name: str) -> None:
    """Allow build_model to import and call factory `name` in this process."""
    if not is_factory(name):
        raise FactoryError(f"a factory is named package.module:function, got {name!r}")
    _trusted.add(name)


def _resolve(name: str):
    try:
        return resolve_named_callable(name)
    except NamedCallableError as error:
        raise FactoryError(f"factory {name}: {error}") from error


def call_factory(name: str, kwargs: dict | None = None) -> nn.Module:
    """The user's model, factory(**kwargs), before any masking. Refuses factories not trusted (see trust)."""
    if name not in _trusted:
        raise FactoryError(f"factory {name} was not named in this run's configuration or on the command line; the "
                           "pipeline imports user code only when told to (set teacher.model / student.model or "
                           "ptd import --model to it)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise FactoryError(f"the keyword arguments of factory {name} must be a table, got {kwargs!r}")
    model = _resolve(name)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise FactoryError(f"factory {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def masked(model: nn.Module) -> nn.Module:
    """`model` with every nn.Conv2d a MaskedConv2d and every nn.Linear a MaskedLinear (weights shared, masks all
    true), in place; returns it."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and not isinstance(module, MaskedConv2d):
            _replace(model, name, MaskedConv2d.from_conv(module))
        elif isinstance(module, nn.Linear) and not isinstance(module, MaskedLinear):
            linear = MaskedLinear(module.in_features, module.out_features, module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            linear._register_mask()
            _replace(model, name, linear)
    return model
