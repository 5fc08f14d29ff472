"""An index of a modeling file's classes: bases, methods, submodules, and the role each class plays.

Roles are read from what a class does, never from its name alone:
- the causal-LM head: the class whose forward calls a projection to `vocab_size` (a Linear, or a
  module of the file computing `F.linear(hidden, weight)` with a `[vocab, hidden]` weight; held by the
  class itself or by one of its submodules, `self.transformer.output_layer`) and returns logits;
- the decoder layer: the element class of a ModuleList held by a class the head reaches;
- a submodule built from a table of classes (`ATTENTION_CLASSES[config._attn_implementation](...)`)
  is the class the table's other entries derive from (one backend in the engine);
- the backbone: the class holding that ModuleList;
- attention: a reachable class whose forward calls an attention core (HF's attention-interface
  dispatch, or a function/method that takes a softmax over scores and a matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst

from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    calls_softmax,
    dotted_name,
    nodes_of,
    self_attribute,
    self_attribute_path,
)
from porter.analysis.module_factories import built_call, factory_locals, module_factories
from porter.analysis.vocab_heads import HeadModule, bound_argument, head_module, names_vocabulary
from porter.errors import PorterError

LINEAR_CALLS = {"nn.Linear", "torch.nn.Linear", "Linear", "Conv1D"}
EMBEDDING_CALLS = {"nn.Embedding", "torch.nn.Embedding", "Embedding"}
MODULE_LIST_CALLS = {"nn.ModuleList", "torch.nn.ModuleList", "ModuleList"}
# torch's fused attention: an attention core taking q, k, v as [batch, heads, seq, head_dim]
SDPA_CALLS = {
    "F.scaled_dot_product_attention",
    "nn.functional.scaled_dot_product_attention",
    "torch.nn.functional.scaled_dot_product_attention",
    "functional.scaled_dot_product_attention",
    "scaled_dot_product_attention",
}


@dataclass(slots=True)
class ClassInfo:
    name: str
    node: cst.ClassDef
    bases: list[str]
    methods: dict[str, cst.FunctionDef]
    # self.<attr> = <Call>: the call expression of each attribute assigned in __init__.
    init_calls: dict[str, cst.Call] = field(default_factory=dict)
    # every call assigned to each attribute, for attributes built differently per configuration
    all_init_calls: dict[str, list[cst.Call]] = field(default_factory=dict)
    # self.<attr> -> class of this file it instantiates (directly or as ModuleList elements).
    submodules: dict[str, str] = field(default_factory=dict)
    module_lists: set[str] = field(default_factory=set)
    # what the class computes when it is a vocabulary projection of its own (porter.analysis.vocab_heads)
    head_module: HeadModule | None = None

    def linears(self) -> dict[str, cst.Call]:
        return {a: c for a, c in self.init_calls.items() if call_name(c) in LINEAR_CALLS}

    def embeddings(self) -> dict[str, cst.Call]:
        return {a: c for a, c in self.init_calls.items() if call_name(c) in EMBEDDING_CALLS}


@dataclass(slots=True)
class ModelIndex:
    module: cst.Module
    classes: dict[str, ClassInfo]
    functions: dict[str, cst.FunctionDef]
    causal_lm: str
    backbone: str | None
    decoder_layer: str | None
    attention: set[str]
    reachable: list[str]  # classes the causal LM needs, in file order
    # module-level dict of this file's classes -> the class every entry is or derives from
    class_tables: dict[str, str] = field(default_factory=dict)
    # the head's attribute path from the causal LM (`["lm_head"]`, `["transformer", "output_layer"]`)
    head_path: list[str] | None = None

    def head_owner(self) -> str | None:
        """The class whose `__init__` builds the head."""
        return self.class_of_path(self.causal_lm, self.head_path[:-1]) if self.head_path else None

    def embedding_classes(self) -> set[str]:
        """What builds an embedding here: `nn.Embedding` itself and this file's subclasses of it."""
        return set(EMBEDDING_CALLS) | {
            name for name, info in self.classes.items() if any(b in EMBEDDING_CALLS for b in info.bases)
        }

    def class_of_path(self, owner: str, path: list[str]) -> str | None:
        """The class of `self.a.b` seen from class `owner` (through __init__ assignments)."""
        current: str | None = owner
        for attr in path:
            if current is None or current not in self.classes:
                return None
            current = self.classes[current].submodules.get(attr)
        return current


