"""Non-persistent buffers nothing reads any more, and the `__init__` helpers that only built them.

Older attention classes keep a causal-mask buffer (`self._init_bias(max_positions)` registering a
`[1, 1, max_pos, max_pos]` bool `bias`) and a `masked_bias` constant for their eager core. Paged
attention masks by itself, so once the core is gone those buffers only cost memory (for every
layer). A buffer registered with `persistent=False` is in no checkpoint, so dropping it changes
no weight name. Used by the prune rewrite, class by class.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import calls_in, code_of, is_docstring, self_attribute, self_attributes_read
from porter.analysis.model_index import calls_method, init_helpers
from porter.rewrites.base import PortContext
from porter.rewrites.statement_pruner import names_read

BUFFER_CLASSES = {"nn.Buffer", "torch.nn.Buffer", "Buffer"}


def drop_unread_buffers(class_def: cst.ClassDef, context: PortContext) -> cst.ClassDef:
    """`class_def` without its unread non-persistent buffers (and helpers that only built them)."""
    methods = {s.name.value: s for s in class_def.body.body if isinstance(s, cst.FunctionDef)}
    if "__init__" not in methods:
        return class_def
    setup = {"__init__", *init_helpers(methods["__init__"], methods)}
    buffers: set[str] = set()
    for name in setup:
        buffers |= _non_persistent_buffers(methods[name])
    read: set[str] = set()
    for name, method in methods.items():
        if name not in setup:
            read |= self_attributes_read(method)
    unread = buffers - read
    if not unread:
        return class_def
    where = class_def.name.value
    builders = {
        name
        for name in setup - {"__init__"}
        if all(is_docstring(s) or _only_builds(s, unread) for s in methods[name].body.body)
    }

    def keep(statement: cst.BaseStatement) -> bool:
        if _only_builds(statement, unread) or calls_method(statement) in builders:
            context.record("prune", f"{where}.__init__", statement, "", "a buffer nothing reads")
            return False
        return True

    body = []
    for item in class_def.body.body:
        if isinstance(item, cst.FunctionDef) and item.name.value in builders:
            context.record(
                "prune", where, f"def {item.name.value}", "", "it only built buffers nothing reads"
            )
            continue
        if isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
            dropped = [s for s in item.body.body if not keep(s)]
            kept = [s for s in item.body.body if s not in dropped]
            fed = set().union(*(names_read(s) for s in dropped)) if dropped else set()
            item = item.with_changes(
                body=item.body.with_changes(body=_without_orphans(kept, fed, context, where))
            )
        body.append(item)
    return class_def.with_changes(body=class_def.body.with_changes(body=body))


def _without_orphans(
    statements: list[cst.BaseStatement], fed: set[str], context: PortContext, where: str
) -> list[cst.BaseStatement]:
    """`statements` without the locals that only fed a dropped buffer (`bias = torch.tril(...)`,
    `if local: bias = ...`, `max_positions = ...`), as long as nothing else reads them and they
    compute with torch alone."""
    statements = list(statements)
    while True:
        for position, statement in enumerate(statements):
            targets = _local_targets(statement)
            others = statements[:position] + statements[position + 1 :]
            if (
                targets
                and targets <= fed
                and _torch_only(statement)
                and not any(targets & names_read(other) for other in others)
            ):
                context.record(
                    "prune", f"{where}.__init__", statement, "", "it only built a buffer nothing reads"
                )
                fed |= names_read(statement)
                del statements[position]
                break
        else:
            return statements


def _local_targets(statement: cst.BaseStatement) -> set[str]:
    """Names a plain assignment (or an `if` of only such assignments) binds; empty otherwise."""
    if isinstance(statement, cst.If):
        blocks = [statement.body.body]
        if isinstance(statement.orelse, cst.Else):
            blocks.append(statement.orelse.body.body)
        elif statement.orelse is not None:
            return set()
        parts = [_local_targets(s) for block in blocks for s in block]
        return set().union(*parts) if parts and all(parts) else set()
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return set()
    small = statement.body[0]
    if not isinstance(small, cst.Assign) or not all(isinstance(t.target, cst.Name) for t in small.targets):
        return set()
    return {t.target.value for t in small.targets}


def _torch_only(statement: cst.BaseStatement) -> bool:
    """Every call is a torch function or a method of a local tensor (none of `self`)."""
    for call in calls_in(statement):
        name = code_of(call.func)
        if name.startswith("self.") or (isinstance(call.func, cst.Name) and not name.startswith("torch")):
            return False
    return True


def _register_buffer(statement: cst.CSTNode) -> tuple[str, bool] | None:
    """(name, persistent) of `self.register_buffer("name", value, persistent=...)`, or of
    `self.name = nn.Buffer(value, persistent=...)` (transformers 5)."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    call = getattr(small, "value", None)
    if not isinstance(call, cst.Call):
        return None
    if isinstance(small, cst.Assign) and len(small.targets) == 1 and code_of(call.func) in BUFFER_CLASSES:
        name = self_attribute(small.targets[0].target)
        persistent = next(
            (code_of(a.value) for a in call.args if a.keyword and a.keyword.value == "persistent"), "True"
        )
        return (name, persistent != "False") if name is not None else None
    if not isinstance(small, cst.Expr):
        return None
    if code_of(call.func) != "self.register_buffer" or not isinstance(call.args[0].value, cst.SimpleString):
        return None
    persistent = next(
        (code_of(a.value) for a in call.args if a.keyword and a.keyword.value == "persistent"), "True"
    )
    return call.args[0].value.evaluated_value, persistent != "False"


def _non_persistent_buffers(function: cst.FunctionDef) -> set[str]:
    found: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_SimpleStatementLine(self, statement: cst.SimpleStatementLine) -> None:
            registered = _register_buffer(statement)
            if registered is not None and not registered[1]:
                found.add(registered[0])

    function.visit(_Find())
    return found


def _only_builds(statement: cst.BaseStatement, buffers: set[str]) -> bool:
    """Registers or reassigns one of `buffers` and nothing else (an `if` of such statements too)."""
    if isinstance(statement, cst.If):
        blocks = [statement.body.body]
        if isinstance(statement.orelse, cst.Else):
            blocks.append(statement.orelse.body.body)
        elif statement.orelse is not None:
            return False
        return all(_only_builds(s, buffers) for block in blocks for s in block)
    registered = _register_buffer(statement)
    if registered is not None:
        return registered[0] in buffers and not registered[1]
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        small = statement.body[0]
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            return self_attribute(small.targets[0].target) in buffers
    return False
