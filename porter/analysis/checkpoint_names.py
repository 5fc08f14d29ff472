"""How a checkpoint's tensor names differ from the module tree, per transformers' own mapping.

transformers 5 keeps a per-model list of key renames applied at load time (and reversed at save
time), so a module attribute can differ from the name in the checkpoint (`lm_head` is saved as
`embed_out`, say). The port reads that list when it is generated and writes the plain renames
into `load_weights`; anything that is more than a rename (merging or splitting tensors) is
reported, since `load_weights` would not know what to do with it.
"""

from __future__ import annotations

import re


def checkpoint_renames(class_name: str, model_type: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(regex, replacement) pairs from checkpoint names to module names, and what is not a rename."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers without conversion mappings: names are the module names
        return [], []
    transforms = get_checkpoint_conversion_mapping(class_name)
    if transforms is None and model_type:
        transforms = get_checkpoint_conversion_mapping(model_type)
    renames, unsupported = [], []
    for transform in transforms or []:
        sources, targets = list(transform.source_patterns), list(transform.target_patterns)
        if isinstance(transform, WeightRenaming) and len(sources) == len(targets) == 1:
            renames.append((sources[0], targets[0]))
        elif stacked_expert_names(transform):
            continue  # experts saved one by one: `load_weights` maps them (checkpoint_expert_names)
        else:
            unsupported.append(f"{type(transform).__name__}({', '.join(sources)} -> {', '.join(targets)})")
    return renames, unsupported


def checkpoint_expert_names(class_name: str, model_type: str | None) -> list[tuple[str, str, int | None]]:
    """(stacked parameter, per-expert checkpoint module, part) for each checkpoint tensor that
    transformers stacks into a batched experts parameter at load time: the shard names a FusedMoE's
    loader takes (`("gate_up_proj", "w1", 0)`: expert e's `w1` is part 0 of `gate_up_proj[e]`)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    transforms = get_checkpoint_conversion_mapping(class_name)
    if transforms is None and model_type:
        transforms = get_checkpoint_conversion_mapping(model_type)
    return [name for transform in transforms or [] for name in stacked_expert_names(transform)]


_PER_EXPERT = re.compile(r"\.\*\.(?P<module>\w+)\.weight$")


def stacked_expert_names(transform) -> list[tuple[str, str, int | None]]:
    """The per-expert names of a conversion that stacks `X.*.M.weight` tensors along a new expert
    dim (`MergeModulelist(dim=0)`), then, for several sources, concatenates them along the output
    dim (`Concatenate(dim=1)`) in source order; [] for any other conversion."""
    operations = [type(op).__name__ for op in getattr(transform, "operations", [])]
    sources, targets = list(transform.source_patterns), list(transform.target_patterns)
    if len(targets) != 1 or not operations or operations[0] != "MergeModulelist":
        return []
    if getattr(transform.operations[0], "dim", None) != 0:
        return []
    concatenated = operations[1:] == ["Concatenate"] and getattr(transform.operations[1], "dim", None) == 1
    if not (operations[1:] == [] and len(sources) == 1) and not (concatenated and len(sources) > 1):
        return []
    modules = [_PER_EXPERT.search(source) for source in sources]
    if not all(modules):
        return []
    stacked = targets[0].rstrip("$").split(".")[-1]
    if len(sources) == 1:
        return [(stacked, modules[0]["module"], None)]
    return [(stacked, found["module"], part) for part, found in enumerate(modules)]
