"""A small random-weight HF checkpoint of a given architecture, written as safetensors.

The config comes from the architecture's own config class, shrunk generically: every integer
setting equal to the default hidden size becomes the small hidden size (so tied widths such as a
word-embedding projection stay tied), likewise the MLP width; heads, KV heads and layers are set
through the config's standard names (its attribute map handles `n_head` and friends). The vocab
is deliberately not a multiple of 64 so vocab padding is exercised.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from porter.errors import PorterError
from porter.verify.small_experts import check_routing_varies, shrink_experts
from porter.verify.small_latent import shrink_latent_attention

HIDDEN, HEADS, KV_HEADS, LAYERS, INTERMEDIATE, VOCAB, POSITIONS = 64, 4, 2, 2, 160, 997, 256
SLIDING_WINDOW = 8
MIN_LITERAL_HEAD_SIZE = 16
# Config attributes that hold a local-attention window (GPT-Neo calls it `window_size`).
WINDOW_ATTRIBUTES = ("sliding_window", "window_size")
INTERMEDIATE_NAMES = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


# Remote code names its sizes as its authors chose; these are the names in use for each size (read
# only for remote code, so a transformers config shrinks exactly as it always has).
REMOTE_HEAD_NAMES = ("n_head", "n_heads", "num_heads")
REMOTE_KV_HEAD_NAMES = (
    "num_key_value_heads",
    "n_head_kv",
    "num_kv_heads",
    "n_kv_heads",
    "multi_query_group_num",
    "num_query_groups",
)
REMOTE_LAYER_NAMES = ("n_layer", "n_layers", "num_layers")
REMOTE_POSITION_NAMES = ("n_positions", "seq_length", "max_sequence_length", "max_seq_len")
REMOTE_HEAD_SIZE_NAMES = ("kv_channels", "head_size", "head_dim")
REMOTE_VOCAB_NAMES = ("padded_vocab_size",)


def small_config(model_type: str, architecture: str) -> PretrainedConfig:
    """The default config of a transformers model type's causal-LM class, shrunk."""
    config = shrink(_config_of(model_type, architecture), _config_of(model_type, architecture))
    config.architectures = [architecture]
    return config


def shrink_remote(
    config: PretrainedConfig, architecture: str, modeling: str | None = None
) -> PretrainedConfig:
    """A remote-code config (its class's defaults, or a checkpoint's config.json) shrunk, reading
    the size names remote code uses besides transformers' standard ones. Where the modeling source
    (`modeling`) splits heads by a literal head size, the small config keeps that head size."""
    default = copy.deepcopy(config)
    shrink(config, default)
    _shrink_remote_names(config, default)
    head_size = literal_head_size(modeling) if modeling is not None else None
    if head_size is not None and head_size != HIDDEN // HEADS:
        _widen_to_head_size(config, default, head_size)
    config.architectures = [architecture]
    return config


def literal_head_size(source: str) -> int | None:
    """The head size a modeling file hard-codes where it splits a projection into heads: the
    integer last size of a view/reshape into heads (four sizes or more: `fused_qkv.view(batch,
    seq_len, -1, self.num_heads // self.num_kv + 2, 64)`). Such code runs only at that head size
    (a checkpoint of another head size fails the view), so the small config must keep it; None
    where no split names one, or splits name different ones."""
    import libcst as cst
    import libcst.matchers as m

    reshapes = m.Call(func=m.Attribute(attr=m.Name("view") | m.Name("reshape")))
    sizes = {
        int(call.args[-1].value.value)
        for call in m.findall(cst.parse_module(source), reshapes)
        if len(call.args) >= 4
        and isinstance(call.args[-1].value, cst.Integer)
        and call.args[-1].keyword is None
    }
    # a small literal is a pair or a group of a rotation (`view(b, s, h, -1, 2)`), not a head
    sizes = {size for size in sizes if size >= MIN_LITERAL_HEAD_SIZE}
    return sizes.pop() if len(sizes) == 1 else None


