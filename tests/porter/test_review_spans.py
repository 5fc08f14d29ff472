"""Placing changes: line maps between stages, fragments found in code, rows for the side-by-side view."""

from __future__ import annotations

from porter.review.html import aligned_rows, highlight
from porter.review.spans import LineMap, Span, StageLines, find_fragment, lines_of, scope_span, scopes

SOURCE = ["a = 1", "b = 2", "c = 3", "d = 4"]


def test_kept_lines_map_exactly_both_ways():
    line_map = LineMap(SOURCE, ["a = 1", "c = 3", "d = 4"])  # b removed
    assert line_map.forward(Span(3, 4)) == Span(2, 3)
    assert line_map.backward(Span(2, 2)) == Span(3, 3)


def test_a_removed_line_maps_to_the_place_it_stood():
    line_map = LineMap(SOURCE, ["a = 1", "c = 3", "d = 4"])
    carried = line_map.forward(Span(2, 2))
    assert carried.empty and carried.start == 2  # before "c = 3"


def test_added_lines_map_back_to_a_place_and_rewritten_lines_one_for_one():
    line_map = LineMap(SOURCE, ["a = 1", "x = 0", "b = 2", "c = 30", "d = 4"])
    assert line_map.backward(Span(2, 2)).empty
    assert line_map.backward(Span(4, 4)) == Span(3, 3)  # c = 3 -> c = 30


def test_fragment_is_found_without_whitespace_inside_its_scope_first():
    lines = ["def f():", "    return g(1,", "             2)", "def h():", "    return g(1, 2)"]
    assert find_fragment(lines, "g(1, 2)", [Span(4, 5), None]) == Span(5, 5)
    assert find_fragment(lines, "return g(\n1, 2)", [None]) == Span(2, 3)
    assert find_fragment(lines, "g(1, 2)", [None], occurrence=1) == Span(5, 5)
    assert find_fragment(lines, "nothing(here)", [None]) is None
    assert find_fragment(lines, "", [None]) is None


def test_scopes_name_classes_methods_and_functions():
    text = "class A:\n    @staticmethod\n    def f():\n        pass\n\n\ndef g():\n    pass\n"
    table = scopes(text)
    assert scope_span(table, "A.f") == Span(2, 4)  # the decorator belongs to it
    assert scope_span(table, "A.gone") == Span(1, 4)  # a method no longer there: its class
    assert scope_span(table, "g") == Span(7, 8)
    assert scope_span(table, "module") is None


def test_lines_followed_through_every_stage():
    stages = StageLines(["\n".join(SOURCE), "a = 1\nc = 3\nd = 4", "header\na = 1\nc = 3\nd = 4"])
    assert stages.to_last(Span(3, 3), 0) == Span(3, 3)  # c: third line, then second, then third
    assert stages.to_first(Span(4, 4), 2) == Span(4, 4)
    assert stages.first_to_last_pairs() == [(0, 1), (2, 2), (3, 3)]


def test_rows_pair_kept_lines_and_pad_the_shorter_side():
    rows = aligned_rows([(0, 1), (3, 2)], source_count=4, port_count=3)
    assert rows == [(None, 0), (0, 1), (1, None), (2, None), (3, 2)]


def test_lines_are_numbered_as_editors_number_them():
    """A form feed (HF files have them between sections) is no line break for an editor, for
    Python's line numbers or for SARIF, though `str.splitlines` breaks there."""
    text = "x = 1\n\x0c\ny = 2\r\nz = 3\n"
    assert lines_of(text) == ["x = 1", "\x0c", "y = 2", "z = 3"]
    assert len(highlight(text)) == 4
