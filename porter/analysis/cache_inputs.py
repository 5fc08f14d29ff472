"""Which forward parameters carry HF's KV cache, recognised by what they are and what is done with them.

The spelling changes from release to release (`layer_past`, `past_key_value`, `past_key_values`,
`cache`), the role does not. A parameter carries the cache when
- its annotation names a cache class of the framework (resolved through the file's imports and
  aliases by libcst's QualifiedNameProvider: `from ...cache_utils import Cache as C` counts);
- the forward calls the cache API on it: `p.update(key, value, layer_idx, ...)`, `p.get_seq_length()`;
- the forward unpacks it into two tensors and concatenates one in front of another (the tuple cache
  of past keys and values: `cache_k, cache_v = p`; `torch.cat((cache_k, key_layer), dim=0)`);
- a deprecation decorator declares it the new name of a plumbing parameter
  (`@deprecate_kwarg("past_key_values", ..., new_name="cache")`);
- or it is handed to a submodule's forward as that forward's cache parameter, or receives a cache
  parameter of its caller (the decoder layer threads the model's cache to its attention); an item
  of it handed on (`kv_cache=kv_caches[index]`) links the per-layer list to one layer's cache.
Read-only; the signatures analysis drops these parameters like the plumbing it knows by name.
"""

from __future__ import annotations

import libcst as cst
from libcst.metadata import MetadataWrapper, QualifiedName, QualifiedNameProvider

from porter.analysis.cst_utils import (
    assigned_names,
    call_name,
    calls_in,
    function_params,
    nodes_of,
    self_attribute_path,
)
from porter.analysis.model_index import ModelIndex

# The framework module holding the cache classes, as a qualified name ends (`transformers.cache_utils`,
# or `...cache_utils` through a relative import); its classes named `*Cache` are caches.
CACHE_MODULE = "cache_utils"
# Methods only a cache has: `update(key_states, value_states, layer_idx, ...)` appends this step's
# keys and values; `get_seq_length()` counts the cached tokens.
CACHE_METHODS = {"update": 3, "get_seq_length": 0}


def cache_inputs(index: ModelIndex, plumbing: set[str]) -> dict[str, set[str]]:
    """Per class the causal LM runs, the forward parameters that carry the KV cache. `plumbing`: the
    parameter names known as HF plumbing, which a deprecation decorator may rename."""
    forwards = {
        name: forward
        for name in index.reachable
        if (forward := index.classes[name].methods.get("forward")) is not None
    }
    annotated = _annotated_caches(index.module, forwards)
    found: dict[str, set[str]] = {}
    for name, forward in forwards.items():
        params = set(function_params(forward)[1:])
        roles = annotated.get(name, set()) | (params & _cache_api_receivers(forward.body))
        roles |= params & _concatenated_pairs(forward.body)
        roles |= params & _renamed_plumbing(forward, plumbing)
        if roles:
            found[name] = roles
    links = [link for name in forwards for link in _keyword_links(index, name)]
    params = {name: set(function_params(forward)[1:]) for name, forward in forwards.items()}
    _propagate(links, params, found)
    # The number of cached tokens (`cache_length = cache.get_seq_length() if cache is not None else 0`)
    # handed to a submodule: its parameter is plumbing too (5.25's name for past_key_values_length).
    lengths = {
        name: _cache_lengths(forward.body, found.get(name, set())) for name, forward in forwards.items()
    }
    for caller, passed, callee, receiver in links:
        if passed in lengths.get(caller, ()):
            found.setdefault(callee, set()).add(receiver)
    return found


def _cache_lengths(body: cst.CSTNode, caches: set[str]) -> set[str]:
    """Names assigned from an expression that asks one of `caches` for its length."""
    found: set[str] = set()
    if not caches:
        return found

    class _Assigns(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            if caches & _cache_api_receivers(node.value, ("get_seq_length",)):
                for target in node.targets:
                    found.update(assigned_names(target.target))

    body.visit(_Assigns())
    return found


def _annotated_caches(module: cst.Module, forwards: dict[str, cst.FunctionDef]) -> dict[str, set[str]]:
    """Per class, the forward parameters annotated with a framework cache class. The scope analysis
    runs on the file's top-level bindings and the annotations alone (`_annotation_3 = Cache | None`),
    not on every body: the same names resolve, in a fraction of the time a large file takes."""
    annotations = [
        (name, param.name.value, param.annotation.annotation)
        for name, forward in forwards.items()
        for param in (*forward.params.posonly_params, *forward.params.params, *forward.params.kwonly_params)
        if param.annotation is not None
    ]
    if not annotations:
        return {}
    probes = [
        cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(cst.Name(f"_annotation_{i}"))], expression)])
        for i, (_, _, expression) in enumerate(annotations)
    ]
    bindings = module.with_changes(body=[*_top_level_bindings(module), *probes])
    names = MetadataWrapper(bindings, unsafe_skip_copy=True).resolve(QualifiedNameProvider)
    found: dict[str, set[str]] = {}
    for (owner, param, _), probe in zip(annotations, probes):
        expression = probe.body[0].value
        if any(
            _is_cache_class(qualified.name)
            for node in (expression, *_names_within(expression))
            for qualified in _resolved(names.get(node))
        ):
            found.setdefault(owner, set()).add(param)
    return found


