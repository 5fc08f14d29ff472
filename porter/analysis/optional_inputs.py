"""Optional forward inputs that nothing in the file ever passes.

Attention classes shared by encoder-decoder and decoder-only models take inputs such as
`key_value_states=None` (cross-attention) that a decoder-only model's layers never hand them. Such
an input is None on every call, so the port drops it like HF plumbing and the branches that test it
are decided. Only a module whose every use in the file is a direct call `self.<attr>(...)` is judged, and a call
that unpacks `*args`/`**mapping` counts as passing everything, except the caller's own `**kwargs`
(HF plumbing, which the engine's calling convention drops); a module reached any other way (a
ModuleList element, a module passed to a helper) keeps all its inputs. Reading a member of a
module (`self.transformer.output_layer`) is no such way.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, nodes_of, self_attribute
from porter.analysis.model_index import ModelIndex


def never_passed(index: ModelIndex) -> dict[str, set[str]]:
    """Class -> forward parameters defaulting to None that no call in the classes the causal LM
    runs passes."""
    sites: dict[str, list[cst.Call]] = {}
    opaque: set[str] = set()
    # Only what the causal LM runs: a task head beside it (a classifier passing the backbone an
    # input the LM never does) is not ported.
    for owner in (index.classes[name] for name in index.reachable if name in index.classes):
        for attr in owner.module_lists:
            opaque.add(owner.submodules.get(attr, ""))
        for method_name, method in owner.methods.items():
            direct = set()
            own_kwargs = method.params.star_kwarg
            forwarded = own_kwargs.name.value if isinstance(own_kwargs, cst.Param) else None
            for call in nodes_of(method, cst.Call):
                attr = self_attribute(call.func)
                if attr in owner.submodules:
                    sites.setdefault(owner.submodules[attr], []).append(_without_forwarded(call, forwarded))
                    direct.add(id(call.func))
            attributes = nodes_of(method, cst.Attribute)
            # `self.transformer.output_layer`: a member of the module is read, the module is not
            # handed anywhere.
            members = {id(n.value) for n in attributes if isinstance(n.value, cst.Attribute)}
            for node in (n for n in attributes if self_attribute(n) is not None and id(n) not in members):
                attr = node.attr.value
                if attr in owner.submodules and id(node) not in direct and not _is_assignment(method_name):
                    opaque.add(owner.submodules[attr])
    result: dict[str, set[str]] = {}
    for name, calls in sites.items():
        forward = index.classes[name].methods.get("forward") if name in index.classes else None
        if forward is None or name in opaque or any(_has_star(call) for call in calls):
            continue
        positional = [p.name.value for p in forward.params.params][1:]  # after self
        optional = [
            p.name.value
            for p in (*forward.params.params, *forward.params.kwonly_params)
            if p.default is not None and code_of(p.default).strip() == "None"
        ]
        unused = {param for param in optional if not any(_passes(call, param, positional) for call in calls)}
        if unused:
            result[name] = unused
    return result


def _is_assignment(method_name: str) -> bool:
    # `self.attn = Attention(...)` in __init__ is where the module is built, not a use of it.
    return method_name == "__init__"


def _without_forwarded(call: cst.Call, forwarded: str | None) -> cst.Call:
    """The call without `**<the caller's own **kwargs>`: the engine's calling convention has no
    `**kwargs`, so what HF forwards through them never reaches the port."""
    if forwarded is None:
        return call
    args = [a for a in call.args if not (a.star == "**" and code_of(a.value).strip() == forwarded)]
    return call.with_changes(args=args)


def _has_star(call: cst.Call) -> bool:
    return any(arg.star for arg in call.args)


def _passes(call: cst.Call, param: str, positional: list[str]) -> bool:
    if any(arg.keyword is not None and arg.keyword.value == param for arg in call.args):
        return True
    given = sum(1 for arg in call.args if arg.keyword is None)
    return param in positional and positional.index(param) < given
