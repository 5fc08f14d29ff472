"""Constructs the engine cannot run yet, found before any rewrite so the port stops with the place.

Each check reads what the code does, never a model's name:
- mixture-of-experts routing: a forward that picks experts with a top-k over router scores, unless
  the experts are batched modules (`porter.analysis.experts`), which the fused-MoE rewrite ports;
- cross-attention the model always runs: a forward whose encoder states are a required input;
- recurrent / state-space layers: a convolution or scan state carried between steps (`conv_state`,
  `ssm_state`, `A_log`, a recurrent state);
- an attention core with learned state of its own: a function computing a softmax that reads a
  parameter of the module it is given, which the engine's paged attention would silently leave
  out, unless it is an attention sink (`porter.analysis.sinks`), which PagedAttention takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from porter.analysis.cst_utils import calls_softmax, code_of
from porter.analysis.experts import holds_stacked_weights as _holds_stacked_weights
from porter.analysis.experts import loops_with_index_add
from porter.analysis.sinks import sink_parameters

STATE_WORDS = ("conv_state", "conv1d_state", "ssm_state", "recurrent_state", "A_log", "selective_scan")
_PARAMETER = re.compile(r"self\.(\w+)\s*(?::[^=]+)?=\s*(?:torch\.)?(?:nn\.)?Parameter\(")


@dataclass(frozen=True, slots=True)
class UnsupportedConstruct:
    construct: str
    where: str  # "Class.method"
    line: int


def find_unsupported(module: cst.Module, reachable: set[str]) -> list[UnsupportedConstruct]:
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    parameters = {
        name
        for statement in module.body
        if isinstance(statement, cst.ClassDef) and statement.name.value in reachable
        for name in _PARAMETER.findall(code_of(statement))
    }
    finder = _Finder(reachable, parameters)
    # Routing beside batched experts modules is what the fused-MoE rewrite ports (or stops on).
    finder.batched_experts = any(
        loops_with_index_add(method)
        for statement in module.body
        if isinstance(statement, cst.ClassDef) and statement.name.value in reachable
        for method in statement.body.body
        if isinstance(method, cst.FunctionDef)
        and method.name.value == "forward"
        and _holds_stacked_weights(statement)
    )
    wrapper.visit(finder)
    return finder.found


class _Finder(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, reachable: set[str], parameters: set[str] = frozenset()) -> None:
        self.reachable = reachable
        self.parameters = parameters  # attributes the model's classes hold as nn.Parameter
        self.found: list[UnsupportedConstruct] = []
        self.batched_experts = False
        self.classes: list[str] = []
        self.seen: set[tuple[str, str]] = set()

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.classes.append(node.name.value)

    def leave_ClassDef(self, node: cst.ClassDef) -> None:
        self.classes.pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if not self.classes:
            self._check_core_function(node)
            return
        if self.classes[-1] not in self.reachable:
            return
        where = f"{self.classes[-1]}.{node.name.value}"
        code = code_of(node)
        if node.name.value == "forward":
            if "topk(" in code and ("router" in code or "expert" in code) and not self.batched_experts:
                self._add("mixture-of-experts routing", where, node)
            for param in node.params.params:
                if param.name.value == "encoder_hidden_states" and param.default is None:
                    self._add("cross-attention over encoder states", where, node)
        if any(word in code for word in STATE_WORDS):
            self._add("a recurrent or state-space layer (state carried across steps)", where, node)

    def _check_core_function(self, node: cst.FunctionDef) -> None:
        """A module-level attention core (`eager_attention_forward(module, query, ...)`) that reads a
        learned parameter of `module` besides computing the softmax."""
        params = node.params.params
        code = code_of(node)
        if not params or not calls_softmax(code):
            return
        owner = params[0].name.value
        # Sinks (a learned logit in each head's softmax denominator) are PagedAttention's `sinks=`.
        read = sorted(set(re.findall(rf"\b{owner}\.(\w+)", code)) & self.parameters - sink_parameters(node))
        if read:
            learned = ", ".join(f"`{owner}.{name}`" for name in read)
            self._add(f"an attention core with learned state of its own ({learned})", node.name.value, node)

    def _add(self, construct: str, where: str, node: cst.CSTNode) -> None:
        key = (construct, where.split(".")[0])
        if key in self.seen:
            return
        self.seen.add(key)
        line = self.get_metadata(PositionProvider, node).start.line
        self.found.append(UnsupportedConstruct(construct, where, line))