def _top_level_bindings(module: cst.Module) -> list[cst.BaseStatement]:
    """What binds a module-level name, with bodies emptied: imports as they are, `class X: pass`,
    `def f(): pass`, and `X = None` for each assigned name."""
    empty = cst.IndentedBlock([cst.SimpleStatementLine([cst.Pass()])])
    found: list[cst.BaseStatement] = []
    for statement in module.body:
        if isinstance(statement, cst.ClassDef):
            found.append(statement.with_changes(body=empty, bases=[], keywords=[], decorators=[]))
        elif isinstance(statement, cst.FunctionDef):
            found.append(
                statement.with_changes(body=empty, params=cst.Parameters(), decorators=[], returns=None)
            )
        elif isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, (cst.Import, cst.ImportFrom)):
                    found.append(cst.SimpleStatementLine([small]))
                elif isinstance(small, cst.Assign):
                    for name in (n for t in small.targets for n in assigned_names(t.target)):
                        found.append(cst.parse_statement(f"{name} = None"))
        elif isinstance(statement, (cst.If, cst.Try)):
            found.extend(_imports_within(statement))  # `if is_torch_available(): from ... import X`
    return found


def _imports_within(statement: cst.CSTNode) -> list[cst.BaseStatement]:
    found: list[cst.BaseStatement] = []

    class _Imports(cst.CSTVisitor):
        def visit_SimpleStatementLine(self, line: cst.SimpleStatementLine) -> bool:
            found.extend(
                cst.SimpleStatementLine([s]) for s in line.body if isinstance(s, (cst.Import, cst.ImportFrom))
            )
            return False

        def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
            return False

    statement.visit(_Imports())
    return found


def _names_within(expression: cst.BaseExpression) -> list[cst.BaseExpression]:
    """Every name and attribute chain inside an annotation (`Cache | None`, `Optional[Cache]`)."""
    found: list[cst.BaseExpression] = []

    class _Names(cst.CSTVisitor):
        def visit_Name(self, node: cst.Name) -> None:
            found.append(node)

        def visit_Attribute(self, node: cst.Attribute) -> None:
            found.append(node)

    expression.visit(_Names())
    return found


def _resolved(value) -> set[QualifiedName]:
    """A QualifiedNameProvider entry: libcst computes them lazily (a callable) in recent releases."""
    value = value() if callable(value) else value
    return value or set()


def _is_cache_class(qualified: str) -> bool:
    module, _, name = qualified.lstrip(".").rpartition(".")
    return module.rpartition(".")[2] == CACHE_MODULE and name.endswith("Cache")


