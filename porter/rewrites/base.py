"""What every rewrite shares: the record of changes for the review, and the port's shared plan."""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst

from porter.analysis.attention import AttentionInfo
from porter.analysis.cst_utils import code_of
from porter.analysis.model_index import ModelIndex, build_index
from porter.analysis.source import SourceFile


@dataclass(frozen=True, slots=True)
class Change:
    """One edit, explained: shown by `porter review` and counted in the port summary."""

    rule: str
    where: str  # "Class.method" or "module"
    before: str
    after: str
    reason: str
    # Index of the rewrite that made it in the pipeline: `before` is code of the module that rewrite
    # received (PortContext.stages[stage]), `after` of the one it returned (stages[stage + 1]).
    stage: int = 0


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A place the rewrite could not decide; it stops the port unless --allow-review."""

    rule: str
    where: str
    message: str


@dataclass(slots=True)
class Plan:
    """Decisions one rewrite makes and a later one needs."""

    # class -> its forward's new parameter list (after `self`)
    signatures: dict[str, list[str]] = field(default_factory=dict)
    # class -> parameters its forward lost (they read as None in the code that is left)
    dropped_params: dict[str, set[str]] = field(default_factory=dict)
    # class -> forward parameters carrying HF's KV cache, by role (porter.analysis.cache_inputs)
    cache_inputs: dict[str, set[str]] = field(default_factory=dict)
    alibi_inputs: dict[str, set[str]] = field(default_factory=dict)  # class -> inputs carrying ALiBi
    decided_unread: dict[str, set[str]] = field(
        default_factory=dict
    )  # inputs only a decided-away branch read
    alibi_builders: set[str] = field(default_factory=set)  # what builds the bias (`self.build_alibi`)
    # packed parameter module -> [(checkpoint module, shard id)] for load_weights
    fused: list[tuple[str, str, str | int]] = field(default_factory=list)
    # parameter name -> the parameter it is tied to
    tied: dict[str, str] = field(default_factory=dict)
    # checkpoint tensors the engine recomputes (regular expressions)
    ignored: list[str] = field(default_factory=list)
    engine_imports: set[tuple[str, str]] = field(default_factory=set)
    # attention class -> what analysis found in it (read before its core is replaced)
    attention: dict[str, AttentionInfo] = field(default_factory=dict)
    # (class, attribute) -> value fixed by a constructor default nobody passes
    constant_attributes: dict[tuple[str, str], bool | None] = field(default_factory=dict)
    # module-level name -> the literal bool every assignment of it binds (porter.analysis.module_flags)
    module_flags: dict[str, bool] = field(default_factory=dict)
    # (class, attribute) of single projections that hold q|k|v side by side
    concatenated_qkv: set[tuple[str, str]] = field(default_factory=set)
    # (class, attribute) -> [(layout, (if test, branch) or None)] of each split of that projection
    qkv_layouts: dict[tuple[str, str], list] = field(default_factory=dict)
    # (class, fused attr) -> (blocks, order) of a checkpoint laid out in model-parallel blocks
    qkv_blocks: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)


@dataclass(slots=True)
class PortContext:
    source: SourceFile
    index: ModelIndex
    plan: Plan = field(default_factory=Plan)
    changes: list[Change] = field(default_factory=list)
    review: list[ReviewItem] = field(default_factory=list)
    # The module as each rewrite received it, then the result: the review places every change in
    # the source and in the port by following the lines through these (trees are immutable, so
    # keeping them costs references, not copies).
    stages: list[cst.Module] = field(default_factory=list)

    def record(
        self, rule: str, where: str, before: cst.CSTNode | str, after: cst.CSTNode | str, reason: str
    ) -> None:
        before_code = before if isinstance(before, str) else code_of(before).strip()
        after_code = after if isinstance(after, str) else code_of(after).strip()
        stage = max(len(self.stages) - 1, 0)
        self.changes.append(Change(rule, where, before_code, after_code, reason, stage))

    def flag(self, rule: str, where: str, message: str) -> None:
        self.review.append(ReviewItem(rule, where, message))

    def need(self, module: str, name: str) -> None:
        """Asks the imports rewrite for `from module import name`."""
        self.plan.engine_imports.add((module, name))

    def reindex(self, module: cst.Module) -> None:
        """Indexes `module` again after a rewrite; a rewrite that returned its input unchanged
        (the same tree object) keeps the index it had."""
        if module is self.index.module:
            return
        self.index = build_index(module, causal_lm=self.index.causal_lm)


class Rewrite:
    """A rewrite: `apply` takes the module and returns the rewritten one, recording what it changed."""

    name: str = ""

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        raise NotImplementedError


class ClassScopedTransformer(cst.CSTTransformer):
    """Tracks the class and method being visited, for `where` in changes."""

    def __init__(self, context: PortContext) -> None:
        super().__init__()
        self.context = context
        self.class_stack: list[str] = []
        self.function_stack: list[str] = []

    @property
    def current_class(self) -> str | None:
        return self.class_stack[-1] if self.class_stack else None

    @property
    def current_function(self) -> str | None:
        return self.function_stack[-1] if self.function_stack else None

    @property
    def where(self) -> str:
        parts = [p for p in (self.current_class, self.current_function) if p]
        return ".".join(parts) or "module"

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.class_stack.append(node.name.value)
        return True

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.BaseStatement:
        self.class_stack.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.function_stack.append(node.name.value)
        return True

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        self.function_stack.pop()
        return updated