def _widen_to_head_size(config: PretrainedConfig, default: PretrainedConfig, head_size: int) -> None:
    """The small config's widths at `head_size` per head: the hidden size (and every setting tied
    to it) becomes HEADS * head_size, a head-size setting head_size."""
    default_hidden = getattr(default, "hidden_size", None)
    hidden = HEADS * head_size
    for key, value in list(vars(default).items()):
        if _is_int(value) and value == default_hidden:
            setattr(config, key, hidden)
        elif key in REMOTE_HEAD_SIZE_NAMES and _is_int(value):
            setattr(config, key, head_size)
    config.hidden_size = hidden
    if hasattr(config, "head_dim") and not isinstance(getattr(type(config), "head_dim", None), property):
        config.head_dim = head_size


def _shrink_remote_names(config: PretrainedConfig, default: PretrainedConfig) -> None:
    values = {key: value for key, value in vars(default).items() if _is_int(value)}
    heads = next((values[n] for n in ("num_attention_heads", *REMOTE_HEAD_NAMES) if n in values), None)
    for key in values:
        if key in REMOTE_HEAD_NAMES:
            setattr(config, key, HEADS)
        elif key in REMOTE_KV_HEAD_NAMES:
            setattr(config, key, HEADS if values[key] == heads else min(KV_HEADS, values[key]))
        elif key in REMOTE_LAYER_NAMES and values[key] > LAYERS:
            setattr(config, key, LAYERS)
        elif key in REMOTE_POSITION_NAMES:
            setattr(config, key, POSITIONS)
        elif key in REMOTE_HEAD_SIZE_NAMES:
            setattr(config, key, HIDDEN // HEADS)
        elif key in REMOTE_VOCAB_NAMES:
            setattr(config, key, VOCAB)
    # Per-frequency lists (a long-context rope's factors) are as long as half the default head.
    default_heads = heads or 1
    half_head = getattr(default, "hidden_size", 0) // default_heads // 2
    for key, value in vars(default).items():
        if isinstance(value, dict) and half_head:
            setattr(config, key, {k: _per_frequency(v, half_head) for k, v in value.items()})


def _per_frequency(value: object, half_head: int) -> object:
    """A list with one number per rotary frequency of the default head, cut to the small head's."""
    if (
        isinstance(value, list)
        and len(value) == half_head
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return value[: HIDDEN // HEADS // 2]
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shrink(config: PretrainedConfig, default: PretrainedConfig) -> PretrainedConfig:
    """Shrinks `config` in place, reading the sizes to replace from `default` (an untouched copy)."""
    default_hidden = getattr(default, "hidden_size", None)
    default_intermediate = next(
        (getattr(default, n) for n in INTERMEDIATE_NAMES if getattr(default, n, None)), None
    )
    for key, value in list(vars(default).items()):
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == default_hidden:
            setattr(config, key, HIDDEN)
        elif default_intermediate and value == default_intermediate:
            setattr(config, key, INTERMEDIATE)
    for key, value in list(vars(default).items()):
        # Encoder-decoder configs size their stacks apart (`decoder_layers`, `decoder_attention_heads`,
        # `decoder_vocab_size`); the standard names map to one of them only.
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key.endswith("_layers") and value > LAYERS:
            setattr(config, key, LAYERS)
        elif key.endswith("attention_heads"):
            setattr(config, key, HEADS)
        elif key.endswith("vocab_size"):
            setattr(config, key, VOCAB)
    config.hidden_size = HIDDEN
    config.num_attention_heads = HEADS
    config.num_hidden_layers = LAYERS
    if getattr(default, "num_key_value_heads", None) not in (
        None,
        getattr(default, "num_attention_heads", None),
    ):
        config.num_key_value_heads = KV_HEADS  # grouped-query: keep it grouped
    elif hasattr(default, "num_key_value_heads"):
        config.num_key_value_heads = HEADS
    if hasattr(config, "head_dim") and not isinstance(getattr(type(config), "head_dim", None), property):
        # (a property computes it from the sizes set above). Set even where the default is None:
        # some config classes leave it to the checkpoint, and their models cannot run without it.
        config.head_dim = HIDDEN // HEADS
    for name in INTERMEDIATE_NAMES:
        if getattr(config, name, None):
            setattr(config, name, INTERMEDIATE)
    rotary = getattr(config, "rotary_dim", None)  # a rotated width named directly (GPT-J, CodeGen)
    if isinstance(rotary, int) and not isinstance(rotary, bool) and rotary > HIDDEN // HEADS // 2:
        config.rotary_dim = HIDDEN // HEADS // 2  # half the head: the partial rotation really shows
    default_layers = getattr(default, "num_hidden_layers", None)
    for key, value in list(vars(config).items()):
        # A list naming each layer's kind (`layer_types`, GPT-Neo's `attention_layers`): keep one
        # of each kind of layer (sliding and full attention, for instance).
        if not (isinstance(value, list) and len(value) > LAYERS and all(isinstance(v, str) for v in value)):
            continue
        if key == "layer_types" or len(value) == default_layers:
            kinds = list(dict.fromkeys(value))
            setattr(config, key, (kinds + value)[:LAYERS] if len(kinds) <= LAYERS else kinds[:LAYERS])
    for window in WINDOW_ATTRIBUTES:  # shorter than the prompts, so the window really masks
        if isinstance(getattr(config, window, None), int) and not isinstance(getattr(config, window), bool):
            setattr(config, window, SLIDING_WINDOW)
    config.vocab_size = VOCAB
    if hasattr(config, "max_position_embeddings"):
        config.max_position_embeddings = POSITIONS
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, name, VOCAB - 1 - ("pad bos eos".split().index(name.split("_")[0])))
    shrink_experts(config)
    shrink_latent_attention(config, default)
    return config


def _config_of(model_type: str, architecture: str) -> PretrainedConfig:
    """A default config of the class the causal-LM class itself takes (a text-only config where the
    model type names a multimodal one), else the model type's."""
    import transformers

    config_class = getattr(getattr(transformers, architecture, None), "config_class", None)
    if isinstance(config_class, type) and issubclass(config_class, PretrainedConfig):
        return config_class()
    return AutoConfig.for_model(model_type)


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings (`--set`) -> {key: value}; a value is a JSON literal (`true`, `2`, `null`,
    `"x"`) where it parses as one, else the string as written."""
    overrides: dict[str, object] = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise PorterError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides[key.strip()] = value
    return overrides


def apply_overrides(config: PretrainedConfig, overrides: dict[str, object]) -> None:
    """Sets each override on the small config; a key the config class does not have is an error (a
    typo would otherwise verify the default architecture and pass)."""
    unknown = sorted(key for key in overrides if not hasattr(config, key))
    if unknown:
        raise PorterError(f"--set: {type(config).__name__} has no attribute {', '.join(map(repr, unknown))}")
    for key, value in overrides.items():
        setattr(config, key, value)


def write_checkpoint(
    config: PretrainedConfig, directory: Path, seed: int, model_class: type | None = None
) -> torch.nn.Module:
    """Builds the HF model (`model_class`, else transformers' class of the config's architecture) with
    seeded random weights, saves it, and returns it (float32, eval).

    The reference runs HF's eager attention unless the config already names an implementation
    (`--set _attn_implementation=sdpa`)."""
    torch.manual_seed(seed)
    model_class = model_class or getattr(transformers, config.architectures[0])
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "eager"
    model = model_class(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and torch.all(param == 1):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))  # norm gains
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    transformers.utils.logging.disable_progress_bar()
    _declare_tied_head(model)
    model.save_pretrained(directory, safe_serialization=True)
    check_routing_varies(model, config.vocab_size, seed)
    return model


def _declare_tied_head(model: torch.nn.Module) -> None:
    """Remote code written before transformers 4.x checked shared tensors at save declares no
    `_tied_weights_keys`, yet its head is tied to the embeddings (`tie_word_embeddings`, true by
    default); 4.x's save_pretrained refuses shared tensors it was not told of. The head's weight
    is declared tied, as transformers' own classes declare it (4.x's list of names)."""
    if (
        getattr(model, "_tied_weights_keys", None) is not None
        or int(transformers.__version__.split(".")[0]) >= 5
    ):
        return
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or embeddings is None or getattr(output, "weight", None) is not embeddings.weight:
        return
    head = next(name for name, module in model.named_modules() if module is output)
    model._tied_weights_keys = [f"{head}.weight"]
