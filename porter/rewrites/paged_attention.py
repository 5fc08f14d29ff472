"""Swaps each attention class's attention core for one `PagedAttention` call.

The core is HF's attention-interface dispatch (or its eager fallback, or an old-style
`self._attn(...)`): it is replaced by `self.attn(query, key, value, kv_cache, input_metadata)`,
which writes the new keys and values into the paged cache and attends over each sequence's
cached context. The dispatch lookup goes with it. `__init__` gains the `PagedAttention` module,
built from what the source passed the core: the scale (`scaling=`), a sliding window, a logit
soft-cap; head counts come from the projections' sizes, so GQA and MQA need nothing special.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.alibi import Slopes, derive_slopes
from porter.analysis.attention import AttentionInfo, analyse_attention, hand_repetitions, repeats_heads
from porter.analysis.cst_utils import call_name, code_of, names_in, self_attribute, statement_targets
from porter.analysis.inline_attention import relayout_source
from porter.analysis.mask_windows import extra_window_keys, widened
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

CORE_KEYWORDS = {"scaling": "scale", "sliding_window": "sliding_window", "softcap": "logits_soft_cap"}


class SwapPagedAttention(Rewrite):
    name = "paged-attention"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        for name in sorted(context.index.attention):
            if _ported_latent_attention(context.index.classes[name]):
                continue
            info = analyse_attention(context.index, name)
            if info is None:
                context.flag(
                    "paged-attention",
                    name,
                    "could not trace q/k/v projections and head size into the attention core",
                )
                continue
            context.plan.attention[name] = info
        for name, info in context.plan.attention.items():
            if info.alibi_problem is not None:
                context.flag("paged-attention", name, f"ALiBi bias in the attention mask: {info.alibi_problem}")
        slopes = None
        if any(info.alibi for info in context.plan.attention.values()):
            slopes = derive_slopes(context.index)
            if not isinstance(slopes, Slopes):
                # Never a formula of porter's own: slopes in another order than the builder's would run
                # and quietly differ from HF.
                reason = slopes or "no function of the file builds the ALiBi bias the attention adds"
                for name, info in context.plan.attention.items():
                    if info.alibi:
                        context.flag("paged-attention", name, f"ALiBi slopes unknown: {reason}")
                slopes = None
            else:
                module = _with_function_after(module, slopes.code, slopes.after)
                context.record(
                    "paged-attention",
                    "module",
                    "",
                    slopes.code,
                    "the builder's head slopes, for PagedAttention",
                )
        return module.visit(_Transformer(context, slopes))


def _ported_latent_attention(info) -> bool:
    """A class the latent-attention rewrite gave a MultiLatentAttention: its core is already the engine's."""
    return any(call_name(call) == "MultiLatentAttention" for call in info.init_calls.values())