def _cache_api_receivers(body: cst.CSTNode, methods: tuple[str, ...] = tuple(CACHE_METHODS)) -> set[str]:
    """Names the cache API (`methods` of it) is called on: `p.update(key, value, layer_idx, ...)`,
    `p.get_seq_length()`."""
    found: set[str] = set()

    class _Calls(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            func = call.func
            if (
                isinstance(func, cst.Attribute)
                and isinstance(func.value, cst.Name)
                and func.attr.value in methods
                and len(call.args) >= CACHE_METHODS[func.attr.value]
            ):
                found.add(func.value.value)

    body.visit(_Calls())
    return found


def _concatenated_pairs(body: cst.CSTNode) -> set[str]:
    """Names unpacked into two (`a, b = p`) where `a` or `b` is concatenated in front of another
    tensor (`torch.cat((a, x), ...)`): past keys and values carried as a tuple."""
    pairs: dict[str, str] = {}
    for node in nodes_of(body, cst.Assign):
        target = node.targets[0].target if len(node.targets) == 1 else None
        if (
            isinstance(target, cst.Tuple)
            and len(target.elements) == 2
            and all(isinstance(e.value, cst.Name) for e in target.elements)
            and isinstance(node.value, cst.Name)
        ):
            for element in target.elements:
                pairs[element.value.value] = node.value.value
    found: set[str] = set()
    for call in calls_in(body):
        if (call_name(call) or "").rpartition(".")[2] != "cat" or not call.args:
            continue
        tensors = call.args[0].value
        if isinstance(tensors, (cst.Tuple, cst.List)) and len(tensors.elements) >= 2:
            first = tensors.elements[0].value
            if isinstance(first, cst.Name) and first.value in pairs:
                found.add(pairs[first.value])
    return found


def _renamed_plumbing(forward: cst.FunctionDef, plumbing: set[str]) -> set[str]:
    """New names a decorator gives plumbing parameters: `@deprecate_kwarg("old", ..., new_name="new")`."""
    renamed = set()
    for decorator in forward.decorators:
        call = decorator.decorator
        if (
            not isinstance(call, cst.Call)
            or not call.args
            or not isinstance(call.args[0].value, cst.SimpleString)
        ):
            continue
        new = next(
            (a.value for a in call.args if a.keyword is not None and a.keyword.value == "new_name"), None
        )
        if isinstance(new, cst.SimpleString) and call.args[0].value.evaluated_value in plumbing:
            renamed.add(new.evaluated_value)
    return renamed


def _propagate(
    links: list[tuple[str, str, str, str]], params: dict[str, set[str]], found: dict[str, set[str]]
) -> None:
    """A parameter passed as a submodule forward's cache parameter is a cache, and so is the
    submodule parameter that receives a cache; repeated until nothing changes."""
    changed = True
    while changed:
        changed = False
        for caller, passed, callee, keyword in links:
            if passed in found.get(caller, ()) and keyword not in found.get(callee, ()):
                found.setdefault(callee, set()).add(keyword)
                changed = True
            if (
                keyword in found.get(callee, ())
                and passed in params.get(caller, ())
                and passed not in found.get(caller, ())
            ):
                found.setdefault(caller, set()).add(passed)
                changed = True


def _keyword_links(index: ModelIndex, owner: str) -> list[tuple[str, str, str, str]]:
    """(owner, the name it passes, callee class, callee parameter) for every argument that is a
    plain name, by keyword or by position, of a submodule call in `owner.forward`."""
    forward = index.classes[owner].methods.get("forward")
    if forward is None:
        return []
    loops = _layer_loop_vars(index, owner, forward)
    links = []
    for call in calls_in(forward.body):
        func = call.func.value if isinstance(call.func, cst.Subscript) else call.func
        path = self_attribute_path(func)
        callee = index.class_of_path(owner, path) if path else loops.get(call_name(call) or "")
        callee_forward = index.classes[callee].methods.get("forward") if callee in index.classes else None
        if callee_forward is None:
            continue
        callee_params = function_params(callee_forward)[1:]
        for position, arg in enumerate(call.args):
            value = arg.value.value if isinstance(arg.value, cst.Subscript) else arg.value
            if not isinstance(value, cst.Name) or arg.star:
                continue
            if arg.keyword is not None:
                receiver = arg.keyword.value if arg.keyword.value in callee_params else None
            else:
                receiver = callee_params[position] if position < len(callee_params) else None
            if receiver is not None:
                links.append((owner, value.value, callee, receiver))
    return links


def _layer_loop_vars(index: ModelIndex, owner: str, forward: cst.FunctionDef) -> dict[str, str]:
    """Loop variable -> the submodule class it runs: `for layer in self.layers[:n]:`, with or
    without `enumerate`, or a name a loop body binds to one item (`layer = self.layers[index]`)."""
    found = {}
    for loop in _loops(forward.body):
        for node in nodes_of(loop.body, cst.Assign):
            value, targets = node.value, node.targets
            if (
                isinstance(value, cst.Subscript)
                and len(targets) == 1
                and isinstance(targets[0].target, cst.Name)
            ):
                path = self_attribute_path(value.value)
                child = index.class_of_path(owner, path) if path else None
                if child is not None:
                    found[targets[0].target.value] = child
    for loop in _loops(forward.body):
        iterable, target = loop.iter, loop.target
        if call_name(iterable) == "enumerate" and isinstance(target, cst.Tuple) and len(target.elements) == 2:
            iterable, target = iterable.args[0].value, target.elements[1].value
        if isinstance(iterable, cst.Subscript):
            iterable = iterable.value
        path = self_attribute_path(iterable)
        child = index.class_of_path(owner, path) if path else None
        if child is not None and isinstance(target, cst.Name):
            found[target.value] = child
    return found


def _loops(body: cst.CSTNode) -> list[cst.For]:
    found: list[cst.For] = []

    class _Loops(cst.CSTVisitor):
        def visit_For(self, node: cst.For) -> None:
            found.append(node)

    body.visit(_Loops())
    return found
