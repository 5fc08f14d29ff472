"""The statement-level work of dead-code: decide conditions, then drop what reads removed names.

`Pruner` walks one forward's statements in order. An `if` whose test it can decide (a dropped
parameter is None, an engine input is present, `self.training` is False, a constructor flag or an
attention-backend choice is fixed) keeps the branch that runs; with `cascade`, a statement that
reads a dead name goes too, and a fresh variable it assigned dies with it. Loops and blocks that
run submodules are never dropped silently: they become review items.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import (
    calls_in,
    dotted_name,
    fast_visit,
    names_in,
    self_attribute,
    statement_targets,
)
from porter.analysis.optional_backends import asks_availability, eager_backend_choice
from porter.rewrites.base import PortContext

FALSE_ATTRIBUTES = {"self.training", "self.gradient_checkpointing"}
UNKNOWN = object()
_ORDERINGS = {
    cst.LessThan: lambda a, b: a < b,
    cst.GreaterThan: lambda a, b: a > b,
    cst.LessThanEqual: lambda a, b: a <= b,
    cst.GreaterThanEqual: lambda a, b: a >= b,
    cst.Equal: lambda a, b: a == b,
    cst.NotEqual: lambda a, b: a != b,
}


def _same_code(first: list[cst.BaseStatement], second: list[cst.BaseStatement]) -> bool:
    """The same statements, comments, blank lines and `pass` aside."""

    def strip(statements):
        codes = [_code(s.with_changes(leading_lines=[])).strip() for s in statements]
        return [c for c in codes if c != "pass"]

    return strip(first) == strip(second)


def calls_anything(node: cst.CSTNode) -> bool:
    return bool(calls_in(node))


# Calls that only read a tensor's or container's size: a test made of them has no side effect.
# Calls that only ask about sizes, types or whether torch.compile is tracing (`torch.is_tensor(n)`,
# transformers' `is_torchdynamo_compiling()`, in 5.25's guard around growing a position table).
QUERY_CALLS = {
    "size",
    "dim",
    "numel",
    "len",
    "isinstance",
    "hasattr",
    "getattr",
    "is_tensor",
    "is_torchdynamo_compiling",
}


def only_queries(node: cst.CSTNode) -> bool:
    """Every call in `node` only asks about sizes or types, so dropping it changes nothing."""
    for call in calls_in(node):
        name = call.func.attr.value if isinstance(call.func, cst.Attribute) else dotted_name(call.func)
        if name not in QUERY_CALLS:
            return False
    return True


LOOKUPS = {"get", "pop"}
CONSTANTS = {"True": True, "False": False, "None": None}
ORDER = {
    cst.Equal: lambda a, b: a == b,
    cst.NotEqual: lambda a, b: a != b,
    cst.GreaterThan: lambda a, b: a > b,
    cst.GreaterThanEqual: lambda a, b: a >= b,
    cst.LessThan: lambda a, b: a < b,
    cst.LessThanEqual: lambda a, b: a <= b,
}


def empty_keywords_test(node: cst.Comparison, keywords: set[str]) -> bool | None:
    """A test of a `**kwargs` mapping the engine leaves empty, decided: `"padding_mask" in kwargs`
    is False, `kwargs.pop("position_ids", False) is not False` compares the default, `len(kwargs) >
    0` compares 0 (the deprecation warnings and errors of older files)."""
    left, comparison = node.left, node.comparisons[0]
    operator, right = comparison.operator, comparison.comparator
    if isinstance(operator, (cst.In, cst.NotIn)) and isinstance(right, cst.Name) and right.value in keywords:
        return isinstance(operator, cst.NotIn)
    if isinstance(operator, (cst.Is, cst.IsNot)) and isinstance(right, cst.Name) and right.value in CONSTANTS:
        default = _lookup_default(left, keywords)
        if isinstance(default, cst.Name) and default.value in CONSTANTS:
            same = CONSTANTS[default.value] is CONSTANTS[right.value]
            return same if isinstance(operator, cst.Is) else not same
        return None
    if (
        type(operator) in ORDER
        and m.matches(left, m.Call(func=m.Name("len"), args=[m.Arg(m.Name())]))
        and left.args[0].value.value in keywords
        and isinstance(right, cst.Integer)
    ):
        return ORDER[type(operator)](0, int(right.value))
    return None


def _lookup_default(node: cst.BaseExpression, keywords: set[str]) -> cst.BaseExpression | None:
    """What `kwargs.get(key[, default])` / `kwargs.pop(key, default)` gives on an empty mapping."""
    if not (
        isinstance(node, cst.Call)
        and isinstance(node.func, cst.Attribute)
        and isinstance(node.func.value, cst.Name)
        and node.func.value.value in keywords
        and node.func.attr.value in LOOKUPS
    ):
        return None
    if len(node.args) == 2:
        return node.args[1].value
    return cst.Name("None") if node.func.attr.value == "get" and len(node.args) == 1 else None


def _same_device(node: cst.Comparison) -> bool | None:
    """`a.device == b.device` (or `!=`): the engine keeps the model and its inputs on one device, so a
    buffer moved to its input's device (`if table.device != ids.device: table = table.to(...)`) is
    already there."""
    comparison = node.comparisons[0]
    both = (node.left, comparison.comparator)
    if not all(isinstance(side, cst.Attribute) and side.attr.value == "device" for side in both):
        return None
    if isinstance(comparison.operator, cst.Equal):
        return True
    if isinstance(comparison.operator, cst.NotEqual):
        return False
    return None


class Pruner:
    def __init__(
        self,
        context: PortContext,
        where: str,
        dead: set[str],
        absent: set[str],
        present: set[str],
        live: set[str],
        cascade: bool = True,
        attributes: dict[str, bool | None] | None = None,
        keywords: set[str] | frozenset[str] = frozenset(),
        numbers: dict[str, int] | None = None,
    ) -> None:
        self.cascade = cascade
        # Locals the function binds once, to an integer literal (`past_len = 0` once the branch
        # that measured a legacy cache is gone): comparisons of them with a literal are decided.
        self.numbers = numbers or {}
        # The forward's `**kwargs` parameter where the engine passes no extra keywords: it is empty.
        self.keywords = set(keywords)
        # Names bound to a sequence of Nones (`past = tuple([None] * len(self.h))`, a no-cache
        # placeholder per layer): each element is None.
        self.none_sequences: set[str] = set()
        self.attributes = attributes or {}  # self.<attr> fixed by constructor defaults
        self.context, self.where = context, where
        self.dead, self.absent, self.present, self.live = set(dead), absent, present, set(live)
        self.modules: set[str] = set()  # attributes holding modules (set by the transformer)
        self.loop_vars: set[str] = set()
        self.constants: dict[str, bool] = {}  # flags decided from plumbing (`is_cross = encoder is not None`)

    def _runs_submodule(self, statement: cst.CSTNode) -> bool:
        """Calls a module built in __init__ (`self.layer(...)`) or a layer of a loop over one."""
        found = []
        modules, loop_vars = self.modules, self.loop_vars

        class _Find(cst.CSTVisitor):
            def visit_Call(self, node: cst.Call) -> None:
                name = dotted_name(node.func) or ""
                if name in loop_vars or (name.startswith("self.") and name.split(".")[1] in modules):
                    found.append(node)

        statement.visit(_Find())
        return bool(found)

    def _known_flag(self, statement: cst.SimpleStatementLine) -> tuple[str, bool] | None:
        if len(statement.body) != 1 or not isinstance(statement.body[0], cst.Assign):
            return None
        assign = statement.body[0]
        if len(assign.targets) != 1 or not isinstance(assign.targets[0].target, cst.Name):
            return None
        if not (
            names_in(assign.value) & (self.dead | self.absent | set(self.constants))
            or any(asks_availability(call) for call in calls_in(assign.value))
        ):
            return None
        value = self.evaluate(assign.value)
        return (assign.targets[0].target.value, value) if isinstance(value, bool) else None

    def block(self, statements: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        result: list[cst.BaseStatement] = []
        for statement in statements:
            result.extend(self.statement(statement))
        return result

    def statement(self, statement: cst.BaseStatement) -> list[cst.BaseStatement]:
        if isinstance(statement, cst.If):
            return self._if(statement)
        if isinstance(statement, (cst.For, cst.While, cst.With)):
            header = (
                statement.iter
                if isinstance(statement, cst.For)
                else (
                    statement.test
                    if isinstance(statement, cst.While)
                    else cst.Tuple([cst.Element(i.item) for i in statement.items])
                )
            )
            if names_in(header) & self.dead and self.cascade:
                if isinstance(statement, cst.For):
                    self.loop_vars |= names_in(statement.target)
                if self._runs_submodule(statement):
                    self.context.flag(
                        "dead-code",
                        self.where,
                        f"a loop that runs submodules iterates over removed "
                        f"{', '.join(sorted(names_in(header) & self.dead))}",
                    )
                    return [statement]
                self._drop(statement, "loops over removed plumbing")
                return []
            if isinstance(statement, cst.For):
                self.live |= names_in(statement.target)
                self.loop_vars |= names_in(statement.target)
            body = self.block(list(statement.body.body)) or [cst.SimpleStatementLine([cst.Pass()])]
            return [statement.with_changes(body=statement.body.with_changes(body=body))]
        if isinstance(statement, cst.SimpleStatementLine):
            statement = self._decide_conditional_expressions(statement)
            statement = self._substitute_constants(statement)
            targets = statement_targets(statement)
            known = self._known_flag(statement)
            if known is not None:
                name, value = known
                self.constants[name] = value
                self._drop(statement, f"`{name}` is always {value} in the engine")
                return []
            reads_dead = names_in(statement) & self.dead
            if reads_dead and self.cascade and self._runs_submodule(statement):
                # A statement that runs part of the model (a layer, attention) is never dropped
                # silently: something it needs was removed, and a person has to look.
                self.context.flag(
                    "dead-code",
                    self.where,
                    f"`{_code(statement.with_changes(leading_lines=[])).strip()[:80]}` runs a submodule but reads removed "
                    f"{', '.join(sorted(reads_dead))}",
                )
                return [statement]
            if reads_dead and self.cascade:
                fresh = [t for t in targets if t not in self.live]
                self.dead |= set(fresh)
                self._drop(statement, f"reads removed {', '.join(sorted(reads_dead))}")
                return []
            self.live |= set(targets)
            self.absent -= set(targets)
            for target in targets:
                self.constants.pop(target, None)
            if len(targets) == 1 and _is_none_sequence(_assigned_value(statement)):
                self.none_sequences.add(targets[0])
            else:
                self.none_sequences -= set(targets)
            return [statement]
        return [statement]

    def _decide_conditional_expressions(self, statement: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        """`a if flag else b` whose flag the engine decides becomes the branch that runs
        (`current = key_value_states if is_cross_attention else hidden_states`).

        Only for a test that reads no removed name itself (a flag decided earlier, a constant
        attribute): an expression that tests a removed input directly (`m if mask is None else
        mask`) builds plumbing, and the statement goes as a whole, with what reads it."""
        pruner = self

        class _Decide(cst.CSTTransformer):
            def leave_IfExp(self, original: cst.IfExp, updated: cst.IfExp) -> cst.BaseExpression:
                if names_in(updated.test) & (pruner.dead | pruner.absent):
                    return updated
                value = pruner.evaluate(updated.test)
                if value is UNKNOWN:
                    return updated
                pruner._drop(
                    updated.test, f"condition is {'always' if value else 'never'} true in the engine"
                )
                return updated.body if value else updated.orelse

        return statement.visit(_Decide())

    def _substitute_constants(self, statement: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        """A decided flag read as a value (passed to a helper, `apply_rotary(q, k, cos, sin,
        use_flash)`) becomes its literal: the statement that assigned it is gone."""
        if not names_read(statement) & set(self.constants):
            return statement
        constants = self.constants

        class _Substitute(cst.CSTTransformer):
            def visit_Attribute(self, node: cst.Attribute) -> bool:
                return False  # `x.flag` names no local: only the object is visited, on leaving

            def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
                return updated.with_changes(value=original.value.visit(self))

            def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
                return updated.with_changes(keyword=original.keyword)

            def leave_AssignTarget(self, original: cst.AssignTarget, updated: cst.AssignTarget):
                return original

            def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
                if original.value in constants:
                    return cst.Name(str(constants[original.value]))
                return updated

        return statement.visit(_Substitute())

    def _if(self, statement: cst.If) -> list[cst.BaseStatement]:
        value = self.evaluate(statement.test)
        if value is True:
            self._drop(statement.test, "condition is always true in the engine")
            return self.block(list(statement.body.body))
        if value is False:
            self._drop(statement.test, "condition is never true in the engine")
            if statement.orelse is None:
                return []
            if isinstance(statement.orelse, cst.If):
                return self._if(statement.orelse)
            return self.block(list(statement.orelse.body.body))
        undecidable = bool(names_in(statement.test) & self.dead) and self.cascade
        if undecidable:
            targets = assigned_anywhere(statement)
            if targets is not None and not targets & self.live:
                # Undecidable, but it only builds fresh names from plumbing (mask mappings): all of it goes.
                self.dead |= targets
                self._drop(statement, "builds only removed plumbing")
                return []
        body = self.block(list(statement.body.body)) or [cst.SimpleStatementLine([cst.Pass()])]
        orelse = statement.orelse
        if self.cascade and orelse is None and _same_code(body, []) and only_queries(statement.test):
            # `if self.use_alibi: pass`; or, where the test reads removed plumbing, a guard whose
            # statements all read it too: a table grown past the length it was built for (`if
            # max_pos > self.weights.size(0): self.make_weights(max_pos, ...)`), which the engine
            # never needs, since max_model_len is capped at the model's maximum positions.
            self._drop(statement, "everything it guarded is gone")
            return []
        if undecidable:
            self.context.flag(
                "dead-code",
                self.where,
                f"cannot decide `if {_code(statement.test)}`, which reads removed plumbing",
            )
        if isinstance(orelse, cst.Else):
            else_body = self.block(list(orelse.body.body)) or [cst.SimpleStatementLine([cst.Pass()])]
            orelse = orelse.with_changes(body=orelse.body.with_changes(body=else_body))
            if self.cascade and _same_code(body, else_body):
                # the paths differed only in what the engine removed (an eager core, a mask)
                self._drop(statement.test, "both branches now do the same")
                return [s for s in body if _code(s.with_changes(leading_lines=[])).strip() != "pass"]
        elif isinstance(orelse, cst.If):
            rest = self._if(orelse)
            orelse = (
                rest[0]
                if len(rest) == 1 and isinstance(rest[0], cst.If)
                else (cst.Else(cst.IndentedBlock(rest)) if rest else None)
            )
        return [statement.with_changes(body=statement.body.with_changes(body=body), orelse=orelse)]

    def evaluate(self, node: cst.BaseExpression):
        """True/False where the engine decides the test, else UNKNOWN."""
        if isinstance(node, cst.Comparison) and len(node.comparisons) == 1:
            operator = node.comparisons[0].operator
            empty = empty_keywords_test(node, self.keywords)
            if empty is not None:
                return empty
            backend = eager_backend_choice(node)
            if backend is not None:
                return backend
            same = _same_device(node)
            if same is not None:
                return same
            compared = self._compare_number(node)
            if compared is not None:
                return compared
            if (
                isinstance(node.comparisons[0].comparator, cst.Name)
                and node.comparisons[0].comparator.value == "None"
            ):
                is_none = self._is_none(node.left)
                if is_none is UNKNOWN:
                    return UNKNOWN
                if isinstance(operator, cst.Is):
                    return is_none
                if isinstance(operator, cst.IsNot):
                    return not is_none
            return UNKNOWN
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Not):
            inner = self.evaluate(node.expression)
            return UNKNOWN if inner is UNKNOWN else not inner
        if isinstance(node, cst.BooleanOperation):
            left, right = self.evaluate(node.left), self.evaluate(node.right)
            if isinstance(node.operator, cst.And):
                if left is False or right is False:
                    return False
                return True if left is True and right is True else UNKNOWN
            if left is True or right is True:
                return True
            return False if left is False and right is False else UNKNOWN
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.BitXor):
            left, right = self.evaluate(node.left), self.evaluate(node.right)
            return UNKNOWN if UNKNOWN in (left, right) else left != right
        if isinstance(node, cst.Name) and node.value in self.absent | self.dead:
            return False
        if isinstance(node, cst.Call) and asks_availability(node):
            return False  # the port imports no optional library
        if m.matches(
            node, m.Call(func=m.Name("isinstance"), args=[m.Arg(keyword=None), m.Arg(keyword=None)])
        ):
            return self._none_isinstance(node)
        if dotted_name(node) in FALSE_ATTRIBUTES:
            return False
        attr = self_attribute(node)
        if attr in self.attributes and isinstance(self.attributes[attr], bool):
            return self.attributes[attr]
        if isinstance(node, cst.Name) and node.value in {"True", "False"}:
            return node.value == "True"
        if isinstance(node, cst.Name) and node.value in self.constants:
            return self.constants[node.value]
        flags = self.context.plan.module_flags
        if isinstance(node, cst.Name) and node.value in flags and node.value not in self.live:
            return flags[node.value]
        return UNKNOWN

    def _compare_number(self, node: cst.Comparison) -> bool | None:
        left, right = node.left, node.comparisons[0].comparator
        values = []
        for side in (left, right):
            if isinstance(side, cst.Integer):
                values.append(int(side.value, 0))
            elif isinstance(side, cst.Name) and side.value in self.numbers:
                values.append(self.numbers[side.value])
            else:
                return None
        if not any(isinstance(side, cst.Name) for side in (left, right)):
            return None
        compare = _ORDERINGS.get(type(node.comparisons[0].operator))
        return compare(*values) if compare else None

    def _none_isinstance(self, call: cst.Call):
        """`isinstance(x, (type(None), Cache, list))` of an input the engine leaves None: whether the
        types name NoneType (a legacy-cache check on a removed `past_key_values`)."""
        if self._is_none(call.args[0].value) is not True:
            return UNKNOWN
        types = call.args[1].value
        elements = [e.value for e in types.elements] if isinstance(types, cst.Tuple) else [types]
        names = [_code(e).replace(" ", "") for e in elements]
        if not all(
            isinstance(e, (cst.Name, cst.Attribute)) or n == "type(None)" for e, n in zip(elements, names)
        ):
            return UNKNOWN
        return any(n == "type(None)" or n.split(".")[-1] == "NoneType" for n in names)

    def _is_none(self, node: cst.BaseExpression):
        if m.matches(node, m.Subscript(value=m.Name())) and node.value.value in self.none_sequences:
            return True
        if isinstance(node, cst.Name):
            if node.value in self.absent or node.value in self.dead:
                return True
            if node.value in self.present:
                return False
        return UNKNOWN

    def _drop(self, node: cst.CSTNode, reason: str) -> None:
        self.context.record("dead-code", self.where, node, "", reason)


def integers_bound_once(function: cst.FunctionDef) -> dict[str, int]:
    """Names `function` binds exactly once (parameters count), that binding `name = <int literal>`."""
    counts: dict[str, int] = {}
    literal: dict[str, int] = {}

    def bind(target: cst.BaseExpression) -> None:
        if isinstance(target, cst.Name):
            counts[target.value] = counts.get(target.value, 0) + 1
        elif isinstance(target, (cst.Tuple, cst.List)):
            for element in target.elements:
                bind(element.value)
        elif isinstance(target, (cst.StarredElement, cst.Subscript, cst.Attribute)):
            bind(target.value)  # `x[i] = ...` changes what x holds; the index is only read

    class _Bindings(cst.CSTVisitor):
        def visit_Param(self, node: cst.Param) -> None:
            counts[node.name.value] = counts.get(node.name.value, 0) + 1

        def visit_Assign(self, node: cst.Assign) -> None:
            for target in node.targets:
                if isinstance(target.target, cst.Name) and isinstance(node.value, cst.Integer):
                    literal[target.target.value] = int(node.value.value, 0)
                bind(target.target)

        def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
            bind(node.target)

        def visit_AugAssign(self, node: cst.AugAssign) -> None:
            bind(node.target)

        def visit_For(self, node: cst.For) -> None:
            bind(node.target)

        def visit_AsName(self, node: cst.AsName) -> None:
            bind(node.name)

        def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
            bind(node.target)

        def visit_Global(self, node: cst.Global) -> None:
            for item in node.names:
                counts[item.name.value] = 2

        def visit_Nonlocal(self, node: cst.Nonlocal) -> None:
            for item in node.names:
                counts[item.name.value] = 2

    fast_visit(function, _Bindings())
    return {name: value for name, value in literal.items() if counts.get(name) == 1}


def _assigned_value(statement: cst.SimpleStatementLine) -> cst.BaseExpression | None:
    small = statement.body[0] if len(statement.body) == 1 else None
    return small.value if isinstance(small, cst.Assign) else None


NONE_LIST = m.List(elements=[m.Element(m.Name("None"))]) | m.Tuple(elements=[m.Element(m.Name("None"))])


def _is_none_sequence(value: cst.BaseExpression | None) -> bool:
    """`[None] * n`, `(None,) * n`, or either wrapped in `tuple(...)`/`list(...)`."""
    if m.matches(value, m.Call(func=m.Name("tuple") | m.Name("list"), args=[m.Arg()])):
        value = value.args[0].value
    return m.matches(value, m.BinaryOperation(left=NONE_LIST, operator=m.Multiply()))


def names_read(statement: cst.CSTNode) -> set[str]:
    """Names `statement` reads: a plain `x = ...` target is written, not read (`outputs = (h,) +
    outputs[1:]` reads `outputs` in its value only)."""
    if isinstance(statement, cst.SimpleStatementLine) and all(
        isinstance(s, cst.Assign) for s in statement.body
    ):
        read: set[str] = set()
        for small in statement.body:
            read |= names_in(small.value)
            read |= {
                n for t in small.targets if not isinstance(t.target, cst.Name) for n in names_in(t.target)
            }
        return read
    return names_in(statement)


def calls_submodule(statement: cst.CSTNode, pure: set[str] | frozenset[str] = frozenset()) -> bool:
    """Calls `self.<anything>` (a submodule, or a method that may run one), other than `pure` ones."""
    found = []

    class _Find(cst.CSTVisitor):
        def visit_Call(self, node: cst.Call) -> None:
            name = dotted_name(node.func) or ""
            if name.startswith("self.") and name not in pure:
                found.append(node)

    statement.visit(_Find())
    return bool(found)


def assigned_anywhere(statement: cst.If) -> set[str] | None:
    """Names every branch assigns, or None if a branch does anything but assign (calls, returns)."""
    names: set[str] = set()
    blocks = [statement.body.body]
    orelse = statement.orelse
    while orelse is not None:
        blocks.append(orelse.body.body)
        orelse = orelse.orelse if isinstance(orelse, cst.If) else None
    for block in blocks:
        for inner in block:
            if isinstance(inner, cst.If):
                nested = assigned_anywhere(inner)
                if nested is None:
                    return None
                names |= nested
                continue
            targets = statement_targets(inner)
            if not targets:
                return None
            names |= set(targets)
    if isinstance(statement.test, cst.UnaryOperation):
        names |= _walrus_targets(statement.test)
    return names | _walrus_targets(statement.test)


def _walrus_targets(node: cst.CSTNode) -> set[str]:
    found: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_NamedExpr(self, expr: cst.NamedExpr) -> None:
            if isinstance(expr.target, cst.Name):
                found.add(expr.target.value)

    node.visit(_Find())
    return found


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)
