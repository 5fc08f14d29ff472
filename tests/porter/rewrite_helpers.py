"""Before/after helpers for porter's rewrites, in the style of LibCST's codemod tests.

A test takes the mini model below (a whole HF-style hierarchy, because roles are found from the
causal-LM class down), varies it with `vary`, runs one rewrite (or the few it depends on) with
`run_rewrites`, and compares one class or method of the result with `assert_code`. Both sides are
formatted with the formatter porter itself uses, so only the code matters, not its layout.
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from porter.analysis.model_index import ModelIndex, build_index
from porter.analysis.source import SourceFile
from porter.emit import format_code
from porter.pipeline import REWRITES
from porter.rewrites.base import PortContext

# Where the snippet pretends to live, so relative imports resolve as they would for a real model.
MINI_MODULE = "transformers.models.mini.modeling_mini"

# A Llama-shaped model in the style of current HF modeling files: GQA attention dispatching through
# `attention_interface`, a decoder layer, a backbone with a ModuleList, and a tied causal-LM head.
MINI_MODEL = """\
import torch
from torch import nn

from ...activations import ACT2FN
from ...generation import GenerationMixin
from ...modeling_layers import GradientCheckpointingLayer
from ...modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from ...utils import auto_docstring


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class MiniDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = MiniAttention(config, layer_idx)
        self.mlp = MiniMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class MiniPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    _no_split_modules = ["MiniDecoderLayer"]


