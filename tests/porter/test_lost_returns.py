"""A forward whose return went with the statements it read is a review item, never a silent None."""

from __future__ import annotations

import libcst as cst

from porter.analysis.lost_returns import forwards_without_return

SOURCE = """
class Head:
    def forward(self, x, logits_to_keep=0):
        outputs = self.model(x)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        return hidden_states


class Block:
    def forward(self, x):
        self.cache.append(x)
"""


def test_a_forward_that_lost_its_return_is_found():
    port = """
class Head:
    def forward(self, x):
        outputs = self.model(x)


class Block:
    def forward(self, x):
        pass
"""
    assert forwards_without_return(cst.parse_module(port), cst.parse_module(SOURCE)) == ["Head.forward"]


def test_a_forward_that_still_returns_or_never_did_is_fine():
    port = """
class Head:
    def forward(self, x):
        return self.model(x)


class Block:
    def forward(self, x):
        pass
"""
    assert forwards_without_return(cst.parse_module(port), cst.parse_module(SOURCE)) == []
