"""Splits the causal LM's forward at its vocabulary projection, and makes the head tensor-parallel.

`forward` keeps what runs before the head and returns the hidden states the head was given
(without HF's `logits_to_keep` slicing: the engine picks each sequence's last token itself).
`compute_logits(hidden_states, input_metadata)` gets the projection, through a `LogitsProcessor`
that gathers the vocabulary shards and cuts the padding off, followed by whatever the source did
to the logits afterwards (scaling, soft-capping) and nothing that needs labels. The head's
`nn.Linear(hidden, vocab)` becomes `ParallelLMHead(vocab, hidden)`, tied to the input embedding
when the config ties them. A head module of the file (porter.analysis.vocab_heads) becomes the same
layer, told to normalise its rows once at load time where the module normalised them in forward;
a head held by a submodule (`self.transformer.output_layer`) is replaced where it is built and
called by its path.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    code_of,
    names_in,
    self_attribute,
    self_attribute_path,
    statement_targets,
)
from porter.analysis.model_index import ModelIndex, vocab_projection
from porter.analysis.projections import linear_bias
from porter.analysis.signatures import PLUMBING
from porter.analysis.vocab_heads import bound_argument
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

LAYERS = "engine.layers"


class SplitLMHead(Rewrite):
    name = "lm-head"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        index = context.index
        embedding = _vocab_embedding_path(index)
        return module.visit(_Transformer(context, index.head_path, index.head_owner(), embedding))


def _vocab_embedding_path(index: ModelIndex) -> list[str] | None:
    """`["model", "decoder", "embed_tokens"]`: where the input embedding lives, seen from the head class."""

    embeddings = index.embedding_classes()  # a scaled word embedding subclasses nn.Embedding

    def search(name: str, trail: list[str], seen: set[str]) -> list[str] | None:
        if name in seen:
            return None
        seen.add(name)
        info = index.classes[name]
        for attr, call in info.init_calls.items():
            if call_name(call) in embeddings and call.args and "vocab" in code_of(call.args[0].value):
                return [*trail, attr]
        for attr, child in info.submodules.items():
            if attr not in info.module_lists:
                found = search(child, [*trail, attr], seen)
                if found:
                    return found
        return None

    return search(index.causal_lm, [], set())


class _Transformer(ClassScopedTransformer):
    def __init__(
        self, context: PortContext, head_path: list[str], owner: str, embedding: list[str] | None
    ) -> None:
        super().__init__(context)
        self.head_path, self.owner, self.embedding = head_path, owner, embedding
        self.head = ".".join(head_path)

    @property
    def in_head_class(self) -> bool:
        return self.current_class == self.context.index.causal_lm

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        if not (self.current_class == self.owner and self.current_function == "__init__"):
            return updated
        classes = self.context.index.classes
        if self_attribute(updated.targets[0].target) != self.head_path[-1] or not vocab_projection(
            updated.value, classes
        ):
            return updated
        call = updated.value
        built = classes.get(call_name(call) or "")
        if built is not None and built.head_module is not None:
            init, head = built.methods["__init__"], built.head_module
            hidden = bound_argument(call, init, head.in_param)
            vocab = bound_argument(call, init, head.out_param)
            extra = ", normalize_rows=True" if head.normalize_rows else ""
            reason = (
                "vocabulary-parallel head; the module's row normalisation done once at load time"
                if head.normalize_rows
                else "vocabulary-parallel head (vocab padded to a multiple of 64*tp)"
            )
        else:
            hidden, vocab = call.args[0].value, call.args[1].value
            extra = f", bias={code_of(linear_bias(call))}"
            reason = "vocabulary-parallel head (vocab padded to a multiple of 64*tp)"
        new = cst.parse_expression(f"ParallelLMHead({code_of(vocab)}, {code_of(hidden)}{extra})")
        self.context.need(LAYERS, "ParallelLMHead")
        self.context.record("lm-head", self.where, call, new, reason)
        self.vocab_code = code_of(vocab)
        return updated.with_changes(value=new)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if not (self.in_head_class and len(self.function_stack) == 1):
            return super().leave_FunctionDef(original, updated)
        if updated.name.value == "__init__":
            updated = self._finish_init(updated)
        elif updated.name.value == "forward":
            forward, compute_logits = self._split_forward(updated)
            super().leave_FunctionDef(original, updated)
            return cst.FlattenSentinel([forward, compute_logits])
        return super().leave_FunctionDef(original, updated)

    def _finish_init(self, init: cst.FunctionDef) -> cst.FunctionDef:
        config = init.params.params[1].name.value
        added: list[cst.BaseStatement] = []
        tied_key = f"{self.head}.weight"
        if self.embedding is not None and tied_key in self.context.plan.tied:
            target = ".".join(self.embedding)
            added.append(
                cst.parse_statement(
                    f"if getattr({config}, 'tie_word_embeddings', True):\n    self.{self.head}.tie_to(self.{target})\n"
                )
            )
            self.context.plan.tied = {tied_key: f"{target}.weight"}
        vocab = getattr(self, "vocab_code", f"{config}.vocab_size")
        added.append(cst.parse_statement(f"self.logits_processor = LogitsProcessor({vocab})"))
        self.context.need(LAYERS, "LogitsProcessor")
        for statement in added:
            self.context.record(
                "lm-head",
                self.where,
                "",
                statement,
                "tie the head to the embedding; gather logits across ranks",
            )
        return init.with_changes(body=init.body.with_changes(body=[*init.body.body, *added]))

    def _split_forward(self, forward: cst.FunctionDef) -> tuple[cst.FunctionDef, cst.FunctionDef]:
        body = list(forward.body.body)
        position = next(
            (
                i
                for i, s in enumerate(body)
                if any(self_attribute_path(c.func) == self.head_path for c in calls_in(s))
            ),
            None,
        )
        if position is None:
            self.context.flag("lm-head", self.where, f"forward never calls self.{self.head}")
            return forward, cst.parse_statement(
                "def compute_logits(self, hidden_states, input_metadata):\n    return None\n"
            )
        replacer = _ReplaceHeadCall(self.head_path)
        head_statement = body[position].visit(replacer)
        # forward returns what the head was given; compute_logits takes it under a plain name.
        returned = replacer.hidden or "hidden_states"
        hidden = returned if returned.isidentifier() else "hidden_states"
        head_statement = (
            head_statement.visit(_Rename(returned, hidden)) if hidden != returned else head_statement
        )
        before = self._unslice(body[:position], returned)
        body, position = [*before, *body[position:]], len(before)
        logits_names = set(statement_targets(body[position]))
        kept_after = [
            s
            for s in body[position + 1 :]
            if _only_touches(s, logits_names) and not names_in(s) & (PLUMBING | {"loss"})
        ]
        returns = cst.parse_statement(f"return {', '.join(sorted(logits_names)) or 'logits'}")
        compute = cst.parse_statement(
            f"def compute_logits(self, {hidden}, input_metadata):\n    pass\n"
        ).with_changes(body=cst.IndentedBlock([head_statement, *kept_after, returns]))
        new_forward = forward.with_changes(
            body=forward.body.with_changes(body=[*body[:position], cst.parse_statement(f"return {returned}")])
        )
        self.context.record(
            "lm-head",
            self.where,
            body[position],
            head_statement,
            "logits of each sequence's last token, computed apart from forward",
        )
        return new_forward, compute

    def _unslice(self, before: list[cst.BaseStatement], hidden: str) -> list[cst.BaseStatement]:
        """HF's `logits_to_keep` slicing done by a helper (`hidden = slice_logits_to_keep(x,
        logits_to_keep)`, transformers 5.25): the last statement assigning the head's input from a
        call of the hidden states and HF plumbing inputs becomes `hidden = x` (or goes, where x is
        `hidden` itself): the engine picks each sequence's last token itself."""
        for position in reversed(range(len(before))):
            statement = before[position]
            if hidden not in statement_targets(statement):
                continue
            small = statement.body[0]
            value = small.value if isinstance(small, cst.Assign) and len(statement.body) == 1 else None
            if not (isinstance(value, cst.Call) and len(value.args) >= 2 and value.args[0].keyword is None):
                return before
            data, rest = value.args[0].value, value.args[1:]
            if names_in(data) & PLUMBING or not all(names_in(a.value) <= PLUMBING for a in rest):
                return before
            kept = [s for p, s in enumerate(before) if p != position]
            if code_of(data) != hidden:  # printed text: is the data the head's input itself?
                kept.insert(position, statement.with_changes(body=[small.with_changes(value=data)]))
            self.context.record(
                "lm-head",
                self.where,
                statement,
                kept[position] if len(kept) == len(before) else "",
                "logits_to_keep slicing: the engine picks each sequence's last token itself",
            )
            return kept
        return before


class _ReplaceHeadCall(cst.CSTTransformer):
    """`self.head(hidden[:, slice_indices, :])` -> `self.logits_processor(self.head, hidden,
    input_metadata)`. A prediction head between the hidden states and the vocabulary projection
    (`self.decoder(self.lm_head(hidden[...]))`, BERT-style) runs on each sequence's last token only:
    `self.logits_processor(self.decoder, self.lm_head(hidden[input_metadata.logits_indices]), None)`."""

    def __init__(self, head_path: list[str]) -> None:
        self.head_path, self.head, self.hidden = head_path, ".".join(head_path), None

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if self_attribute_path(updated.func) != self.head_path or not updated.args:
            return updated
        argument = updated.args[0].value
        inner = None
        if (
            isinstance(argument, cst.Call)
            and self_attribute(argument.func) is not None
            and len(argument.args) == 1
        ):
            inner, argument = code_of(argument.func), argument.args[0].value
        if isinstance(argument, cst.Subscript):
            argument = argument.value  # HF's logits_to_keep slice
        self.hidden = code_of(argument)
        if inner is not None:
            return cst.parse_expression(
                f"self.logits_processor(self.{self.head}, "
                f"{inner}({self.hidden}[input_metadata.logits_indices]), None)"
            )
        return cst.parse_expression(f"self.logits_processor(self.{self.head}, {self.hidden}, input_metadata)")


class _Rename(cst.CSTTransformer):
    """Replaces the head's argument expression inside the processor call by the parameter name."""

    def __init__(self, expression: str, name: str) -> None:
        self.expression, self.name = expression, name

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        if code_of(updated.value) == self.expression:
            return updated.with_changes(value=cst.Name(self.name))
        return updated


def _only_touches(statement: cst.BaseStatement, names: set[str]) -> bool:
    """A statement (or an `if` of them) that only reassigns the logits."""
    if isinstance(statement, cst.If):
        return all(_only_touches(s, names) for s in statement.body.body)
    targets = statement_targets(statement)
    return bool(targets) and set(targets) <= names
