"""A row of an operator's route table: how one backend runs one operator.

Each operator module of ptd_sparse/ops/ ends with its table, ROUTES (backend name -> Route), and the public functions
(ptd_sparse/functional.py) run a call through it: `ROUTES[backend].entry(device_type)(*arguments)`. A route names
- `operator`: the schema that runs the call. Its autograd, autocast and fake (torch.compile) rules are registered
  with that schema, in C++ for the extension's operators (ptd_sparse_kernels::*, csrc/autograd/; fakes in
  ptd_sparse/native/) and in the operator module for the Python ones (ptd_sparse::*), so naming the schema says
  which rules apply;
- `call`: the function the public function calls, with the operator's arguments minus any backend name;
- `kernels`: for a Python operator, the backend's kernel module, imported by the first call (the Triton kernels
  import triton, which importing ptd_sparse must not need); None where the schema's own C++ kernels run;
- `traced`, `traced_on`: the route torch.compile takes instead on those device types (a triton_op it traces into).

Adding a backend: its name and availability in ptd_sparse/backends.py, its kernel file, and one row per operator
table (tests/test_routes_table.py checks that every backend has a row in every table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Route:
    operator: str
    call: Callable[..., Any]
    kernels: Optional[Callable[[], Any]] = None
    traced: Optional["Route"] = None
    traced_on: tuple[str, ...] = ()

    def entry(self, device_type: str) -> Callable[..., Any]:
        """The function that runs a call on tensors of `device_type`: `traced.call` while torch.compile traces a
        graph on one of `traced_on`, else `call`."""
        if self.traced is not None and device_type in self.traced_on and torch.compiler.is_compiling():
            return self.traced.call
        return self.call


def python_kernels(routes: dict, backend: str, op: str) -> Any:
    """The kernel module of `backend` for the Python operator ptd_sparse::`op`, from its route table `routes`;
    a backend without Python kernels (one that runs the extension's operators) is refused naming those that have."""
    route = routes.get(backend)
    if route is None or route.kernels is None:
        python_backends = sorted(name for name, r in routes.items() if r.kernels is not None)
        raise ValueError(f"ptd_sparse::{op}: backend {backend!r} has no Python kernels; this operator runs "
                         f"{python_backends} (the others run the ptd_sparse_kernels operators)")
    return route.kernels()