def build_index(module: cst.Module, causal_lm: str | None = None) -> ModelIndex:
    """Indexes `module`; `causal_lm` pins the head class once rewrites have changed what found it."""
    classes: dict[str, ClassInfo] = {}
    functions: dict[str, cst.FunctionDef] = {}
    factories = module_factories(module)
    for statement in module.body:
        if isinstance(statement, cst.ClassDef):
            classes[statement.name.value] = _class_info(statement, factories)
        elif isinstance(statement, cst.FunctionDef):
            functions[statement.name.value] = statement
    tables = class_tables(module, classes)
    for info in classes.values():
        _link_submodules(info, classes, tables)

    if causal_lm is None:
        causal_lm, head_path = _find_causal_lm(classes)
    else:
        head_path = _head_path(causal_lm, classes)
    reachable = _reachable(causal_lm, classes)
    decoder_layer = backbone = None
    for name in reachable:
        for attr in classes[name].module_lists:
            element = classes[name].submodules.get(attr)
            if element is not None:
                backbone, decoder_layer = name, element
    cores = core_modules(reachable, functions, classes)
    attention = {
        name
        for name in reachable
        if name not in cores
        and (
            _calls_attention_core(classes[name], functions, classes)
            or any(classes[name].submodules.get(attr) in cores for attr in _called_attributes(classes[name]))
        )
    }
    index = ModelIndex(
        module, classes, functions, causal_lm, backbone, decoder_layer, attention, reachable, tables
    )
    index.head_path = head_path
    return index


def class_tables(module: cst.Module, classes: dict[str, ClassInfo]) -> dict[str, str]:
    """`TABLE = {"eager": A, "sdpa": A, "flash": B}` at module level, every value a class of this
    file -> the entry all the others are or derive from (`A` when `B(A)`): the variants differ in
    backend only, and the engine has one backend. A table with no such common base is left out."""
    tables: dict[str, str] = {}
    for statement in module.body:
        if not (isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign)):
            continue
        assign = statement.body[0]
        target, value = assign.targets[0].target, assign.value
        if not isinstance(target, cst.Name) or not isinstance(value, cst.Dict) or not value.elements:
            continue
        entries = [getattr(e, "value", None) for e in value.elements]
        names = [e.value for e in entries if isinstance(e, cst.Name) and e.value in classes]
        if len(names) != len(entries):
            continue
        common = next((n for n in names if all(_derives_from(o, n, classes) for o in names)), None)
        if common is not None:
            tables[target.value] = common
    return tables


def _derives_from(name: str, base: str, classes: dict[str, ClassInfo]) -> bool:
    seen: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current == base:
            return True
        if current in seen or current not in classes:
            continue
        seen.add(current)
        stack.extend(classes[current].bases)
    return False


def _class_info(node: cst.ClassDef, factories: set[str] = frozenset()) -> ClassInfo:
    bases = [dotted_name(arg.value) or "" for arg in node.bases]
    methods = {s.name.value: s for s in node.body.body if isinstance(s, cst.FunctionDef)}
    info = ClassInfo(node.name.value, node, bases, methods)
    info.head_module = head_module(methods.get("__init__"), methods.get("forward"))
    init = methods.get("__init__")
    if init is not None:
        _note_init_calls(init, info, factories | factory_locals(init, factories))
        # Submodules built by a helper __init__ calls (`self._init_rope()`) are built in __init__ too.
        for helper in init_helpers(init, methods):
            _note_init_calls(methods[helper], info, factories | factory_locals(methods[helper], factories))
    return info


def init_helpers(init: cst.FunctionDef, methods: dict[str, cst.FunctionDef]) -> list[str]:
    """The class's own methods that `__init__` calls as statements (`self._init_rope()`), in order;
    also under a configuration test (`if config.rotary: self._init_rope()`)."""
    found = []
    for statement in _with_branches(init.body.body):
        method = calls_method(statement)
        if method in methods and method != "__init__" and method not in found:
            found.append(method)
    return found


def _with_branches(statements) -> list[cst.CSTNode]:
    """`statements`, with those of every `if`/`elif`/`else` branch among them, in order."""
    found = []
    for statement in statements:
        found.append(statement)
        branch = statement
        while isinstance(branch, (cst.If, cst.Else)):
            found += _with_branches(branch.body.body)
            branch = branch.orelse if isinstance(branch, cst.If) else None
    return found


