"""Where a change is: its lines in the source and in the port.

A rewrite records a change as code (`before` from the module it received, `after` from the one it
returned) together with its place in the pipeline (`Change.stage`). The review finds each fragment
in that stage's code, inside the class and method the change names, and carries its lines back to
the source and forward to the formatted port through a line diff of each stage against the next.
Each rewrite changes little, so every diff is small, and lines no rewrite touched map exactly.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher


def lines_of(text: str) -> list[str]:
    """The lines of `text` as editors, Python and SARIF number them: split at newlines only (not at
    the form feeds and other separators `str.splitlines` also breaks at)."""
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@dataclass(frozen=True, slots=True)
class Span:
    """Lines `start`..`end` (1-based, inclusive). An empty span (`end == start - 1`) is the place
    before line `start`: where removed code stood, or where code was added."""

    start: int
    end: int

    @property
    def empty(self) -> bool:
        return self.end < self.start

    def lines(self) -> range:
        return range(self.start, self.end + 1)


@dataclass(frozen=True, slots=True)
class _Half:
    """A half-open range of 0-based line indexes; `low == high` is a point between lines."""

    low: int
    high: int

    def span(self) -> Span:
        return Span(self.low + 1, self.high)

    @staticmethod
    def of(span: Span) -> _Half:
        return _Half(span.start - 1, span.end)


class LineMap:
    """The lines of one text matched to the lines of the next (difflib's opcodes, no junk heuristic)."""

    def __init__(self, old_lines: Sequence[str], new_lines: Sequence[str]) -> None:
        matcher = SequenceMatcher(None, old_lines, new_lines, autojunk=False)
        self.opcodes = matcher.get_opcodes()
        self.old_length = len(old_lines)
        self.new_length = len(new_lines)

    def forward(self, span: Span) -> Span:
        return self._map(_Half.of(span), backward=False).span()

    def backward(self, span: Span) -> Span:
        return self._map(_Half.of(span), backward=True).span()

    def pairs(self) -> list[tuple[int, int]]:
        """(old index, new index) of every line kept as it was, or rewritten one for one."""
        found = []
        for tag, i1, i2, j1, j2 in self.opcodes:
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                found.extend(zip(range(i1, i2), range(j1, j2)))
        return found

    def _map(self, lines: _Half, backward: bool) -> _Half:
        length = self.new_length if backward else self.old_length
        target_length = self.old_length if backward else self.new_length
        if lines.low >= length:
            return _Half(target_length, target_length)
        covered: list[_Half] = []
        point: int | None = None
        for tag, i1, i2, j1, j2 in self.opcodes:
            if backward:
                i1, i2, j1, j2 = j1, j2, i1, i2
            if lines.low == lines.high:  # a point: where it falls
                if i1 <= lines.low < i2 or (i1 == i2 == lines.low):
                    offset = lines.low - i1 if tag == "equal" else 0
                    return _Half(j1 + offset, j1 + offset)
                continue
            if not (i1 < lines.high and lines.low < i2):
                continue
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                low, high = max(lines.low, i1), min(lines.high, i2)
                covered.append(_Half(j1 + low - i1, j1 + high - i1))
            elif j1 < j2:
                covered.append(_Half(j1, j2))
            elif point is None:
                point = j1
        if covered:
            return _Half(min(c.low for c in covered), max(c.high for c in covered))
        at = point if point is not None else target_length
        return _Half(at, at)


def scopes(text: str) -> dict[str, _Half]:
    """`Class`, `Class.method` and top-level function names -> their lines (decorators included)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return {}
    found: dict[str, _Half] = {}

    def extent(node: ast.AST) -> _Half:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        return _Half(first - 1, node.end_lineno or node.lineno)

    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            found[node.name] = extent(node)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    found[f"{node.name}.{item.name}"] = extent(item)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[node.name] = extent(node)
    return found


def class_names(text: str) -> set[str]:
    try:
        return {node.name for node in ast.parse(text).body if isinstance(node, ast.ClassDef)}
    except SyntaxError:
        return set()


def scope_span(scope_table: dict[str, _Half], where: str) -> Span | None:
    """The lines of `where` (`Class.method`, `Class`, a function), or of its class if the method is gone."""
    while where:
        if where in scope_table:
            return scope_table[where].span()
        where = where.rpartition(".")[0]
    return None


def find_fragment(
    lines: Sequence[str], fragment: str, regions: Sequence[Span | None], occurrence: int = 0
) -> Span | None:
    """The lines holding `fragment`, compared without whitespace (a rewrite prints a node with its own
    indentation), in the first of `regions` that has it (None: the whole text); the
    `occurrence`-th match when the same code appears several times (the last if there are fewer)."""
    needle = "".join(fragment.split())
    if not needle:
        return None
    for region in regions:
        bounds = _Half(0, len(lines)) if region is None else _Half.of(region)
        characters: list[str] = []
        line_of: list[int] = []
        for index in range(max(bounds.low, 0), min(bounds.high, len(lines))):
            squeezed = "".join(lines[index].split())
            characters.append(squeezed)
            line_of.extend([index] * len(squeezed))
        haystack = "".join(characters)
        starts = []
        at = haystack.find(needle)
        while at >= 0 and len(starts) <= occurrence:
            starts.append(at)
            at = haystack.find(needle, at + 1)
        if starts:
            start = starts[min(occurrence, len(starts) - 1)]
            return Span(line_of[start] + 1, line_of[start + len(needle) - 1] + 1)
    return None


class StageLines:
    """The code of every stage of a port, the line maps between neighbours, and each stage's scopes."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.lines = [lines_of(text) for text in texts]
        self.maps = [LineMap(a, b) for a, b in zip(self.lines, self.lines[1:])]
        self._texts = texts
        self._scopes: dict[int, dict[str, _Half]] = {}

    @property
    def last(self) -> int:
        return len(self.lines) - 1

    def scopes(self, stage: int) -> dict[str, _Half]:
        if stage not in self._scopes:
            self._scopes[stage] = scopes(self._texts[stage])
        return self._scopes[stage]

    def to_first(self, span: Span, stage: int) -> Span:
        for line_map in reversed(self.maps[:stage]):
            span = line_map.backward(span)
        return span

    def to_last(self, span: Span, stage: int) -> Span:
        for line_map in self.maps[stage:]:
            span = line_map.forward(span)
        return span

    def first_to_last_pairs(self) -> list[tuple[int, int]]:
        """(first-stage line, last-stage line) of the lines every stage kept or rewrote one for one:
        monotone, so they align the source and the port row by row."""
        current = {index: index for index in range(len(self.lines[0]))}
        for line_map in self.maps:
            step = dict(line_map.pairs())
            current = {first: step[now] for first, now in current.items() if now in step}
        return sorted(current.items())
