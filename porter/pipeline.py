"""The port, start to finish: parse, analyse, apply the rewrites in order, return the new source."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.metadata

from porter.analysis.cst_utils import function_params, names_in
from porter.analysis.lost_returns import forwards_without_return
from porter.analysis.model_index import build_index
from porter.analysis.source import SourceFile
from porter.analysis.unassigned_attributes import unassigned_attribute_reads
from porter.analysis.unsupported import find_unsupported
from porter.emit import undefined_names
from porter.errors import PorterError
from porter.rewrites.accessor_methods import InlineItemAccessors
from porter.rewrites.attention_sinks import AttentionSinks
from porter.rewrites.base import Change, PortContext, ReviewItem, Rewrite
from porter.rewrites.blocked_qkv import SplitBlockedQKV
from porter.rewrites.class_table import BuildTableClass
from porter.rewrites.conditional_inputs import ConditionalInputs
from porter.rewrites.conditional_modules import SplitConditionalModules
from porter.rewrites.dead_code import DecideConditions, RemoveDeadCode
from porter.rewrites.engine_interface import EngineInterface
from porter.rewrites.engine_types import EngineTypes
from porter.rewrites.flatten_batch import FlattenBatch
from porter.rewrites.fuse_gate_up import FuseGateUp
from porter.rewrites.fuse_qkv import FuseQKV
from porter.rewrites.fused_moe import FuseExperts
from porter.rewrites.gated_activation import FuseGatedActivation
from porter.rewrites.head_sharded_norm import ShardNormsByHead
from porter.rewrites.hf_leftovers import DropHFLeftovers
from porter.rewrites.hf_plumbing import StripHFPlumbing
from porter.rewrites.imports import FixImports
from porter.rewrites.latent_attention import LatentAttentionToEngine
from porter.rewrites.layer_loops import UnzipLayerLoops
from porter.rewrites.lm_head import SplitLMHead
from porter.rewrites.load_weights import EmitLoadWeights
from porter.rewrites.module_factories import UnwrapModuleFactories
from porter.rewrites.optional_libraries import DropOptionalLibraries
from porter.rewrites.paged_attention import SwapPagedAttention
from porter.rewrites.plain_linear import PlainLinear
from porter.rewrites.position_windows import PositionWindows
from porter.rewrites.prune import PruneUnused
from porter.rewrites.qkv_split_branches import SplitInBranches
from porter.rewrites.qkv_split_helper import SplitByHelper
from porter.rewrites.residual_stream import PassResidualStream
from porter.rewrites.rms_norm import FuseResidualNorm, SwapRMSNorm
from porter.rewrites.rotary import RotaryToEngine
from porter.rewrites.routing import FoldRouting
from porter.rewrites.shape_checks import DropShapeChecks
from porter.rewrites.sliced_linears import KeepModuleCalls
from porter.rewrites.strip_training import StripTraining
from porter.rewrites.tensor_parallel import TensorParallelLayers
from porter.rewrites.training_arguments import InferenceArguments
from porter.rewrites.unread_attributes import DropUnreadAttributes
from porter.rewrites.unused_modules import DropUnusedModules

# The order matters: each rewrite sees the output of the ones before it.
REWRITES: list[Rewrite] = [
    UnwrapModuleFactories(),  # `init_method(nn.Linear, ...)` (a factory given the class) -> `nn.Linear(...)`
    InlineItemAccessors(),  # `self.get_layer(i)` that only returns `self.layers[i]` -> `self.layers[i]`
    BuildTableClass(),  # a submodule picked from a table of backend classes -> the common class
    PlainLinear(),  # Linear subclasses that only compute x W^T + b -> the Linear itself
    SplitConditionalModules(),  # `self.m = A(...) if c else B(...)` -> an if/else of the two
    StripHFPlumbing(),  # framework bases, decorators, init helpers
    InferenceArguments(),  # a helper's `training` parameter every caller binds to self.training -> False
    FuseExperts(),  # batched experts modules -> FusedMoE
    FoldRouting(),  # a router's softmax / top-k / renormalise statements -> one routing function
    KeepModuleCalls(),  # layers computed again from weight slices (pretraining-tp branches)
    DropShapeChecks(),  # asserts of the batched eager layout
    SplitLMHead(),  # forward returns hidden states; compute_logits; parallel, tied head
    ConditionalInputs(),  # `if alibi is None:` where a config flag builds alibi -> a test of that flag
    DecideConditions(),  # branches the engine decides (no cache, no cross-attention, not training)
    UnzipLayerLoops(),  # layer loops zipped with per-layer HF caches
    LatentAttentionToEngine(),  # attention over a compressed latent -> MultiLatentAttention
    SwapPagedAttention(),  # the attention core becomes one PagedAttention call
    AttentionSinks(),  # a learned logit in each head's softmax denominator -> PagedAttention(sinks=...)
    SplitByHelper(),  # a fused q|k|v split into heads by a helper -> split by this rank's sizes
    SplitInBranches(),  # a fused q|k|v split inline, one branch per layout -> split by this rank's sizes
    SplitBlockedQKV(),  # a fused q|k|v in model-parallel blocks -> split by this rank's sizes
    RotaryToEngine(),  # HF cos/sin plumbing -> the engine's rotary layer inside attention
    PositionWindows(),  # `table[:, k_len - q_len : k_len]` of a per-position table -> `table[0, positions]`
    EngineInterface(),  # forward signatures, call threading, single-tensor returns
    RemoveDeadCode(),  # masks, caches, output flags and what reads them
    DropOptionalLibraries(),  # flash-attention probes and imports the port never needs
    StripTraining(),  # dropout, layerdrop
    FlattenBatch(),  # no batch dimension in sizes, views and transposes
    FuseQKV(),  # q/k/v projections -> QKVParallelLinear
    FuseGateUp(),  # gated MLP inputs -> MergedColumnParallelLinear
    SwapRMSNorm(),  # the file's RMSNorm -> the engine's, where running both proves them equal
    FuseResidualNorm(),  # residual add + norm -> one call
    ShardNormsByHead(),  # a norm over all heads of q or k -> one split by heads across ranks
    TensorParallelLayers(),  # remaining Linears by data flow; vocab embedding
    FuseGatedActivation(),  # act(gate) * up -> one layer on [gate | up], once the data flow is read
    DropUnusedModules(),  # modules nothing runs (a decoder's cross-attention); their weights skipped
    EmitLoadWeights(),  # load_weights from the plan (fused names, ties)
    PruneUnused(),  # task heads, eager attention helpers
    DropHFLeftovers(),  # logger calls, maintainers' notes, whole-list slices, passed-on temporaries
    DropUnreadAttributes(),  # `self.x = ...` nothing reads, then the parameters only it read
    PruneUnused(),  # what only the dropped attributes and leftovers read (a logger, a helper)
    PassResidualStream(),  # the residual passed between layers, both norms of a layer fused with the add
    EngineTypes(),  # forward inputs typed as the engine's (`kv_cache: KVCache`), not HF's
    FixImports(),  # absolute imports, engine imports, unused ones gone
]


@dataclass(slots=True)
class PortResult:
    code: str
    context: PortContext

    @property
    def changes(self) -> list[Change]:
        return self.context.changes

    @property
    def review(self) -> list[ReviewItem]:
        return self.context.review


def port_source(source: SourceFile, allow_review: bool = False) -> PortResult:
    """Runs every rewrite over `source`. Constructs the engine cannot run stop the port before any
    rewrite (unless `allow_review`, which carries on and leaves them as review items)."""
    try:
        module = cst.parse_module(source.text)
    except cst.ParserSyntaxError as error:
        raise PorterError(
            f"{source.display_name} does not parse: {error.message} (line {error.raw_line})"
        ) from None
    context = PortContext(source=source, index=build_index(module))
    for found in find_unsupported(module, set(context.index.reachable)):
        context.flag(
            "unsupported",
            found.where,
            f"{found.construct} (line {found.line}) is not supported by the engine",
        )
    if context.review and not allow_review:
        return PortResult(code=module.code, context=context)
    for rewrite in REWRITES:
        context.stages.append(module)
        try:
            module = rewrite.apply(module, context)
            context.reindex(module)
        except PorterError:
            raise
        except Exception as error:  # a construct this rewrite does not handle: say which, never a traceback
            raise PorterError(
                f"the {rewrite.name} rewrite failed on {source.display_name}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from error
    context.stages.append(module)
    undefined = undefined_names(module.code)
    places = _functions_by_line(module) if undefined else {}
    for line, name in undefined:
        # What defined it went with some rewrite, in a branch verify may never run: stop here.
        where = next((w for (first, last), w in places.items() if first <= line <= last), "module")
        context.flag("dead-code", where, f"`{name}` is read but nothing defines it any more")
    for where, name in unread_forward_inputs(module):
        context.flag(
            "engine-interface",
            where,
            f"`{name}` is passed in but no longer read: the port dropped what the source did with it "
            "(an attention bias the engine's attention does not take?)",
        )
    for where in forwards_without_return(module, context.stages[0]):
        context.flag(
            "dead-code", where, "forward returns nothing: what it returned was removed with its inputs"
        )
    for read in unassigned_attribute_reads(module, context.stages[0]):
        # A module a rewrite replaced, still called somewhere: the port would fail when it runs.
        context.flag(
            "dead-code",
            f"{read.class_name}.{read.method}",
            f"`self.{read.attribute}` is read but nothing assigns it any more",
        )
    return PortResult(code=module.code, context=context)


# Inputs every engine forward may take without reading (a layer without attention still threads them).
ENGINE_INPUTS = {"positions", "kv_cache", "kv_caches", "input_metadata"}


def unread_forward_inputs(module: cst.Module) -> list[tuple[str, str]]:
    """(Class.forward, parameter) for each forward parameter of the port that its body never reads.

    After the rewrites every input a forward keeps is one the source used; one left unread means a
    rewrite removed its use (MPT's ALiBi `position_bias` once its attention became a PagedAttention
    without slopes), so the port would run and be wrong."""
    found = []
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef):
            continue
        for item in statement.body.body:
            if isinstance(item, cst.FunctionDef) and item.name.value == "forward":
                read = names_in(item.body)
                for name in function_params(item)[1:]:
                    if name not in read and name not in ENGINE_INPUTS:
                        found.append((f"{statement.name.value}.forward", name))
    return found


def _functions_by_line(module: cst.Module) -> dict[tuple[int, int], str]:
    """(first line, last line) -> `Class.method` of every method in `module`."""
    wrapper = cst.metadata.MetadataWrapper(module, unsafe_skip_copy=True)
    positions = wrapper.resolve(cst.metadata.PositionProvider)
    found = {}
    for statement in wrapper.module.body:
        if isinstance(statement, cst.ClassDef):
            for item in statement.body.body:
                if isinstance(item, cst.FunctionDef):
                    span = positions[item]
                    found[(span.start.line, span.end.line)] = f"{statement.name.value}.{item.name.value}"
    return found
