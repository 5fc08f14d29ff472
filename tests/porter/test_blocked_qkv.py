"""blocked-qkv: a fused q|k|v kept in model-parallel blocks (CodeGen's four, each q|v|k) becomes one
split by this rank's sizes, with the layer told the blocks and their order."""

from __future__ import annotations

import textwrap

from porter.analysis.source import locate
from tests.porter.rewrite_helpers import init_value, method_code, normalize, run_through

CODEGEN = locate("codegen")


def _ported():
    return run_through(CODEGEN.text, "blocked-qkv", module=CODEGEN.module)


def test_the_blocks_and_their_split_become_one_split_of_this_ranks_q_k_v():
    after = _ported()
    forward = normalize(method_code(after.code, "CodeGenAttention", "forward"))
    body = forward[forward.index("    qkv = self.qkv_proj(") : forward.index("    value = value.permute")]
    assert normalize(textwrap.dedent(body)) == normalize(
        """
        qkv = self.qkv_proj(hidden_states)
        # TODO(enijkamp): factor out number of logical TPU-v4 cores or make forward pass agnostic
        mp_num = 4

        local_dim = self.head_dim * self.num_attention_heads // mp_num
        query, key, value = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        query = query.unflatten(-1, (-1, self.head_dim))
        key = key.unflatten(-1, (-1, self.head_dim))

        value = value.unflatten(-1, (-1, self.head_dim))
        """
    ), body
    assert after.context.plan.qkv_blocks == {("CodeGenAttention", "qkv_proj"): ("4", "qvk")}


def test_the_fused_layer_loads_the_blocks_in_their_order():
    after = run_through(CODEGEN.text, "fuse-qkv", module=CODEGEN.module)
    layer = init_value(after.code, "CodeGenAttention", "qkv_proj")
    assert 'checkpoint_layout="concatenated", checkpoint_blocks=4, checkpoint_order="qvk"' in (
        layer.replace("'", '"').replace("\n", " ").replace("  ", " ")
    ), layer


def test_blocks_cut_into_names_that_are_not_the_cores_q_k_v_are_a_review_item():
    renamed = CODEGEN.text.replace(
        "query, value, key = torch.split(qkv_split, local_dim, dim=-1)",
        "query, value, other = torch.split(qkv_split, local_dim, dim=-1)\n        key = other",
    )
    assert renamed != CODEGEN.text
    after = run_through(renamed, "blocked-qkv", module=CODEGEN.module)
    assert any(
        "qkv_proj holds q, k and v in 4 blocks, cut into query, value, other" in message
        for message in after.review_messages()
    ), after.review_messages()
