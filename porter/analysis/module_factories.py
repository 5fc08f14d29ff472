"""Modules built through a factory: `init_method(nn.Linear, hidden, vocab, bias=False)`.

A factory takes the module class first and the constructor's arguments after it: torch's
`skip_init` (which builds the module without running its parameter initialisation), or a function
of the file that only returns `cls(*args, **kwargs)`. `__init__` may pick one into a local first
(`init_method = skip_init if empty_init else default_init`). Either way the call builds
`nn.Linear(hidden, vocab, bias=False)`; the engine loads every weight, so the initialisation the
factory skips or runs does not matter.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, function_params, nodes_of

TORCH_FACTORIES = {("torch.nn.utils", "skip_init")}


def module_factories(module: cst.Module) -> set[str]:
    """Names of the module-level factories of `module`: torch's `skip_init` as imported, and
    functions returning their first parameter called with all the others."""
    found: set[str] = set()
    for statement in module.body:
        if isinstance(statement, cst.FunctionDef) and _forwards_first_parameter(statement):
            found.add(statement.name.value)
        for node in nodes_of(statement, cst.ImportFrom) if not isinstance(statement, cst.ClassDef) else []:
            package = code_of(node.module) if node.module is not None and not node.relative else None
            if isinstance(node.names, cst.ImportStar):
                continue
            for alias in node.names:
                if (package, code_of(alias.name)) in TORCH_FACTORIES:
                    found.add(code_of(alias.asname.name) if alias.asname else code_of(alias.name))
    found |= {f"{package}.{name}" for package, name in TORCH_FACTORIES}
    return found


def _forwards_first_parameter(function: cst.FunctionDef) -> bool:
    """`def f(cls, *args, **kwargs): return cls(*args, **kwargs)`."""
    params = function.params
    body = function.body.body
    if len(params.params) != 1 or not isinstance(params.star_arg, cst.Param) or params.star_kwarg is None:
        return False
    if len(body) != 1 or not isinstance(body[0], cst.SimpleStatementLine):
        return False
    returned = body[0].body[0].value if isinstance(body[0].body[0], cst.Return) else None
    first = function_params(function)[0]
    return (
        isinstance(returned, cst.Call)
        and isinstance(returned.func, cst.Name)
        and returned.func.value == first
        and [(a.star, code_of(a.value)) for a in returned.args]
        == [("*", params.star_arg.name.value), ("**", params.star_kwarg.name.value)]
    )


def factory_locals(function: cst.FunctionDef, factories: set[str]) -> set[str]:
    """Locals of `function` every assignment of which is one of `factories` (in any branch)."""
    values: dict[str, list[cst.BaseExpression]] = {}
    for assign in nodes_of(function, cst.Assign):
        for target in assign.targets:
            if isinstance(target.target, cst.Name):
                values.setdefault(target.target.value, []).append(assign.value)
    return {
        name for name, assigned in values.items() if all(code_of(value) in factories for value in assigned)
    }


def built_call(call: cst.Call, factories: set[str]) -> cst.Call | None:
    """`C(a, b=c)` for `factory(C, a, b=c)` where the callee is one of `factories` (names, or locals
    holding one); None for any other call."""
    if code_of(call.func) not in factories or not call.args:
        return None
    first = call.args[0]
    if first.keyword is not None or first.star:
        return None
    rest = list(call.args[1:])
    return cst.Call(func=first.value, args=rest)
