"""rotary: a replaced rotary module's buffers that its checkpoints hold are skipped when loading."""

from __future__ import annotations

from tests.porter.rewrite_helpers import run_through, vary
from tests.porter.test_old_style_attention import LEGACY

PERSISTENT = vary(
    LEGACY,
    'self.register_buffer("inv_freq", inv_freq, persistent=False)',
    'self.register_buffer("inv_freq", inv_freq)',
)


def test_a_rotary_buffer_kept_in_the_state_dict_is_skipped_at_load():
    # Older releases and remote code saved `inv_freq` with the weights; the engine's rope makes its own.
    plan = run_through(PERSISTENT, "rotary").context.plan
    assert plan.ignored == [r"(^|\.)rotary_emb\.inv_freq$"]


def test_a_non_persistent_rotary_buffer_asks_for_nothing():
    assert run_through(LEGACY, "rotary").context.plan.ignored == []
