"""Which of the file's normalisation classes compute exactly what the engine's `RMSNorm` computes.

HF files each define their own RMSNorm, and they differ in ways that matter in bf16: where the
weight multiplies (before or after the cast back to the input dtype), and whether the weight is
stored as an offset from one (`x * (1 + w)`, Gemma). Reading that from the code would mean
matching every spelling of the same arithmetic, so the class is run instead: its code is executed
on its own (it may use only torch), and one instance is compared, bit for bit on random inputs in
float32, bfloat16 and float16, with each configuration of `engine.layers.RMSNorm`. A class that
matches exactly one configuration, keeps a single parameter called `weight` (so checkpoints load
unchanged) and is built as `Class(size, eps)` is swapped; anything else is left as it is.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import libcst as cst
import torch
import torch.nn.functional as F
from torch import nn

from porter.analysis.cst_utils import code_of

_SIZE = 48
_EPS = 1e-5  # distinct from the usual defaults, to find which constructor argument is eps
# (weight_offset, multiply_in_float32): the arithmetic variants the engine's RMSNorm offers
_ENGINE_VARIANTS = ((0.0, False), (0.0, True), (1.0, True), (1.0, False))


@dataclass(frozen=True, slots=True)
class RMSNormMatch:
    """How to build the engine's RMSNorm in place of one source class."""

    size_param: str  # the constructor parameter holding the normalised size
    eps_param: str  # the constructor parameter holding epsilon
    eps_default: Any  # its default value, or inspect.Parameter.empty
    weight_offset: float
    multiply_in_float32: bool

    def engine_kwargs(self) -> str:
        """The keyword arguments beyond size and eps, as source text."""
        extra = []
        if self.weight_offset:
            extra.append(f"weight_offset={self.weight_offset!r}")
        if self.multiply_in_float32:
            extra.append("multiply_in_float32=True")
        return "".join(f", {e}" for e in extra)


def find_rms_norms(module: cst.Module) -> dict[str, RMSNormMatch]:
    """Class name -> how the engine's RMSNorm replaces it, for every class that is an RMSNorm."""
    found: dict[str, RMSNormMatch] = {}
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef):
            continue
        code = code_of(statement)
        if "rsqrt" not in code or "weight" not in code:  # cheap filter before running anything
            continue
        match = _match(statement.name.value, code)
        if match is not None:
            found[statement.name.value] = match
    return found


@functools.cache
def _match(name: str, code: str) -> RMSNormMatch | None:
    """How the engine's RMSNorm replaces class `name` defined by `code`, or None. Cached by the
    class's source: many files share one RMSNorm text, and running it costs more than parsing it."""
    cls = _load_class(name, code)
    if cls is None:
        return None
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if len(params) < 2 or any(p.default is inspect.Parameter.empty for p in params[2:]):
        return None
    size_param, eps_param = params[0], params[1]
    try:
        with torch.no_grad():
            source = cls(_SIZE, _EPS)
    except Exception:  # a constructor that needs more than (size, eps) is not one we can replace
        return None
    if not isinstance(source, nn.Module) or [n for n, _ in source.named_parameters()] != ["weight"]:
        return None
    if list(source.buffers()) or not any(v == _EPS for v in vars(source).values() if isinstance(v, float)):
        return None
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        source.weight.copy_(torch.randn(source.weight.shape, generator=generator) * 0.5)
    for offset, in_float32 in _ENGINE_VARIANTS:
        if _same_outputs(source, offset, in_float32, generator):
            return RMSNormMatch(size_param.name, eps_param.name, eps_param.default, offset, in_float32)
    return None


def _load_class(name: str, code: str) -> type | None:
    """The class defined by `code`, executed with only torch in scope; None if it needs more."""
    namespace: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "math": math, "__name__": "porter_probe"}
    try:
        exec(compile("from __future__ import annotations\n" + code, f"<{name}>", "exec"), namespace)
    except Exception:
        return None
    cls = namespace.get(name)
    return cls if isinstance(cls, type) else None


def _same_outputs(source: nn.Module, offset: float, in_float32: bool, generator: torch.Generator) -> bool:
    from engine.layers.norm import RMSNorm

    variant = {"weight_offset": offset, "multiply_in_float32": in_float32} if offset or in_float32 else {}
    try:
        engine = RMSNorm(_SIZE, eps=_EPS, **variant)
    except TypeError:  # an engine without this variant
        return False
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.no_grad():
            source_copy = source.to(dtype)
            engine.weight.data = source_copy.weight.data.clone()
            x = (torch.randn(3, 5, _SIZE, generator=generator) * 3).to(dtype)
            try:
                expected = source_copy(x)
            except Exception:
                return False
            if not isinstance(expected, torch.Tensor) or not torch.equal(engine(x), expected):
                return False
    return True
