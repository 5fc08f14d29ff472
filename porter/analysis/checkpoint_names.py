"""How a checkpoint's tensor names differ from the module tree, per transformers' own mapping.

transformers 5 keeps a per-model list of key renames applied at load time (and reversed at save
time), so a module attribute can differ from the name in the checkpoint (`lm_head` is saved as
`embed_out`, say). The port reads that list when it is generated and writes the plain renames
into `load_weights`; anything that is more than a rename (merging or splitting tensors) is
reported, since `load_weights` would not know what to do with it.
"""

from __future__ import annotations


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
        else:
            unsupported.append(f"{type(transform).__name__}({', '.join(sources)} -> {', '.join(targets)})")
    return renames, unsupported
