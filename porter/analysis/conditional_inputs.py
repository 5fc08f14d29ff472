"""Inputs the engine drops whose presence a configuration flag decides.

A backbone may build an input for its layers only under a flag: `alibi = None; if self.use_alibi:
alibi = build_alibi_tensor(...)`, passed down as `alibi=alibi`. The engine drops the tensor (paged
attention applies the bias from its own slopes), but the layers' `if alibi is None:` still chooses
between two real paths (rotary or not, one attention core or another). Such a test is a test of
the flag, so it is kept as one: this finds {input: flag as `config.<name>`}.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, init_attribute_values, self_attribute, statement_targets
from porter.analysis.model_index import ModelIndex


def conditional_inputs(index: ModelIndex, dropped: set[str]) -> dict[str, str]:
    """{name: "config.<flag>"} for each dropped input some forward sets to None and then builds
    only under `if self.<flag attribute>:` (or `if self.config.<flag>:`)."""
    found: dict[str, str] = {}
    for name in index.reachable:
        info = index.classes[name]
        forward = info.methods.get("forward")
        if forward is None:
            continue
        attributes = init_attribute_values(info.methods.get("__init__"))
        body = list(forward.body.body)
        for position, statement in enumerate(body):
            target = _set_to_none(statement)
            if target is None or target not in dropped:
                continue
            for later in body[position + 1 :]:
                if isinstance(later, cst.If) and later.orelse is None and target in _assigned_in(later.body):
                    flag = _config_flag(later.test, attributes)
                    if flag is not None:
                        found[target] = flag
                    break
    return found


def _set_to_none(statement: cst.BaseStatement) -> str | None:
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
        targets = statement_targets(statement)
        value = statement.body[0].value
        if len(targets) == 1 and isinstance(value, cst.Name) and value.value == "None":
            return targets[0]
    return None


def _assigned_in(block: cst.BaseSuite) -> set[str]:
    names: set[str] = set()

    class _Targets(cst.CSTVisitor):
        def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
            names.update(statement_targets(node))

    block.visit(_Targets())
    return names


def _config_flag(test: cst.BaseExpression, attributes: dict[str, cst.BaseExpression]) -> str | None:
    """`config.x` for a test `self.a` (with `self.a = config.x` in __init__) or `self.config.x`."""
    attr = self_attribute(test)
    if attr is not None and attr in attributes:
        value = code_of(attributes[attr])
        return value if value.startswith("config.") and value.count(".") == 1 else None
    code = code_of(test)
    if code.startswith("self.config.") and code.count(".") == 2:
        return code.removeprefix("self.")
    return None
