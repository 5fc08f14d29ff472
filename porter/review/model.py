"""One model of a port's review, rendered by the terminal, HTML, JSON and SARIF views.

`review_source` ports a source in memory and places every change in the source and in the port;
`review_port` does the same for a checked-in port, reading the source its header names, and says
when a fresh port of that source differs from the file (the source, porter or transformers moved).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import transformers

import porter
from porter.analysis.source import SourceFile, locate
from porter.emit import GENERATED_MARK, is_generated
from porter.errors import PorterError
from porter.pipeline import PortResult
from porter.review.spans import Span, StageLines, class_names, find_fragment, scope_span

REVIEW_NOTE = "# REVIEW "


@dataclass(frozen=True, slots=True)
class ReviewedChange:
    """A change with its place: `source` lines in the HF file, `port` lines in the generated file."""

    rule: str
    class_name: str | None
    method: str | None
    before: str
    after: str
    why: str
    source: Span | None
    port: Span | None

    @property
    def where(self) -> str:
        return ".".join(part for part in (self.class_name, self.method) if part) or "module"


@dataclass(frozen=True, slots=True)
class ReviewedItem:
    """A place porter could not decide; `port` is its `# REVIEW` note when the port carries one."""

    rule: str
    class_name: str | None
    method: str | None
    message: str
    source: Span | None
    port: Span | None

    @property
    def where(self) -> str:
        return ".".join(part for part in (self.class_name, self.method) if part) or "module"


@dataclass(slots=True)
class Review:
    source_name: str  # as the port's header names it
    source_path: Path
    port_name: str  # the checked-in file reviewed, or where `porter port` would write the port
    source_text: str
    port_text: str
    changes: list[ReviewedChange]
    items: list[ReviewedItem]
    # source line -> port line (0-based) of the lines the port kept: aligns the two side by side
    aligned: list[tuple[int, int]] = field(default_factory=list)
    stale: str | None = None  # why the checked-in port is not what porting its source gives now
    versions: dict[str, str] = field(default_factory=dict)

    def rule_counts(self) -> Counter[str]:
        return Counter(change.rule for change in self.changes)

    def class_counts(self) -> Counter[str]:
        return Counter(change.class_name or "module" for change in self.changes)


def review_source(source: SourceFile, port_name: str | None = None) -> Review:
    """Ports `source` in memory (review items allowed, so they are shown) and places each change."""
    from porter.port import default_output, generate

    text, result = generate(source, allow_review=True)
    if port_name is None:
        port_name = _display_path(default_output(source)) if source.model_type else "port.py"
    return _place(source, text, result, port_name)


def review_port(port_path: Path, source_argument: str | None = None) -> Review:
    """Reviews a checked-in port against the source its header names (or `source_argument`)."""
    if not is_generated(port_path):
        raise PorterError(f"{port_path} is not a port: its first line lacks '{GENERATED_MARK}'")
    checked_in = port_path.read_text()
    source = locate(source_argument) if source_argument else _header_source(port_path, checked_in)
    review = review_source(source, _display_path(port_path))
    if review.port_text != checked_in:
        review.stale = _staleness(port_path, checked_in, review.port_text)
    return review


def is_port_file(argument: str) -> bool:
    path = Path(argument)
    return path.suffix == ".py" and path.is_file() and is_generated(path)


def _header_source(port_path: Path, text: str) -> SourceFile:
    lines = text.splitlines()
    named = lines[1].removeprefix("# source: ").strip() if len(lines) > 1 else ""
    if not lines[1:2] or not lines[1].startswith("# source: ") or not named:
        raise PorterError(f"{port_path} has no '# source:' line in its header; pass --source")
    try:  # finding a submodule imports its packages: one missing means the module is gone
        spec = importlib.util.find_spec(named) if named.startswith("transformers.") else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise PorterError(
            f"{port_path} was ported from {named}, which is not a module of the installed "
            "transformers; pass --source PATH"
        )
    return locate(spec.origin)


def _staleness(port_path: Path, checked_in: str, fresh: str) -> str:
    old_lines, new_lines = checked_in.splitlines(), fresh.splitlines()
    versions_line = 2  # "# transformers X, porter Y"
    if len(old_lines) > versions_line and old_lines[versions_line + 1 :] == new_lines[versions_line + 1 :]:
        return (
            f"{port_path} names other versions ({old_lines[versions_line].removeprefix('# ')}) than "
            f"installed ({new_lines[versions_line].removeprefix('# ')}); its code is what porting gives now"
        )
    differing = sum(1 for a, b in zip(old_lines, new_lines) if a != b) + abs(len(old_lines) - len(new_lines))
    return (
        f"{port_path} is stale: porting its source now gives a different file (lines differing: "
        f"{differing}): the source, porter or transformers changed since it was generated, or the file "
        "was edited; this review shows the fresh port, and `porter port` rewrites the file"
    )


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _place(source: SourceFile, port_text: str, result: PortResult, port_name: str) -> Review:
    stages = result.context.stages
    # The stages' code, then the formatted file: the last map carries lines through the header,
    # the review notes and formatting.
    stage_lines = StageLines([source.text, *(stage.code for stage in stages[1:]), port_text])
    classes = class_names(source.text) | class_names(port_text)
    port_stage = stage_lines.last
    seen: Counter[tuple[int, str, str]] = Counter()
    changes = []
    for change in result.changes:
        if not stages:
            source_span = port_span = None
        else:
            source_span, port_span = _locate(
                stage_lines, change.stage, change.where, change.before, change.after, seen
            )
        class_name, method = _split_where(change.where, classes)
        changes.append(
            ReviewedChange(
                change.rule,
                class_name,
                method,
                change.before,
                change.after,
                change.reason,
                source_span,
                port_span,
            )
        )
    source_scopes, port_scopes = stage_lines.scopes(0), stage_lines.scopes(port_stage)
    notes = [
        index + 1 for index, line in enumerate(stage_lines.lines[port_stage]) if line.startswith(REVIEW_NOTE)
    ]
    items = []
    for position, item in enumerate(result.review):
        class_name, method = _split_where(item.where, classes)
        note = Span(notes[position], notes[position]) if position < len(notes) else None
        items.append(
            ReviewedItem(
                item.rule,
                class_name,
                method,
                item.message,
                scope_span(source_scopes, item.where),
                note or scope_span(port_scopes, item.where),
            )
        )
    return Review(
        source_name=source.display_name,
        source_path=source.path,
        port_name=port_name,
        source_text=source.text,
        port_text=port_text,
        changes=changes,
        items=items,
        aligned=stage_lines.first_to_last_pairs(),
        versions={"porter": porter.__version__, "transformers": transformers.__version__},
    )


def _locate(
    stage_lines: StageLines,
    stage: int,
    where: str,
    before: str,
    after: str,
    seen: Counter[tuple[int, str, str]],
) -> tuple[Span | None, Span | None]:
    """(source span, port span) of one change made by the rewrite at `stage`."""
    # Identical fragments in one place (two `.view(bsz, ...)` in a method) are recorded in the order
    # the rewrite visits them, which is the order they appear.
    occurrence = seen[(stage, where, before)]
    seen[(stage, where, before)] += 1
    step = stage_lines.maps[stage]
    within_before = scope_span(stage_lines.scopes(stage), where)
    within_after = scope_span(stage_lines.scopes(stage + 1), where)
    old = find_fragment(stage_lines.lines[stage], before, [within_before, None], occurrence)
    if old is not None:
        # `after` is looked for where the diff carries `before`: short replacements (`hidden_states`
        # for a dropout call) appear all over the method.
        carried = step.forward(old)
        near = Span(max(carried.start - 2, 1), carried.end + 2)
        new = find_fragment(stage_lines.lines[stage + 1], after, [near]) or carried
    else:
        new = find_fragment(stage_lines.lines[stage + 1], after, [within_after, None], occurrence)
        if new is not None:
            carried = step.backward(new)
            # Added code: the source span is the place after the lines it replaced or joined.
            old = carried if before else Span(carried.end + 1, carried.end)
    if old is None or new is None:  # neither fragment is in the code: the place it names
        old, new = within_before, within_after
    source_span = stage_lines.to_first(old, stage) if old else None
    port_span = stage_lines.to_last(new, stage + 1) if new else None
    return source_span, port_span


def _split_where(where: str, classes: set[str]) -> tuple[str | None, str | None]:
    """`Class.method` -> (Class, method); a module-level function -> (None, function)."""
    if where == "module":
        return None, None
    head, _, rest = where.partition(".")
    if head in classes:
        return head, rest or None
    return None, where
