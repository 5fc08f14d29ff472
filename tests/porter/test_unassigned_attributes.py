"""A port that reads `self.x` which no longer exists stops with a review item (it would fail when run)."""

from __future__ import annotations

import libcst as cst

from porter.analysis.unassigned_attributes import UnassignedRead, unassigned_attribute_reads

SOURCE = """
class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.rotary_emb = RotaryEmbedding(8)

    def forward(self, x):
        angles = self.rotary_emb(x.shape[0])
        return self.qkv(x) * angles
"""


def _reads(port: str, source: str = SOURCE) -> list[UnassignedRead]:
    return unassigned_attribute_reads(cst.parse_module(port), cst.parse_module(source))


def test_a_replaced_module_still_called_is_found():
    port = """
class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.qkv = QKVParallelLinear(8, 2, 4, 4)

    def forward(self, x, positions):
        angles = self.rotary_emb(x.shape[0])
        return self.qkv(x) * angles
"""
    assert _reads(port) == [UnassignedRead("Attention", "forward", "rotary_emb")]


def test_a_read_the_source_could_not_satisfy_either_is_the_sources_own():
    port = """
class Attention(nn.Module):
    def forward(self, x):
        return self.init_method(x)
"""
    assert _reads(port) == []


def test_assigned_registered_inherited_and_module_names_are_known():
    port = """
class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("rotary_emb", torch.ones(1))
        self.qkv, self.other = nn.Linear(8, 24), None


class Attention(Base):
    scale = 2

    def forward(self, x):
        if self.training:
            return self.rotary_emb * self.scale
        return self.qkv(x) + self.helper(x)

    def helper(self, x):
        return x
"""
    assert _reads(port) == []


def test_a_class_with_a_base_from_elsewhere_is_not_judged():
    port = """
class Attention(SomeLibraryLayer):
    def forward(self, x):
        return self.rotary_emb(x)
"""
    assert _reads(port) == []
