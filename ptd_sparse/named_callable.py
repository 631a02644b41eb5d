"""A callable named "package.module:function" (a model factory, a dataset factory), imported on demand.

As `python -m` does, the working directory counts as a place to find the user's package. Errors are
NamedCallableError with a sentence that the caller prefixes with what the name was for (the configuration key).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

SEPARATOR = ":"


class NamedCallableError(ValueError):
    """The name is malformed (`malformed`), its module cannot be imported, or it names nothing callable."""

    def __init__(self, message: str, malformed: bool = False):
        super().__init__(message)
        self.malformed = malformed


def resolve_named_callable(name: str) -> Callable:
    module_name, _, function = name.partition(SEPARATOR)
    if not module_name or not function.isidentifier():
        raise NamedCallableError(f"must be package.module:function, got {name!r}", malformed=True)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if os.getcwd() in sys.path or error.name not in (module_name, module_name.split(".")[0]):
            raise NamedCallableError(f"cannot import {module_name}: {error}") from error
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as again:
            raise NamedCallableError(f"cannot import {module_name} (searched sys.path and the working directory): "
                                     f"{again}") from again
    found = getattr(module, function, None)
    if not callable(found):
        raise NamedCallableError(f"{module_name} has no callable {function}")
    return found