class MiniModel(MiniPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MiniDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        causal_mask = build_causal_mask(attention_mask, inputs_embeds)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, attention_mask=causal_mask, past_key_values=past_key_values, **kwargs
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class MiniForCausalLM(MiniPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MiniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @auto_docstring
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, **kwargs):
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


def build_causal_mask(attention_mask, inputs_embeds):
    return attention_mask
"""

REWRITE_NAMES = [rewrite.name for rewrite in REWRITES]


@dataclass(slots=True)
class Rewritten:
    """The code after the rewrites ran (unformatted, as libcst printed it) and the port's context."""

    code: str
    context: PortContext

    @property
    def formatted(self) -> str:
        """The code as porter would write it (ruff-formatted), for substring checks."""
        return normalize(self.code)

    def changes(self, rule: str, where: str | None = None) -> list[str]:
        """`before -> after` of every change `rule` recorded (at `where`), for assertions on the review record."""
        return [
            f"{c.before} -> {c.after}"
            for c in self.context.changes
            if c.rule == rule and (where is None or c.where == where)
        ]

    def review_messages(self) -> list[str]:
        return [f"{item.rule} @ {item.where}: {item.message}" for item in self.context.review]


def vary(source: str, old: str, new: str, count: int = 1) -> str:
    """`source` with the `count` occurrences of `old` replaced, so a test fails loudly if the base drifts."""
    found = source.count(old)
    assert found == count, f"expected {count} of {old!r} in the snippet, found {found}"
    return source.replace(old, new)


def replace_method(source: str, class_name: str, method: str, new_code: str) -> str:
    """`source` with `class_name.method` replaced by `new_code` (a whole `def`, written at top level)."""
    replacement = cst.parse_statement(textwrap.dedent(new_code))
    found = []

    class _Replace(cst.CSTTransformer):
        def __init__(self) -> None:
            self.classes: list[str] = []

        def visit_ClassDef(self, node: cst.ClassDef) -> bool:
            self.classes.append(node.name.value)
            return True

        def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
            self.classes.pop()
            return updated

        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
            if self.classes == [class_name] and updated.name.value == method:
                found.append(method)
                return replacement
            return updated

    tree = _parse(source).visit(_Replace())
    assert found == [method], f"no single {class_name}.{method} in the snippet"
    return tree.code


def replace_class(source: str, class_name: str, new_code: str) -> str:
    """`source` with top-level class `class_name` replaced by `new_code`."""
    tree = _parse(source)
    body = [
        cst.parse_statement(textwrap.dedent(new_code))
        if isinstance(s, cst.ClassDef) and s.name.value == class_name
        else s
        for s in tree.body
    ]
    assert body != list(tree.body), f"no class {class_name} in the snippet"
    return tree.with_changes(body=body).code


def make_context(source: str, module: str | None = MINI_MODULE) -> tuple[cst.Module, PortContext]:
    """Parses `source` and builds the context a port of it starts with."""
    tree, index = _parse_and_index(source)
    name = module.rsplit(".", 1)[-1] + ".py" if module else "modeling_mini.py"
    source_file = SourceFile(Path(name), source, module, module or name, "mini")
    return tree, PortContext(source=source_file, index=index)


@functools.lru_cache(maxsize=64)
def _parse_and_index(source: str) -> tuple[cst.Module, ModelIndex]:
    # Rewrites read the index and replace it (reindex), never change it, so one source's can be shared.
    # A fresh parse of the text, as the pipeline does, never a tree a helper built.
    tree = cst.parse_module(source)
    return tree, build_index(tree)


def run_rewrites(source: str, *names: str, module: str | None = MINI_MODULE) -> Rewritten:
    """Runs the named rewrites on `source`, in pipeline order, reindexing between them as the pipeline does.

    Results are cached (libcst is slow and many tests share a run): treat the result as read-only.
    """
    unknown = [n for n in names if n not in REWRITE_NAMES]
    assert not unknown, f"no rewrites named {unknown}; the pipeline has {REWRITE_NAMES}"
    return _run_rewrites(source, frozenset(names), module)


@functools.lru_cache(maxsize=256)
def _run_rewrites(source: str, names: frozenset[str], module: str | None) -> Rewritten:
    tree, context = make_context(source, module)
    selected = [rewrite for rewrite in REWRITES if rewrite.name in names]
    for position, rewrite in enumerate(selected):
        tree = rewrite.apply(tree, context)
        if position < len(selected) - 1:  # the index after the last one is never read, and it is slow
            context.reindex(tree)
    code = tree.code
    _PARSED[code] = tree  # helpers that read the result need not parse it again
    return Rewritten(code, context)


def run_through(source: str, last: str, module: str | None = MINI_MODULE) -> Rewritten:
    """Runs the pipeline's prefix up to and including the rewrite named `last`."""
    assert last in REWRITE_NAMES, f"no rewrite named {last!r}"
    prefix = REWRITE_NAMES[: REWRITE_NAMES.index(last) + 1]
    return run_rewrites(source, *prefix, module=module)


@functools.lru_cache(maxsize=1024)
def normalize(code: str) -> str:
    """Code formatted the way porter formats its output (ruff), so layout never decides a comparison."""
    return format_code(textwrap.dedent(code).strip() + "\n")


_PARSED: dict[str, cst.Module] = {}


def _parse(code: str) -> cst.Module:
    # Nodes are immutable, so a parsed module can be shared by every helper that reads the same code.
    if code not in _PARSED:
        _PARSED[code] = cst.parse_module(code)
    return _PARSED[code]


def _code(node: cst.BaseStatement) -> str:
    return cst.Module(body=[node.with_changes(leading_lines=[])]).code


def _ellipsis_body() -> cst.IndentedBlock:
    return cst.IndentedBlock([cst.SimpleStatementLine([cst.Expr(cst.Ellipsis())])])


def _top_level(code: str, kind: type, name: str) -> cst.ClassDef | cst.FunctionDef:
    for statement in _parse(code).body:
        if isinstance(statement, kind) and statement.name.value == name:
            return statement
    raise AssertionError(f"no top-level {kind.__name__} {name} in:\n{code}")


def _method(code: str, class_name: str, method: str) -> cst.FunctionDef:
    for statement in _top_level(code, cst.ClassDef, class_name).body.body:
        if isinstance(statement, cst.FunctionDef) and statement.name.value == method:
            return statement
    raise AssertionError(f"no method {class_name}.{method} in:\n{code}")


def class_code(code: str, class_name: str) -> str:
    """The source of top-level class `class_name` in `code` (an AssertionError if it is absent)."""
    return _code(_top_level(code, cst.ClassDef, class_name))


def function_code(code: str, name: str) -> str:
    """The source of top-level function `name` in `code`."""
    return _code(_top_level(code, cst.FunctionDef, name))


def method_code(code: str, class_name: str, method: str) -> str:
    """The source of `class_name.method` in `code`, dedented to top level."""
    return _code(_method(code, class_name, method))


def init_value(code: str, class_name: str, attribute: str) -> str:
    """The expression `class_name.__init__` assigns to `self.<attribute>` (the first such assignment)."""
    found: list[cst.BaseExpression] = []

    class _Find(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            target = node.targets[0].target
            if (
                isinstance(target, cst.Attribute)
                and isinstance(target.value, cst.Name)
                and target.value.value == "self"
                and target.attr.value == attribute
            ):
                found.append(node.value)

    _method(code, class_name, "__init__").visit(_Find())
    assert found, f"{class_name}.__init__ assigns no self.{attribute}"
    return cst.Module(body=[]).code_for_node(found[0])


def signature(code: str, class_name: str, method: str) -> str:
    """`def method(params): ...` of `class_name.method`, for comparing signatures alone."""
    return _code(_method(code, class_name, method).with_changes(decorators=[], body=_ellipsis_body()))


def class_header(code: str, class_name: str) -> str:
    """`class X(bases):` of a class, with its body cut down to `...`, for comparing bases and decorators."""
    return _code(_top_level(code, cst.ClassDef, class_name).with_changes(body=_ellipsis_body()))


def import_block(code: str) -> str:
    """The top-level import statements of `code`, in order."""
    imports = [
        s.with_changes(leading_lines=[])  # blank lines between import groups do not matter here
        for s in _parse(code).body
        if isinstance(s, cst.SimpleStatementLine) and isinstance(s.body[0], (cst.Import, cst.ImportFrom))
    ]
    return cst.Module(body=imports).code


def top_level_names(code: str) -> list[str]:
    """Names of the top-level classes and functions, in file order."""
    return [s.name.value for s in _parse(code).body if isinstance(s, (cst.ClassDef, cst.FunctionDef))]


def assert_code(actual: str, expected: str) -> None:
    """`actual` and `expected` are the same code once both are formatted."""
    actual_formatted, expected_formatted = normalize(actual), normalize(expected)
    assert actual_formatted == expected_formatted, (
        f"\n--- expected ---\n{expected_formatted}\n--- actual ---\n{actual_formatted}"
    )
