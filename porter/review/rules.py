"""The rules a review names: one per rewrite of the pipeline, plus the checks that stop a port."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

from porter.analysis import unsupported
from porter.verify import smoke


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    summary: str  # the first paragraph of its docstring, on one line
    help: str  # the whole docstring


def known_rules() -> dict[str, Rule]:
    """Every rule a change or review item may name, in pipeline order, with its documentation: the
    rewrite class's docstring, else its module's (several rewrites share a module and its text)."""
    from porter.pipeline import REWRITES

    rules = {}
    for rewrite in REWRITES:
        text = inspect.getdoc(type(rewrite)) if type(rewrite).__doc__ else None
        text = text or inspect.cleandoc(sys.modules[type(rewrite).__module__].__doc__ or rewrite.name)
        rules[rewrite.name] = Rule(rewrite.name, _first_paragraph(text), text)
    text = inspect.cleandoc(unsupported.__doc__ or "")
    rules["unsupported"] = Rule("unsupported", _first_paragraph(text), text)
    text = inspect.cleandoc(smoke.__doc__ or "")
    rules["check"] = Rule("check", _first_paragraph(text), text)
    return rules


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())
