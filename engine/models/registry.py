"""Which engine class runs which `architectures` entry of a model's config.json.

`porter port` adds entries to `_MODELS` (it rewrites the dict literal atomically and keeps it
sorted); remove one by hand if you delete its file. A model that lives outside this package is
registered at run time with `register_model`, by dotted path or file path, so a user's own port
needs no change here.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from torch import nn

_MODELS: dict[str, tuple[str, str]] = {
    "ApertusForCausalLM": ("engine.models.apertus", "ApertusForCausalLM"),
    "ArceeForCausalLM": ("engine.models.arcee", "ArceeForCausalLM"),
    "BartForCausalLM": ("engine.models.bart", "BartForCausalLM"),
    "BigBirdPegasusForCausalLM": ("engine.models.bigbird_pegasus", "BigBirdPegasusForCausalLM"),
    "BioGptForCausalLM": ("engine.models.biogpt", "BioGptForCausalLM"),
    "BitNetForCausalLM": ("engine.models.bitnet", "BitNetForCausalLM"),
    "BlenderbotForCausalLM": ("engine.models.blenderbot", "BlenderbotForCausalLM"),
    "BlenderbotSmallForCausalLM": ("engine.models.blenderbot_small", "BlenderbotSmallForCausalLM"),
    "BloomForCausalLM": ("engine.models.bloom", "BloomForCausalLM"),
    "CodeGenForCausalLM": ("engine.models.codegen", "CodeGenForCausalLM"),
    "Cohere2ForCausalLM": ("engine.models.cohere2", "Cohere2ForCausalLM"),
    "CohereForCausalLM": ("engine.models.cohere", "CohereForCausalLM"),
    "CwmForCausalLM": ("engine.models.cwm", "CwmForCausalLM"),
    "DeepseekV2ForCausalLM": ("engine.models.deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("engine.models.deepseek_v3", "DeepseekV3ForCausalLM"),
    "Emu3ForCausalLM": ("engine.models.emu3", "Emu3ForCausalLM"),
    "Ernie4_5ForCausalLM": ("engine.models.ernie4_5", "Ernie4_5ForCausalLM"),
    "Exaone4ForCausalLM": ("engine.models.exaone4", "Exaone4ForCausalLM"),
    "FalconForCausalLM": ("engine.models.falcon", "FalconForCausalLM"),
    "GPT2LMHeadModel": ("engine.models.gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("engine.models.gpt_bigcode", "GPTBigCodeForCausalLM"),
    "GPTJForCausalLM": ("engine.models.gptj", "GPTJForCausalLM"),
    "GPTNeoForCausalLM": ("engine.models.gpt_neo", "GPTNeoForCausalLM"),
    "GPTNeoXForCausalLM": ("engine.models.gpt_neox", "GPTNeoXForCausalLM"),
    "Gemma2ForCausalLM": ("engine.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("engine.models.gemma3", "Gemma3ForCausalLM"),
    "GemmaForCausalLM": ("engine.models.gemma", "GemmaForCausalLM"),
    "Glm4ForCausalLM": ("engine.models.glm4", "Glm4ForCausalLM"),
    "Glm4MoeForCausalLM": ("engine.models.glm4_moe", "Glm4MoeForCausalLM"),
    "GlmForCausalLM": ("engine.models.glm", "GlmForCausalLM"),
    "GptOssForCausalLM": ("engine.models.gpt_oss", "GptOssForCausalLM"),
    "GraniteForCausalLM": ("engine.models.granite", "GraniteForCausalLM"),
    "GraniteMoeForCausalLM": ("engine.models.granitemoe", "GraniteMoeForCausalLM"),
    "HeliumForCausalLM": ("engine.models.helium", "HeliumForCausalLM"),
    "HunYuanDenseV1ForCausalLM": ("engine.models.hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM"),
    "HyperCLOVAXForCausalLM": ("engine.models.hyperclovax", "HyperCLOVAXForCausalLM"),
    "Jais2ForCausalLM": ("engine.models.jais2", "Jais2ForCausalLM"),
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MBartForCausalLM": ("engine.models.mbart", "MBartForCausalLM"),
    "MarianForCausalLM": ("engine.models.marian", "MarianForCausalLM"),
    "Ministral3ForCausalLM": ("engine.models.ministral3", "Ministral3ForCausalLM"),
    "MinistralForCausalLM": ("engine.models.ministral", "MinistralForCausalLM"),
    "MistralForCausalLM": ("engine.models.mistral", "MistralForCausalLM"),
    "MixtralForCausalLM": ("engine.models.mixtral", "MixtralForCausalLM"),
    "ModernBertDecoderForCausalLM": ("engine.models.modernbert_decoder", "ModernBertDecoderForCausalLM"),
    "MptForCausalLM": ("engine.models.mpt", "MptForCausalLM"),
    "NanoChatForCausalLM": ("engine.models.nanochat", "NanoChatForCausalLM"),
    "NemotronForCausalLM": ("engine.models.nemotron", "NemotronForCausalLM"),
    "OPTForCausalLM": ("engine.models.opt", "OPTForCausalLM"),
    "Olmo2ForCausalLM": ("engine.models.olmo2", "Olmo2ForCausalLM"),
    "Olmo3ForCausalLM": ("engine.models.olmo3", "Olmo3ForCausalLM"),
    "OlmoForCausalLM": ("engine.models.olmo", "OlmoForCausalLM"),
    "OlmoeForCausalLM": ("engine.models.olmoe", "OlmoeForCausalLM"),
    "PLBartForCausalLM": ("engine.models.plbart", "PLBartForCausalLM"),
    "PegasusForCausalLM": ("engine.models.pegasus", "PegasusForCausalLM"),
    "PersimmonForCausalLM": ("engine.models.persimmon", "PersimmonForCausalLM"),
    "Phi3ForCausalLM": ("engine.models.phi3", "Phi3ForCausalLM"),
    "PhiForCausalLM": ("engine.models.phi", "PhiForCausalLM"),
    "PhimoeForCausalLM": ("engine.models.phimoe", "PhimoeForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen2MoeForCausalLM": ("engine.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "SeedOssForCausalLM": ("engine.models.seed_oss", "SeedOssForCausalLM"),
    "SmolLM3ForCausalLM": ("engine.models.smollm3", "SmolLM3ForCausalLM"),
    "StableLmForCausalLM": ("engine.models.stablelm", "StableLmForCausalLM"),
    "Starcoder2ForCausalLM": ("engine.models.starcoder2", "Starcoder2ForCausalLM"),
    "VaultGemmaForCausalLM": ("engine.models.vaultgemma", "VaultGemmaForCausalLM"),
    "XGLMForCausalLM": ("engine.models.xglm", "XGLMForCausalLM"),
}

_CUSTOM: dict[str, str | type[nn.Module]] = {}


def register_model(architecture: str, target: str | type[nn.Module]) -> None:
    """Runs `architecture` with `target`: a class, `"package.module:Class"` or `"/path/to/file.py:Class"`."""
    _CUSTOM[architecture] = target


def registered_architectures() -> dict[str, tuple[str, str]]:
    """The architectures bundled with the engine: name -> (module, class)."""
    return dict(_MODELS)


def resolve_model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The class for the first of `architectures` the engine knows; a clear error when it knows none."""
    for architecture in architectures or []:
        if architecture in _CUSTOM:
            return load_target(_CUSTOM[architecture])
        if architecture in _MODELS:
            module_name, class_name = _MODELS[architecture]
            return getattr(importlib.import_module(module_name), class_name)
    known = sorted(set(_MODELS) | set(_CUSTOM))
    raise ValueError(
        f"no engine model for architectures {architectures}; registered: {', '.join(known) or 'none'} "
        f"(port one with `porter port`, or register your own with engine.models.registry.register_model)"
    )


def load_target(target: str | type[nn.Module]) -> type[nn.Module]:
    """A class, or the class a `"package.module:Class"` / `"file.py:Class"` string names."""
    if not isinstance(target, str):
        return target
    location, _, class_name = target.rpartition(":")
    if not location or not class_name:
        raise ValueError(f"model target {target!r} must look like 'package.module:Class' or 'file.py:Class'")
    if location.endswith(".py"):
        path = Path(location).resolve()
        # The file is loaded as a module of a package that is its folder, so its relative imports
        # (a remote-code port's `from .x_code.configuration_x import ...`) resolve beside it.
        package = f"_porter_custom_{abs(hash(str(path.parent)))}"
        module_name = f"{package}.{path.stem}"
        if package not in sys.modules:
            package_spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            package_spec.submodule_search_locations = [str(path.parent)]
            sys.modules[package] = importlib.util.module_from_spec(package_spec)
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ValueError(f"cannot import model file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        module = sys.modules[module_name]
    else:
        module = importlib.import_module(location)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"{location} defines no class {class_name}") from None
