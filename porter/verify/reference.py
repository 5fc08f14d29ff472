"""The reference side of `porter verify`: the original model, shrunk, with seeded random weights, run
through the verify schedule, here or in another Python (`--reference-python`).

The reference is a transformers model type, a remote-code model directory (config.json naming its own
classes in `auto_map`), or a modeling file with its sibling configuration file. Everything the engine
side needs crosses as files in the work directory: the checkpoint (safetensors) and config.json, the
remote code's .py files beside them, the tokens fed at each step (reference/inputs.json) and the
reference logits (reference/logits.safetensors). So the two sides can run different transformers
releases, e.g. remote code in a virtualenv with the transformers it was written for. Run as a module
(`python -m porter.verify.reference WORK_DIR`) it reads the spec from WORK_DIR/reference_spec.json;
it needs only torch, transformers and safetensors there.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from porter.errors import PorterError

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC_FILE = "reference_spec.json"
# Beside the checkpoint, not in its folder: the engine loads every .safetensors file there.
INPUTS_FILE = "reference/inputs.json"
LOGITS_FILE = "reference/logits.safetensors"
CAUSAL_LM_KEY = "AutoModelForCausalLM"


@dataclass(slots=True)
class ReferenceSpec:
    reference: str  # a transformers model type, a model directory or a modeling file
    architecture: str  # the causal-LM class to build (transformers' class, or the remote file's)
    seed: int = 0
    decode_steps: int = 8
    overrides: dict[str, object] = field(default_factory=dict)

    @property
    def is_remote(self) -> bool:
        return Path(self.reference).exists()


@dataclass(slots=True)
class ReferenceRun:
    logits_per_step: list[dict[int, torch.Tensor]]
    inputs_per_step: list[dict[int, list[int]]]
    trust_remote_code: bool  # the checkpoint's config.json names remote code the engine must load


def run_reference(spec: ReferenceSpec, work_dir: Path, python: str | None = None) -> ReferenceRun:
    """Writes the reference checkpoint and logits into `work_dir` (in `python` when given) and reads
    them back."""
    if python is None:
        write_reference(spec, work_dir)
    else:
        (work_dir / SPEC_FILE).write_text(json.dumps(asdict(spec)))
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        try:
            done = subprocess.run(
                [python, "-m", "porter.verify.reference", str(work_dir)],
                capture_output=True,
                text=True,
                env=environment,
                cwd=ROOT,
            )
        except OSError as error:
            raise PorterError(f"--reference-python {python}: {error.strerror}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PorterError(f"the reference side failed in {python}: {last}")
    return read_reference(work_dir)


def write_reference(spec: ReferenceSpec, work_dir: Path) -> None:
    """Builds the shrunk reference model, saves its checkpoint, runs the schedule, saves the logits."""
    from safetensors.torch import save_file

    from porter.verify.parity import hf_reference, make_prompts, schedule
    from porter.verify.small_model import apply_overrides, small_config, write_checkpoint

    if spec.is_remote:
        config, model_class = remote_config(Path(spec.reference), spec.architecture, work_dir)
    else:
        config, model_class = small_config(spec.reference, spec.architecture), None
    apply_overrides(config, spec.overrides)
    model = write_checkpoint(config, work_dir, spec.seed, model_class)
    steps = schedule(spec.decode_steps)
    logits, inputs = hf_reference(model, make_prompts(config.vocab_size, spec.seed), steps)
    tensors = {
        f"{step}.{seq}": value.contiguous() for step, row in enumerate(logits) for seq, value in row.items()
    }
    (work_dir / LOGITS_FILE).parent.mkdir(exist_ok=True)
    save_file(tensors, str(work_dir / LOGITS_FILE))
    (work_dir / INPUTS_FILE).write_text(
        json.dumps(
            {
                "inputs": [[[seq, tokens] for seq, tokens in row.items()] for row in inputs],
                "trust_remote_code": spec.is_remote,
            }
        )
    )


def read_reference(work_dir: Path) -> ReferenceRun:
    from safetensors.torch import load_file

    saved = json.loads((work_dir / INPUTS_FILE).read_text())
    inputs = [{seq: tokens for seq, tokens in row} for row in saved["inputs"]]
    logits: list[dict[int, torch.Tensor]] = [{} for _ in inputs]
    for key, value in load_file(str(work_dir / LOGITS_FILE)).items():
        step, seq = key.split(".")
        logits[int(step)][int(seq)] = value
    logits = [dict(sorted(row.items())) for row in logits]
    return ReferenceRun(logits, inputs, saved["trust_remote_code"])


def remote_config(source: Path, architecture: str, work_dir: Path):
    """The remote code's config (config.json's values over its class's defaults), shrunk, and its
    causal-LM class. The directory's .py files are copied into `work_dir` with a config.json whose
    `auto_map` names the configuration class and `architecture`, so the checkpoint written there is a
    model directory that loads with trust_remote_code."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from porter.verify.missing_imports import install_placeholders, missing_packages
    from porter.verify.small_model import shrink_remote

    model_dir = source if source.is_dir() else source.parent
    install_placeholders(missing_packages(model_dir))
    for code in model_dir.glob("*.py"):
        shutil.copy2(code, work_dir / code.name)
    # Remote code that imports its siblings by bare name (`from configuration_x import XConfig`) loads
    # where its directory is on the path, as it does next to a script in that directory.
    sys.path.insert(0, str(work_dir.resolve()))
    raw = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    auto_map = dict(raw.get("auto_map") or {})
    modeling = source.stem if source.is_file() else _module_of(auto_map.get(CAUSAL_LM_KEY), model_dir)
    auto_map[CAUSAL_LM_KEY] = f"{modeling}.{architecture}"
    if "AutoConfig" not in auto_map:
        auto_map["AutoConfig"] = _config_class_of(model_dir / f"{modeling}.py")
    (work_dir / "config.json").write_text(json.dumps({**raw, "auto_map": auto_map}, indent=2))
    config = AutoConfig.from_pretrained(str(work_dir), trust_remote_code=True, local_files_only=True)
    model_class = get_class_from_dynamic_module(auto_map[CAUSAL_LM_KEY], str(work_dir))
    config.auto_map = auto_map  # saved with the checkpoint: what the engine's loader reads
    return shrink_remote(config, architecture, (work_dir / f"{modeling}.py").read_text()), model_class


def _module_of(reference: str | None, model_dir: Path) -> str:
    if not reference:
        raise PorterError(
            f"{model_dir}/config.json names no {CAUSAL_LM_KEY} in auto_map; pass the modeling file"
        )
    return reference.split("--")[-1].rsplit(".", 1)[0]  # "repo--modeling_x.Class" or "modeling_x.Class"


def _config_class_of(modeling_file: Path) -> str:
    """`configuration_x.XConfig`: the class the modeling file imports from a configuration module next
    to it (relatively or by its bare name)."""
    tree = ast.parse(modeling_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level <= 1:
            if (modeling_file.parent / f"{node.module}.py").is_file() and node.module.startswith(
                "configuration"
            ):
                return f"{node.module}.{node.names[0].name}"
    raise PorterError(f"{modeling_file.name} imports no configuration module from its directory")


def main(argv: list[str]) -> int:
    work_dir = Path(argv[0])
    spec = ReferenceSpec(**json.loads((work_dir / SPEC_FILE).read_text()))
    write_reference(spec, work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