def calls_method(statement: cst.CSTNode) -> str | None:
    """`m` for a statement that is only a call `self.m(...)`."""
    if not isinstance(statement, cst.SimpleStatementLine) or not isinstance(statement.body[0], cst.Expr):
        return None
    call = statement.body[0].value
    return self_attribute(call.func) if isinstance(call, cst.Call) else None


def _note_init_calls(method: cst.FunctionDef, info: ClassInfo, factories: set[str]) -> None:
    """`self.x = C(...)`, and `self.x = factory(C, ...)` read as the `C(...)` it builds
    (porter.analysis.module_factories), in source order: the first call assigned to `x` is its call."""
    for node in nodes_of(method, cst.Assign):
        for target in node.targets:
            attr = self_attribute(target.target)
            if attr is not None and isinstance(node.value, cst.Call):
                call = built_call(node.value, factories) or node.value
                info.init_calls.setdefault(attr, call)
                info.all_init_calls.setdefault(attr, []).append(call)


def _link_submodules(info: ClassInfo, classes: dict[str, ClassInfo], tables: dict[str, str]) -> None:
    for attr, call in info.init_calls.items():
        name = call_name(call) or table_class(call, tables)
        if name in classes:
            info.submodules[attr] = name
        elif name in MODULE_LIST_CALLS and call.args:
            element = _element_class(call.args[0].value, classes, _local_builders(info))
            if element is not None:
                info.submodules[attr] = element
                info.module_lists.add(attr)


def table_class(call: cst.Call, tables: dict[str, str]) -> str | None:
    """The class `TABLE[key](...)` builds, for a table of classes (see `class_tables`)."""
    func = call.func
    if isinstance(func, cst.Subscript) and isinstance(func.value, cst.Name):
        return tables.get(func.value.value)
    return None


def _local_builders(info: ClassInfo) -> dict[str, str]:
    """Functions defined inside `__init__` that only return a module of the file (`def
    build_layer(n): return Block(config, n)`) -> that class."""
    init = info.methods.get("__init__")
    found = {}
    for statement in init.body.body if init is not None else []:
        if not isinstance(statement, cst.FunctionDef) or len(statement.body.body) != 1:
            continue
        line = statement.body.body[0]
        returned = line.body[0] if isinstance(line, cst.SimpleStatementLine) else None
        if isinstance(returned, cst.Return) and isinstance(returned.value, cst.Call):
            found[statement.name.value] = call_name(returned.value) or ""
    return found


def _element_class(
    node: cst.BaseExpression, classes: dict[str, ClassInfo], builders: dict[str, str] | None = None
) -> str | None:
    if isinstance(node, (cst.ListComp, cst.GeneratorExp)):
        name = call_name(node.elt)
        name = (builders or {}).get(name or "", name)
        return name if name in classes else None
    if isinstance(node, (cst.List, cst.Tuple)) and node.elements:
        first = call_name(node.elements[0].value)
        return first if first in classes else None
    return None


def projects_to_vocab(call: cst.Call) -> bool:
    """A Linear (or Conv1D) whose output size is the vocabulary: an LM head."""
    if call_name(call) not in LINEAR_CALLS or len(call.args) < 2:
        return False
    out_features = call.args[1].value if call_name(call) != "Conv1D" else call.args[0].value
    return "vocab_size" in cst.Module(body=[]).code_for_node(out_features)


def vocab_projection(call: cst.Call | None, classes: dict[str, ClassInfo]) -> bool:
    """A Linear to the vocabulary, or a head module of the file built with the vocabulary as its
    output size (`NormHead(config.hidden_size, config.vocab_size)`)."""
    if call is None:
        return False
    if projects_to_vocab(call):
        return True
    built = classes.get(call_name(call) or "")
    if built is None or built.head_module is None:
        return False
    return names_vocabulary(bound_argument(call, built.methods["__init__"], built.head_module.out_param))


def _head_path(name: str, classes: dict[str, ClassInfo]) -> list[str] | None:
    """The path of the vocabulary projection `name`'s forward calls (`self.transformer.output_layer(h)`),
    else the one it holds itself."""
    info = classes[name]
    forward = info.methods.get("forward")
    for call in calls_in(forward) if forward is not None else []:
        path = self_attribute_path(call.func)
        if not path:
            continue
        owner: str | None = name
        for attr in path[:-1]:
            owner = classes[owner].submodules.get(attr) if owner in classes else None
        if owner in classes and vocab_projection(classes[owner].init_calls.get(path[-1]), classes):
            return path
    held = [attr for attr, call in info.init_calls.items() if vocab_projection(call, classes)]
    return held[:1] or None


