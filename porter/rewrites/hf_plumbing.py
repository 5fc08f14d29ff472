"""Strips the HF framework around the modules: base classes, decorators, init and API helpers.

- `PreTrainedModel`, `GradientCheckpointingLayer` and `GenerationMixin` bases become `nn.Module`
  (a class of this file that itself derives from `PreTrainedModel` counts too);
- `super().__init__(config)` of such a class becomes `super().__init__()` plus `self.config = config`;
- decorators imported from transformers' utilities (docstrings, output capture, kernel hub,
  deprecation) are dropped: they wrap the HF calling convention the port replaces;
- `self.post_init()` (weight init) and `self.gradient_checkpointing = ...` are dropped;
- a module-level registration of a class in a registry imported from transformers
  (`ALL_LAYERNORM_LAYERS.append(LlamaRMSNorm)`) is dropped;
- in remote code, a token id read from the config (`config.pad_token_id`) becomes `getattr(config,
  "pad_token_id", None)`: transformers 4's PretrainedConfig gave every config these ids (None by
  default), 5's does not, so a configuration class written for 4 that never sets one lacks it;
- HF API helpers (`get_input_embeddings`, `set_input_embeddings`, `get_output_embeddings`,
  `set_output_embeddings`, `_init_weights`, `tie_weights`) are dropped.
The `_tied_weights_keys` of the causal LM is read into the plan before its class attribute goes;
remote code that declares none ties the head its `get_output_embeddings` returns, as transformers 4 did.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cache_inputs import cache_inputs
from porter.analysis.cst_utils import call_name, code_of, dotted_name, self_attribute
from porter.analysis.signatures import PLUMBING
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.cache_names import rename_colliding_caches

FRAMEWORK_BASES = {"PreTrainedModel", "GradientCheckpointingLayer", "GenerationMixin", "PretrainedModel"}
HF_API_METHODS = {
    "get_input_embeddings",
    "set_input_embeddings",
    "get_output_embeddings",
    "set_output_embeddings",
    "_init_weights",
    "tie_weights",
    "get_decoder",
    "set_decoder",
    "prepare_inputs_for_generation",  # HF generate's hooks: the engine schedules its own steps
    "_reorder_cache",
    "_update_causal_mask",
    "_prepare_4d_causal_attention_mask_with_cache_position",
}
# Decorators worth keeping: they change what the function computes.
KEPT_DECORATORS = {"torch.no_grad", "staticmethod", "classmethod", "property"}


def framework_classes(context: PortContext) -> set[str]:
    """HF framework bases, plus this file's own `XPreTrainedModel`-like classes: ones that derive
    from a framework base and compute nothing (no `forward`, no `__init__`)."""
    found = set(FRAMEWORK_BASES)
    changed = True
    while changed:
        changed = False
        for info in context.index.classes.values():
            computes = "forward" in info.methods or "__init__" in info.methods
            if info.name not in found and not computes and any(b.split(".")[-1] in found for b in info.bases):
                found.add(info.name)
                changed = True
    return found


class StripHFPlumbing(Rewrite):
    name = "hf-plumbing"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        causal_lm = context.index.classes[context.index.causal_lm]
        for statement in causal_lm.node.body.body:
            _read_tied_keys(statement, context)
        if not context.plan.tied and context.source.remote_code:
            head = _output_embedding(causal_lm.methods.get("get_output_embeddings"))
            if head is not None:
                # transformers 4, which remote code was written for, ties the module
                # get_output_embeddings returns to the input embedding whenever the config's
                # tie_word_embeddings (true by default) says so, `_tied_weights_keys` or not.
                context.plan.tied[f"{head}.weight"] = ""
        # Read while the decorators that rename cache parameters are still there.
        context.plan.cache_inputs = cache_inputs(context.index, PLUMBING)
        module = module.visit(_Transformer(context, framework_classes(context), _framework_imports(module)))
        return rename_colliding_caches(module, context)


def _framework_imports(module: cst.Module) -> set[str]:
    """Names the file imports from transformers (absolutely, or relatively as a file of its tree)."""
    found = set()
    for statement in module.body:
        if not (
            isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.ImportFrom)
        ):
            continue
        node = statement.body[0]
        origin = dotted_name(node.module) if node.module is not None else ""
        if (node.relative or (origin or "").split(".")[0] == "transformers") and not isinstance(
            node.names, cst.ImportStar
        ):
            found |= {(a.evaluated_alias or a.evaluated_name) for a in node.names}
    return found


# Config fields transformers 4's PretrainedConfig set on every config, None unless given.
BASE_CONFIG_TOKEN_IDS = {"pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id"}

# Ways to add to a registry object.
REGISTERING_METHODS = {"append", "extend", "add", "update"}


def _output_embedding(method: cst.FunctionDef | None) -> str | None:
    """The attribute `get_output_embeddings` returns (`return self.lm_head`), if that is all it does."""
    if method is None or len(method.body.body) != 1:
        return None
    returned = m.findall(method, m.Return(value=m.Attribute(value=m.Name("self"))))
    return self_attribute(returned[0].value) if len(returned) == 1 else None


def _read_tied_keys(statement: cst.CSTNode, context: PortContext) -> None:
    if not isinstance(statement, cst.SimpleStatementLine):
        return
    for small in statement.body:
        if isinstance(small, cst.Assign) and dotted_name(small.targets[0].target) == "_tied_weights_keys":
            if isinstance(small.value, cst.Dict):
                for element in small.value.elements:
                    if isinstance(element.key, cst.SimpleString) and isinstance(
                        element.value, cst.SimpleString
                    ):
                        context.plan.tied[element.key.evaluated_value] = element.value.evaluated_value
            elif isinstance(small.value, (cst.List, cst.Tuple)):
                # Older files list the tied parameter only; its partner is the input embedding.
                for element in small.value.elements:
                    if isinstance(element.value, cst.SimpleString):
                        context.plan.tied[element.value.evaluated_value] = ""


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, framework: set[str], framework_imports: set[str]) -> None:
        super().__init__(context)
        self.framework = framework
        self.framework_imports = framework_imports
        self.framework_derived: list[bool] = []

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        super().visit_ClassDef(node)
        self.framework_derived.append(
            any((dotted_name(a.value) or "").split(".")[-1] in self.framework for a in node.bases)
        )
        return True

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        derived = self.framework_derived.pop()
        if updated.name.value in self.framework:
            self.context.record(
                "hf-plumbing",
                self.where,
                f"class {updated.name.value}",
                "",
                "HF pretrained-model base: init, hub and generation settings only",
            )
            super().leave_ClassDef(original, updated)
            return cst.RemovalSentinel.REMOVE
        kept = [a for a in updated.bases if (dotted_name(a.value) or "").split(".")[-1] not in self.framework]
        if derived and not any(dotted_name(a.value) in {"nn.Module", "torch.nn.Module"} for a in kept):
            kept = [cst.Arg(cst.parse_expression("nn.Module")), *kept]
        if [code_of(a) for a in kept] != [code_of(a) for a in updated.bases]:
            kept = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in kept]
            self.context.record(
                "hf-plumbing",
                self.where,
                ", ".join(code_of(a.value) for a in updated.bases),
                ", ".join(code_of(a.value) for a in kept),
                "HF framework bases replaced by nn.Module",
            )
            updated = updated.with_changes(bases=kept)
        body = [s for s in updated.body.body if not _is_framework_class_attribute(s)]
        updated = updated.with_changes(body=updated.body.with_changes(body=body), decorators=[])
        return super().leave_ClassDef(original, updated)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        decorators = [
            d for d in updated.decorators if dotted_name(_decorator_root(d.decorator)) in KEPT_DECORATORS
        ]
        if len(decorators) != len(updated.decorators):
            updated = updated.with_changes(decorators=decorators)
        if (
            self.current_class is not None
            and len(self.function_stack) == 1
            and updated.name.value in HF_API_METHODS
        ):
            self.context.record(
                "hf-plumbing", self.where, updated.name.value, "", "HF model API, not used by the engine"
            )
            super().leave_FunctionDef(original, updated)
            return cst.RemovalSentinel.REMOVE
        return super().leave_FunctionDef(original, updated)

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        if not self.class_stack and not self.function_stack and self._calls_framework_method(updated):
            self.context.record(
                "hf-plumbing",
                self.where,
                updated,
                "",
                "a classmethod of the stripped framework base (registration with the Auto classes)",
            )
            return cst.RemovalSentinel.REMOVE
        if not self.class_stack and not self.function_stack and self._registers_with_framework(updated):
            self.context.record(
                "hf-plumbing",
                self.where,
                updated,
                "",
                "adds a class to a registry of the framework's training utilities",
            )
            return cst.RemovalSentinel.REMOVE
        if self.current_function != "__init__" or len(updated.body) != 1:
            return updated
        small = updated.body[0]
        if isinstance(small, cst.Expr) and isinstance(small.value, cst.Call):
            if call_name(small.value) == "self.post_init":
                self.context.record(
                    "hf-plumbing", self.where, small, "", "weight init: the checkpoint sets every weight"
                )
                return cst.RemovalSentinel.REMOVE
            if call_name(small.value) == "super().__init__" or _is_super_init(small.value):
                if small.value.args and self.framework_derived and self.framework_derived[-1]:
                    new_call = small.value.with_changes(args=[])
                    config = code_of(small.value.args[0].value)
                    self.context.record(
                        "hf-plumbing",
                        self.where,
                        small,
                        f"super().__init__(); self.config = {config}",
                        "nn.Module takes no config; keep it as an attribute",
                    )
                    return cst.FlattenSentinel(
                        [
                            updated.with_changes(body=[small.with_changes(value=new_call)]),
                            cst.parse_statement(f"self.config = {config}"),
                        ]
                    )
        if (
            isinstance(small, cst.Assign)
            and self_attribute(small.targets[0].target) == "gradient_checkpointing"
        ):
            self.context.record(
                "hf-plumbing", self.where, small, "", "gradient checkpointing is training-only"
            )
            return cst.RemovalSentinel.REMOVE
        return updated

    def visit_AssignTarget(self, node: cst.AssignTarget) -> bool:
        return False  # a field written is no read of a default

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
        owner = dotted_name(updated.value) or ""
        if (
            not self.context.source.remote_code
            or updated.attr.value not in BASE_CONFIG_TOKEN_IDS
            or owner.split(".")[-1] != "config"
        ):
            return updated
        new = cst.parse_expression(f'getattr({owner}, "{updated.attr.value}", None)')
        self.context.record(
            "hf-plumbing", self.where, updated, new, "a token id transformers 5's config base does not set"
        )
        return new

    def _calls_framework_method(self, statement: cst.SimpleStatementLine) -> bool:
        """A module-level `SomeModel.method(...)` on a class of this file that derives from a
        framework base, where neither it nor a base of this file defines `method`: the framework
        base provided it (`register_for_auto_class`), and the port's class no longer has it."""
        classes = self.context.index.classes

        def defined_in_file(name: str, method: str) -> bool | None:
            """Whether `name` or a base of this file defines `method`; None if none of its bases
            is a framework one (it is not a stripped class)."""
            seen, stack, framework = set(), [name], False
            while stack:
                current = stack.pop()
                if current in seen or current not in classes:
                    continue
                seen.add(current)
                if method in classes[current].methods:
                    return True
                for base in classes[current].bases:
                    short = base.split(".")[-1]
                    framework = framework or short in self.framework
                    stack.append(short)
            return False if framework else None

        return all(
            m.matches(small, m.Expr(m.Call(func=m.Attribute(value=m.Name(), attr=m.Name()))))
            and defined_in_file(small.value.func.value.value, small.value.func.attr.value) is False
            for small in statement.body
        )

    def _registers_with_framework(self, statement: cst.SimpleStatementLine) -> bool:
        """A module-level `REGISTRY.append(SomeClass)` on an object imported from transformers (4.3x
        files list their norm classes in `ALL_LAYERNORM_LAYERS` to exempt them from weight decay)."""
        return all(
            m.matches(
                small,
                m.Expr(
                    m.Call(
                        func=m.Attribute(
                            value=m.Name(m.MatchIfTrue(lambda name: name in self.framework_imports)),
                            attr=m.Name(m.MatchIfTrue(lambda attr: attr in REGISTERING_METHODS)),
                        )
                    )
                ),
            )
            for small in statement.body
        )


def _is_super_init(call: cst.Call) -> bool:
    return (
        isinstance(call.func, cst.Attribute)
        and call.func.attr.value == "__init__"
        and isinstance(call.func.value, cst.Call)
        and dotted_name(call.func.value.func) == "super"
    )


def _decorator_root(node: cst.BaseExpression) -> cst.BaseExpression:
    return node.func if isinstance(node, cst.Call) else node


def _is_framework_class_attribute(statement: cst.BaseStatement) -> bool:
    """Class-level HF settings (`_no_split_modules`, `config_class`, `_supports_sdpa`, ...)."""
    if not isinstance(statement, cst.SimpleStatementLine):
        return False
    for small in statement.body:
        target = None
        if isinstance(small, cst.Assign):
            target = small.targets[0].target
        elif isinstance(small, cst.AnnAssign):
            target = small.target
        if isinstance(target, cst.Name) and (
            target.value.startswith("_")
            or target.value
            in {
                "config_class",
                "base_model_prefix",
                "config",
                "main_input_name",
                "supports_gradient_checkpointing",
                "input_modalities",
            }
        ):
            return True
    return False
