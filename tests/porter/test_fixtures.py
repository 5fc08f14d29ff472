"""Old-style and remote-code-style modeling files (tests/fixtures/): faithful to HF, then ported.

Each fixture is hand-written in a style porter must read (transformers 4.3x, or a hub repository's
`trust_remote_code` file) and names the installed transformers architecture it matches. The first
tests prove that claim: HF's own model, with seeded random weights, is saved as safetensors and
loaded strictly into the fixture (so the checkpoint names are identical), and both give the same
logits on a batch, on a left-padded batch and through the fixture's own tuple-cache decoding.
The last test ports each fixture with `porter port` and checks it with `porter verify` against that
architecture at tp=1 and tp=2.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig
from typer.testing import CliRunner

import porter.cli
from porter.cli import app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=997,
    max_position_embeddings=256,
)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def _ember_config(module: ModuleType, reference: PretrainedConfig) -> PretrainedConfig:
    """The remote-code file's own config class, filled from the Llama reference config."""
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "pad_token_id",
    )
    return module.EmberConfig(
        **{name: getattr(reference, name) for name in fields},
        rope_theta=reference.rope_parameters["rope_theta"],
    )


@dataclass(frozen=True)
class Fixture:
    file: str
    reference_type: str  # transformers model type whose causal-LM class the fixture matches
    reference_class: str
    causal_lm: str  # the fixture's causal-LM class
    overrides: dict = field(default_factory=dict)  # small reference config settings
    config_for: Callable[[ModuleType, PretrainedConfig], PretrainedConfig] | None = None

    @property
    def path(self) -> Path:
        return FIXTURES / self.file


LLAMA_LEGACY = Fixture(
    "modeling_llama_legacy.py",
    "llama",
    "LlamaForCausalLM",
    "LlamaForCausalLM",
    # GQA, and a rope_theta that is not the default, read from 5.x's rope_parameters
    dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)
GPT_NEOX_LEGACY = Fixture(
    "modeling_gpt_neox_legacy.py",
    "gpt_neox",
    "GPTNeoXForCausalLM",
    "GPTNeoXForCausalLM",
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5}),
)
GPT_NEOX_LEGACY_SEQUENTIAL = Fixture(
    "modeling_gpt_neox_legacy.py",
    "gpt_neox",
    "GPTNeoXForCausalLM",
    "GPTNeoXForCausalLM",
    dict(use_parallel_residual=False),
)
REMOTE_CODE = Fixture(
    "modeling_remote_code_style.py",
    "llama",
    "LlamaForCausalLM",
    "EmberForCausalLM",
    dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    config_for=_ember_config,
)

FAITHFULNESS_CASES = {
    "llama_legacy": LLAMA_LEGACY,
    "gpt_neox_legacy": GPT_NEOX_LEGACY,
    "gpt_neox_legacy_sequential_residual": GPT_NEOX_LEGACY_SEQUENTIAL,
    "remote_code_style": REMOTE_CODE,
}


def _load_fixture_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"porter_fixture_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Pair:
    reference: torch.nn.Module
    fixture: torch.nn.Module
    vocab_size: int


@pytest.fixture(scope="module", params=list(FAITHFULNESS_CASES), ids=list(FAITHFULNESS_CASES))
def pair(request, tmp_path_factory) -> Pair:
    """HF's model with seeded random weights, and the fixture loaded strictly from HF's checkpoint."""
    case = FAITHFULNESS_CASES[request.param]
    config = AutoConfig.for_model(case.reference_type, **SMALL, **case.overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = getattr(transformers, case.reference_class)(config).float().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            gains = param.dim() == 1 and bool(torch.all(param == 1))
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if gains else 0.08 * noise)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory, safe_serialization=True)
    checkpoint = load_file(directory / "model.safetensors")

    module = _load_fixture_module(case.path)
    fixture_config = case.config_for(module, config) if case.config_for else config
    fixture = getattr(module, case.causal_lm)(fixture_config).float().eval()
    # strict: every checkpoint name is a fixture parameter and every parameter is in the checkpoint
    fixture.load_state_dict(checkpoint, strict=True)
    return Pair(reference, fixture, config.vocab_size)


def test_fixture_matches_hf_logits(pair):
    ids = torch.randint(0, pair.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pair.reference(input_ids=ids).logits
        got = pair.fixture(input_ids=ids).logits
        as_tuple = pair.fixture(input_ids=ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected, **TOLERANCE)


def test_fixture_matches_hf_on_a_left_padded_batch(pair):
    ids = torch.randint(0, pair.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = pair.reference(
            input_ids=ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits
        got = pair.fixture(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
    real = attention_mask.bool()  # padded rows attend to nothing: their logits mean nothing in either
    torch.testing.assert_close(got[real], expected[real], **TOLERANCE)


def test_fixture_tuple_cache_decoding_matches_hf_without_cache(pair):
    ids = torch.randint(0, pair.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    prompt = 7
    with torch.no_grad():
        expected = pair.reference(input_ids=ids).logits
        out = pair.fixture(input_ids=ids[:, :prompt], use_cache=True)
        assert isinstance(out.past_key_values, tuple) and len(out.past_key_values) == 2
        torch.testing.assert_close(out.logits, expected[:, :prompt], **TOLERANCE)
        for step in range(prompt, ids.shape[1]):
            out = pair.fixture(
                input_ids=ids[:, step : step + 1], past_key_values=out.past_key_values, use_cache=True
            )
            torch.testing.assert_close(out.logits[:, -1], expected[:, step], **TOLERANCE)


# --- porter port + porter verify ---------------------------------------------------------------

# `porter verify` is told its reference with `--reference MODEL_TYPE`: the port's header says
# `# source: modeling_llama_legacy.py`, and neither "llama_legacy" nor "remote_code_style" is a
# transformers model type (nor is EmberForCausalLM a transformers class).
PORT_CASES = [
    pytest.param(fixture, tp, id=f"{name}-tp{tp}")
    for name, fixture in (
        ("llama_legacy", LLAMA_LEGACY),
        ("gpt_neox_legacy", GPT_NEOX_LEGACY),
        ("remote_code_style", REMOTE_CODE),
    )
    for tp in (1, 2)
]


@dataclass(frozen=True)
class PortRun:
    path: Path
    exit_code: int
    output: str


_ports: dict[str, PortRun] = {}


def _port(fixture: Fixture, directory: Path) -> PortRun:
    """`porter port FIXTURE --out DIR/port_<stem>.py --no-register`, run once per fixture file."""
    if fixture.file not in _ports:
        out = directory / f"port_{fixture.path.stem}.py"
        result = CliRunner().invoke(app, ["port", str(fixture.path), "--out", str(out), "--no-register"])
        _ports[fixture.file] = PortRun(out, result.exit_code, result.output)
    return _ports[fixture.file]


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "tp"), PORT_CASES)
def test_fixture_ports_and_verifies(fixture: Fixture, tp: int, tmp_path_factory, monkeypatch):
    # verify records results for `porter list`; a fixture is no engine model
    monkeypatch.setattr(porter.cli, "_record_verify", lambda *args: None)
    ported = _port(fixture, tmp_path_factory.mktemp("ports"))
    assert ported.exit_code == 0, ported.output
    assert ported.path.is_file()
    result = CliRunner().invoke(
        app,
        ["verify", str(ported.path), "--tp", str(tp), "--steps", "2", "--reference", fixture.reference_type],
    )
    assert result.exit_code == 0, result.output
    assert "passed" in result.output