def _find_causal_lm(classes: dict[str, ClassInfo]) -> tuple[str, list[str]]:
    candidates = []
    for info in classes.values():
        if "forward" not in info.methods:
            continue
        path = _head_path(info.name, classes)
        if path is not None:
            calls_it = any(self_attribute_path(c.func) == path for c in calls_in(info.methods["forward"]))
            candidates.append((info, path, calls_it))
    if not candidates:
        raise PorterError("found no causal-LM class (no Linear projecting to vocab_size)")
    # A class whose forward calls the head comes before one that only holds it (a backbone holding
    # the head its wrapper calls). Several classes can hold a vocab head (double-head variants); the
    # plain causal LM is the one with the fewest modules beside its backbone.
    candidates.sort(
        key=lambda c: (
            not c[2],
            not c[0].name.endswith(("ForCausalLM", "LMHeadModel")),
            len(c[0].init_calls),
        )
    )
    return candidates[0][0].name, candidates[0][1]


def _reachable(root: str, classes: dict[str, ClassInfo]) -> list[str]:
    seen: set[str] = set()
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen or name not in classes:
            continue
        seen.add(name)
        stack.extend(classes[name].submodules.values())
        stack.extend(b for b in classes[name].bases if b in classes)
    return [name for name in classes if name in seen]


def _calls_attention_core(
    info: ClassInfo, functions: dict[str, cst.FunctionDef], classes: dict[str, ClassInfo]
) -> bool:
    forward = info.methods.get("forward")
    if forward is None:
        return False
    if _calls_a_core(forward, info, functions):
        return True
    # An eager core written inline: scores, a softmax and a product with the values in forward itself.
    code = cst.Module(body=[]).code_for_node(forward)
    return calls_softmax(code) and (
        any(f"{op}(" in code for op in ("matmul", "bmm", "baddbmm")) or _has_matrix_product(forward)
    )


def core_modules(
    names: list[str], functions: dict[str, cst.FunctionDef], classes: dict[str, ClassInfo]
) -> set[str]:
    """Classes that are an attention core and nothing more: no layer of their own (no Linear, no
    submodule), a forward that computes attention from the q, k and v it is given. The class that
    calls one (`self.core_attention(q, k, v, mask)`) is the attention."""
    return {
        name
        for name in names
        if not classes[name].linears()
        and not classes[name].submodules
        and _calls_attention_core(classes[name], functions, classes)
    }


def _called_attributes(info: ClassInfo) -> set[str]:
    """`attr` of every `self.attr(...)` in forward."""
    forward = info.methods.get("forward")
    return {self_attribute(c.func) for c in calls_in(forward)} - {None} if forward is not None else set()


def _has_matrix_product(node: cst.CSTNode) -> bool:
    """The `@` operator somewhere in `node` (scores and values written as `q @ k.T`, `p @ v`)."""
    return bool(nodes_of(node, cst.MatrixMultiply))


def _is_attention_core(function: cst.FunctionDef) -> bool:
    """A softmax and a matrix product (scores, or probabilities times values): a softmax alone is
    a router's choice over experts, not attention."""
    code = cst.Module(body=[]).code_for_node(function)
    products = ("matmul(", "bmm(", "baddbmm(", "einsum(")
    return calls_softmax(code) and (any(p in code for p in products) or _has_matrix_product(function))


def _calls_a_core(forward: cst.FunctionDef, info: ClassInfo, functions: dict[str, cst.FunctionDef]) -> bool:
    """`forward` calls an attention core: HF's attention interface or SDPA, a function or method of
    the file that is one, or a core already ported."""
    for node in calls_in(forward):
        name = call_name(node) or ""
        method = self_attribute(node.func)
        if "ALL_ATTENTION_FUNCTIONS" in name or name == "attention_interface" or name in SDPA_CALLS:
            return True
        if name in functions and _is_attention_core(functions[name]):
            return True
        if method in info.methods and _is_attention_core(info.methods[method]):
            return True
        if method is not None and call_name(info.init_calls.get(method)) in (
            "PagedAttention",
            "MultiLatentAttention",
        ):
            return True  # already ported
    return False