def _with_function_after(module: cst.Module, code: str, after: str) -> cst.Module:
    """`module` with the function `code` inserted after the top-level function named `after`."""
    body = list(module.body)
    position = next(i for i, s in enumerate(body) if isinstance(s, cst.FunctionDef) and s.name.value == after)
    new = cst.parse_statement(code).with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()])
    return module.with_changes(body=[*body[: position + 1], new, *body[position + 1 :]])


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, slopes: Slopes | None) -> None:
        super().__init__(context)
        self.slopes = slopes  # the function giving the ALiBi head slopes, written into the port

    @property
    def info(self) -> AttentionInfo | None:
        return self.context.plan.attention.get(self.current_class or "")

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        info = self.info
        if info is None or self.current_function != "forward" or info.inline_region is not None:
            return updated
        if "attention_interface" in statement_targets(updated):
            self.context.record(
                "paged-attention",
                self.where,
                updated,
                "",
                "attention backend lookup replaced by PagedAttention",
            )
            return cst.RemovalSentinel.REMOVE
        if any(original.deep_equals(repeat) for repeat in info.kv_repeats):
            self.context.record(
                "paged-attention",
                self.where,
                updated,
                "",
                "PagedAttention maps query heads to KV heads itself",
            )
            return cst.RemovalSentinel.REMOVE
        if any(original.deep_equals(merge) for merge in info.head_merges):
            self.context.record(
                "paged-attention", self.where, updated, "", "heads merged by the paged call's flatten"
            )
            return cst.RemovalSentinel.REMOVE
        if any(original.deep_equals(other) for other in info.other_cores):
            return self._paged_statement(info, updated)
        if original.deep_equals(info.core_statement):
            return self._paged_statement(info, updated)
        return updated

    def _swap_inline_core(self, forward: cst.FunctionDef, info: AttentionInfo) -> cst.FunctionDef:
        """Replaces the eager statements (reshapes, KV repetition, scores, mask, softmax, the product
        with V, a head merge) by one paged call on the q, k, v they started from."""
        body = self._swap_region(
            list(forward.body.body),
            info.inline_region,
            info.inline_relayouts,
            info.core_args,
            info.inline_output,
            info.merged_heads,
        )
        return forward.with_changes(body=forward.body.with_changes(body=body))

    def _swap_branch_cores(self, forward: cst.FunctionDef, info: AttentionInfo) -> cst.FunctionDef:
        """The same, in each branch of the `if` that holds one core per configuration; the q/k/v
        re-layouts before that `if` go too."""
        body = list(forward.body.body)
        branch_if = body[info.branch_if]
        cores = iter(info.branch_cores)
        pending = next(cores, None)

        def swap(block: cst.BaseSuite) -> cst.BaseSuite:
            nonlocal pending
            statements = list(block.body)
            if pending is None or not _same_statements(statements, pending[1]):
                return block
            core = pending[2]
            pending = next(cores, None)
            return block.with_changes(
                body=self._swap_region(
                    statements, core["region"], core["relayouts"], core["qkv"], core["output"], core["merged"]
                )
            )

        node: cst.If | cst.Else | None = branch_if
        chain = []
        while node is not None:
            chain.append(node.with_changes(body=swap(node.body)))
            node = node.orelse if isinstance(node, cst.If) else None
        for position in range(len(chain) - 2, -1, -1):  # rebuild the elif/else chain bottom-up
            chain[position] = chain[position].with_changes(orelse=chain[position + 1])
        body[info.branch_if] = chain[0]
        self._record_relayouts([body[i] for i in info.inline_relayouts])
        kept = self._without_relayouts(body, info.inline_relayouts)
        return forward.with_changes(body=forward.body.with_changes(body=kept))

    def _swap_region(self, body, region, relayout_positions, qkv, output, merged) -> list:
        start, end = region
        q, k, v = qkv
        # [T, H, D] or [T, H*D] (a fused projection's split) both merge to [T, H*D]
        merge = ".flatten(1)" if merged else ""
        call = cst.parse_statement(f"{output} = self.attn({q}, {k}, {v}, kv_cache, input_metadata){merge}")
        self._record_relayouts([body[i] for i in relayout_positions])
        removed = "\n".join(code_of(s).strip() for s in body[start : end + 1])
        self.context.record(
            "paged-attention",
            self.where,
            removed,
            call,
            "the eager attention written inline becomes paged attention",
        )
        kept_before = self._without_relayouts(body[:start], relayout_positions)
        return [*kept_before, call, *body[end + 1 :]]

    def _without_kv_repeats(self, statements: list, kv: set[str]) -> list:
        """`statements` without the KV-head repetitions of the paged call's k and v anywhere before
        it (`k = repeat(k, ...)` under `if groups > 1:`, ahead of the rotary step, not only right
        before the core); an `if` left with nothing to do goes with them."""
        kept = []
        by_hand = hand_repetitions(statements, kv)
        for position, statement in enumerate(statements):
            if position in by_hand:
                self.context.record(
                    "paged-attention",
                    self.where,
                    statement,
                    "",
                    "a step of a KV-head repetition; PagedAttention maps query heads to KV heads itself",
                )
                continue
            if isinstance(statement, cst.If) and statement.orelse is None:
                inner = self._without_kv_repeats(list(statement.body.body), kv)
                if not inner:
                    self.context.record(
                        "paged-attention", self.where, statement.test, "", "guarded only a KV-head repetition"
                    )
                    continue
                statement = statement.with_changes(body=statement.body.with_changes(body=inner))
            elif (
                isinstance(statement, cst.SimpleStatementLine)
                and len(statement.body) == 1
                and isinstance(statement.body[0], cst.Assign)
                and len(statement_targets(statement)) == 1
                and statement_targets(statement)[0] in kv
                and repeats_heads(statement.body[0].value, self.context.index)
                and code_of(statement.body[0].value.args[0].value) == statement_targets(statement)[0]
            ):
                self.context.record(
                    "paged-attention",
                    self.where,
                    statement,
                    "",
                    "PagedAttention maps query heads to KV heads itself",
                )
                continue
            kept.append(statement)
        return kept

    def _without_relayouts(self, statements: list, positions: list[int]) -> list:
        """`statements` without the relayouts at `positions`; one that also renamed its tensor
        (`key_states = self._shape(k, -1, bsz)`) leaves the rename (`key_states = k`)."""
        info = self.context.index.classes[self.current_class]
        kept = []
        for position, statement in enumerate(statements):
            if position not in positions:
                kept.append(statement)
                continue
            target, source = statement_targets(statement)[0], relayout_source(statement, info)
            if source != target:
                kept.append(
                    statement.with_changes(body=[cst.parse_statement(f"{target} = {source}").body[0]])
                )
        return kept

    def _record_relayouts(self, statements: list) -> None:
        for statement in statements:
            self.context.record(
                "paged-attention",
                self.where,
                statement,
                "",
                "paged attention and the rotary layer take per-token rows in any head layout",
            )

    def _paged_statement(self, info: AttentionInfo, updated: cst.SimpleStatementLine) -> cst.BaseStatement:
        positional = [a.value for a in info.core.args if a.keyword is None and not a.star]
        if positional and code_of(positional[0]) == "self":
            positional = positional[1:]
        q, k, v = (code_of(p) for p in positional[:3])
        targets = statement_targets(updated)
        # [T, H, D] or [T, H*D] both merge to [T, H*D]; a core module of the file merges the heads itself
        core_module = (
            self_attribute(info.core.func) in self.context.index.classes[self.current_class].submodules
        )
        merge = ".flatten(1)" if info.head_merges or core_module else ""
        new = cst.parse_statement(f"{targets[0]} = self.attn({q}, {k}, {v}, kv_cache, input_metadata){merge}")
        self.context.record("paged-attention", self.where, updated, new, "paged attention over the KV cache")
        return new

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement:
        """`if eager_variant: core_a else: core_b`, both now the same paged call, is just that call."""
        if (
            self.info is None
            or self.current_function != "forward"
            or not isinstance(updated.orelse, cst.Else)
        ):
            return updated
        body, orelse = updated.body.body, updated.orelse.body.body
        if (
            len(body) == len(orelse) == 1
            and body[0].deep_equals(orelse[0])
            and "self.attn(" in code_of(body[0])
        ):
            self.context.record(
                "paged-attention", self.where, updated.test, "", "one attention backend in the engine"
            )
            return body[0]
        return updated

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        """Drops the class's own helpers nothing calls any more (eager attention, head merges)."""
        if self.info is not None:
            changed = True
            while changed:
                changed = False
                code = code_of(updated)
                kept = []
                for statement in updated.body.body:
                    if (
                        isinstance(statement, cst.FunctionDef)
                        and statement.name.value not in ("__init__", "forward")
                        and not statement.name.value.startswith("__")
                        and f"self.{statement.name.value}" not in code
                    ):
                        self.context.record(
                            "paged-attention",
                            self.where,
                            f"def {statement.name.value}",
                            "",
                            "helper of the eager path, unused",
                        )
                        changed = True
                        continue
                    kept.append(statement)
                updated = updated.with_changes(body=updated.body.with_changes(body=kept))
        return super().leave_ClassDef(original, updated)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        info = self.info
        if (
            info is not None
            and info.inline_region is not None
            and updated.name.value == "forward"
            and len(self.function_stack) == 1
        ):
            if info.branch_if is not None:
                updated = self._swap_branch_cores(updated, info)
            else:
                updated = self._swap_inline_core(updated, info)
        if (
            info is not None
            and info.core_args
            and updated.name.value == "forward"
            and len(self.function_stack) == 1
        ):
            body = self._without_kv_repeats(
                list(updated.body.body), set(info.core_args[1:]) - {info.core_args[0]}
            )
            updated = updated.with_changes(body=updated.body.with_changes(body=body))
        if info is not None and updated.name.value == "__init__" and len(self.function_stack) == 1:
            arguments = [info.num_heads, info.head_dim]
            keywords = {
                CORE_KEYWORDS[a.keyword.value]: code_of(a.value)
                for a in (info.core.args if info.core is not None else [])
                if a.keyword is not None and a.keyword.value in CORE_KEYWORDS
            }
            if info.inline_scale is not None:
                keywords["scale"] = info.inline_scale
            if info.alibi and self.slopes is not None and info.alibi_problem is None:
                slopes = self.slopes.call(info.num_heads)
                if info.alibi_scale is not None:  # the scores' scale applied to the bias too
                    slopes = f"{slopes} * {info.alibi_scale}"
                if info.alibi_condition is not None:  # a bias only some configurations add
                    slopes = f"{slopes} if {info.alibi_condition} else None"
                keywords["alibi_slopes"] = slopes
            if keywords.get("scale") is None and info.callee_scale is not None:
                keywords["scale"] = info.callee_scale
            if keywords.get("scale") is None:
                keywords["scale"] = f"{info.head_dim} ** -0.5"
            for value in keywords.values():
                if names_in(cst.parse_expression(value)) - {
                    "self",
                    "config",
                    "math",
                    "torch",
                    "getattr",
                    "None",
                    *([self.slopes.name] if self.slopes is not None else []),
                }:
                    self.context.flag(
                        "paged-attention", self.where, f"attention argument `{value}` is computed in forward"
                    )
            if info.band_window is not None and "sliding_window" not in keywords:
                # (after the check: the window may read the constructor's own parameters)
                keywords["sliding_window"] = info.band_window
                if info.window_from_mask_helper:
                    keywords["sliding_window"] = widened(
                        info.band_window, extra_window_keys(self.context.source.path)
                    )
            if info.num_kv_heads != info.num_heads:
                keywords["num_kv_heads"] = info.num_kv_heads
            call = ", ".join([*arguments, *(f"{k}={v}" for k, v in keywords.items())])
            statement = cst.parse_statement(f"self.attn = PagedAttention({call})")
            self.context.need("engine.layers", "PagedAttention")
            self.context.record(
                "paged-attention", self.where, "", statement, "the paged attention module for this layer"
            )
            updated = updated.with_changes(
                body=updated.body.with_changes(body=[*updated.body.body, statement])
            )
        return super().leave_FunctionDef(original, updated)


def _same_statements(first: list, second: list) -> bool:
    return len(first) == len(second) and all(a.deep_equals(b) for a, b in zip(first, second))
