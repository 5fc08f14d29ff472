"""Which attributes of a class hold an activation function (built from HF's `ACT2FN` table, its
`get_activation`, or a torch activation module)."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, init_attribute_values
from porter.analysis.model_index import ClassInfo

ACTIVATION_FACTORIES = {
    "ACT2FN",
    "get_activation",
    "nn.GELU",
    "nn.SiLU",
    "nn.ReLU",
    "nn.Tanh",
    "NewGELUActivation",
}


def elementwise_attributes(info: ClassInfo) -> set[str]:
    """Attributes of a class that hold an activation function."""
    found = set()
    for attr, value in init_attribute_values(info.methods.get("__init__")).items():
        root = (
            value.value
            if isinstance(value, cst.Subscript)
            else (value.func if isinstance(value, cst.Call) else value)
        )
        if code_of(root) in ACTIVATION_FACTORIES or code_of(root).split(".")[-1] in ACTIVATION_FACTORIES:
            found.add(attr)
    return found
