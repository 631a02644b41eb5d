"""Route plans: the route of every SparseConv2d of a model, saved once and loaded by a deployment, so that its
inference calls measure nothing and take the same routes on every start (ptd_sparse.nn.measured_route).

A plan is JSON:
    {"format": "ptd_sparse.route_plan", "version": 1,
     "layers": {"<qualified name>": {"default": "<route or 'density'>",
                                     "buckets": [{"batch": 64, "height": 32, "width": 32, "dtype": "float32",
                                                  "device": "cpu", "channels_last": false, "autocast": null,
                                                  "route": "sparse"}, ...]}}}
`buckets` are the measured shape buckets (powers of two, see measured_route.shape_key); `default` serves calls in
buckets the plan lacks. Use:
    model = ptd_sparse.sparsify(pruned)            # routes measured on the first calls
    model(example)
    ptd_sparse.save_route_plan(model, "routes.json")
    ...
    model = ptd_sparse.sparsify(pruned, routes="routes.json")   # elsewhere: the same routes, no measurement
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ptd_sparse.files import write_json
from ptd_sparse.nn import measured_route
from ptd_sparse.nn.sparse_conv2d import SparseConv2d

FORMAT, VERSION = "ptd_sparse.route_plan", 1
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in
           (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_BUCKET_FIELDS = ("batch", "height", "width", "dtype", "device", "channels_last", "autocast", "route")


def _layers(model: nn.Module) -> dict[str, SparseConv2d]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseConv2d)}


def route_plan(model: nn.Module) -> dict:
    """The plan of `model`'s SparseConv2d layers: each one's routes per measured bucket, and a default (its fixed
    route or rule, or for a measuring layer the route most of its buckets took)."""
    layers = {}
    for name, layer in _layers(model).items():
        buckets = []
        for (batch, height, width, dtype, device, channels_last, autocast), route in layer.routes.items():
            buckets.append({"batch": batch, "height": height, "width": width,
                            "dtype": str(dtype).removeprefix("torch."), "device": device,
                            "channels_last": channels_last,
                            "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
                            "route": route})
        default = layer.route_policy if layer.route_policy != measured_route.MEASURE else layer.static_route()
        layers[name] = {"default": default, "buckets": buckets}
    return {"format": FORMAT, "version": VERSION, "layers": layers}


def save_route_plan(model: nn.Module, path: str | os.PathLike) -> None:
    """Write route_plan(model) to `path` (JSON, atomically)."""
    write_json(Path(path), route_plan(model))


def _dtype(value, where: str):
    if value not in _DTYPES:
        raise ValueError(f"{where} must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _bucket_key(bucket, where: str) -> tuple[tuple, str]:
    if not isinstance(bucket, dict) or set(bucket) != set(_BUCKET_FIELDS):
        raise ValueError(f"{where} must be an object with the fields {list(_BUCKET_FIELDS)}, got {bucket!r}")
    for field in ("batch", "height", "width"):
        value = bucket[field]
        if type(value) is not int or value < 0 or measured_route.batch_bucket(value) != value:
            raise ValueError(f"{where}.{field} must be 0 or a power of two, got {value!r}")
    if bucket["device"] not in ("cpu", "cuda"):
        raise ValueError(f"{where}.device must be 'cpu' or 'cuda', got {bucket['device']!r}")
    if type(bucket["channels_last"]) is not bool:
        raise ValueError(f"{where}.channels_last must be true or false, got {bucket['channels_last']!r}")
    if bucket["route"] not in measured_route.ROUTES:
        raise ValueError(f"{where}.route must be one of {measured_route.ROUTES}, got {bucket['route']!r}")
    autocast = None if bucket["autocast"] is None else _dtype(bucket["autocast"], f"{where}.autocast")
    key = (bucket["batch"], bucket["height"], bucket["width"], _dtype(bucket["dtype"], f"{where}.dtype"),
           bucket["device"], bucket["channels_last"], autocast)
    return key, bucket["route"]


def check_route_plan(plan) -> dict[str, tuple[str, dict[tuple, str]]]:
    """{layer name: (default, {bucket key: route})} of a plan (a dict as route_plan returns or a file holds);
    raises ValueError naming the first malformed field."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ValueError(f"a route plan must be an object with \"format\": \"{FORMAT}\"")
    if plan.get("version") != VERSION:
        raise ValueError(f"route plan version must be {VERSION}, got {plan.get('version')!r}")
    layers = plan.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"route plan field \"layers\" must be an object, got {type(layers).__name__}")
    checked = {}
    for name, entry in layers.items():
        where = f"route plan layer {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"default", "buckets"}:
            raise ValueError(f"{where} must be an object with the fields default and buckets")
        if entry["default"] not in measured_route.ROUTES + (measured_route.DENSITY,):
            raise ValueError(f"{where}.default must be one of {measured_route.ROUTES + (measured_route.DENSITY,)}, "
                             f"got {entry['default']!r}")
        if not isinstance(entry["buckets"], list):
            raise ValueError(f"{where}.buckets must be a list")
        table = dict(_bucket_key(bucket, f"{where}.buckets[{i}]") for i, bucket in enumerate(entry["buckets"]))
        checked[name] = (entry["default"], table)
    return checked


def load_route_plan(path: str | os.PathLike) -> dict:
    """The plan saved at `path`, checked (ValueError naming the file and the field otherwise)."""
    try:
        plan = json.loads(Path(path).read_text())
        check_route_plan(plan)
    except json.JSONDecodeError as error:
        raise ValueError(f"route plan {path} is not valid JSON: {error}") from None
    except ValueError as error:
        raise ValueError(f"route plan {path}: {error}") from None
    return plan


def apply_routes(model: nn.Module, routes) -> None:
    """Fix the route choice of every SparseConv2d in `model`: `routes` is a policy for all of them
    (measured_route.POLICIES, None meaning measure), a plan (a dict as route_plan returns), or the path of a saved
    plan. A plan must name exactly the model's SparseConv2d layers."""
    layers = _layers(model)
    if routes is None or (isinstance(routes, str) and routes in measured_route.POLICIES):
        for layer in layers.values():
            layer.set_routes(routes)
        return
    if isinstance(routes, (str, os.PathLike)):
        if not Path(routes).is_file():
            raise ValueError(f"routes must be one of {measured_route.POLICIES} or the path of a saved route plan; "
                             f"got {str(routes)!r}, which is neither (no such file)")
        routes = load_route_plan(routes)
    if not isinstance(routes, dict):
        raise TypeError(f"routes must be one of {measured_route.POLICIES}, a route plan or a plan's path, got "
                        f"{type(routes).__name__}")
    checked = check_route_plan(routes)
    missing, extra = sorted(set(layers) - set(checked)), sorted(set(checked) - set(layers))
    if missing or extra:
        raise ValueError("the route plan does not fit this model: "
                         + "; ".join(part for part in (f"no entry for {missing}" if missing else "",
                                                       f"entries for layers it lacks: {extra}" if extra else "")
                                     if part))
    for name, (default, table) in checked.items():
        layers[name].set_routes(default, table)
