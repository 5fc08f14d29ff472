"""The `porter` command: port, verify, review, list."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from porter.errors import PorterError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Port HF modeling files to the engine and prove them."
)
console = Console()
errors = Console(stderr=True)
if not console.is_terminal:
    # Piped or redirected there is no screen to fit: never cut lines at rich's default 80 columns.
    console.soft_wrap = True

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def _describe_failure(error: BaseException) -> str:
    """`Type: message (at file:line)`, the line being the innermost frame outside torch and
    transformers: usually the generated port's own code. A tensor-parallel worker's failure arrives
    as its traceback's text, read the same way."""
    text = str(error)
    if "Traceback (most recent call last):" in text:
        who, _, worker_traceback = text.partition("\n")
        lines = [line for line in worker_traceback.splitlines() if line.strip()]
        frames = re.findall(r'File "([^"]+)", line (\d+)', worker_traceback)
        own = [f"{file}:{line}" for file, line in frames if not _library_frame(file)]
        where = f" (at {own[-1]})" if own else ""
        return f"{who.rstrip(':')}: {lines[-1].strip() if lines else '(no message)'}{where}"
    message = " ".join(text.split()) or "(no message)"
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not _library_frame(frame.filename):
            where = f" (at {frame.filename}:{frame.lineno})"
            break
    return f"{type(error).__name__}: {message}{where}"


def _library_frame(filename: str) -> bool:
    """A frame of an installed library or of porter or the engine's own machinery, not of a port."""
    return any(
        part in filename
        for part in ("site-packages", "/porter/", "/engine/worker.py", "/engine/model_runner.py")
    )


def _print_table(table: Table) -> None:
    """A table at the terminal's width, or, piped, at its natural width (no cell cut short)."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update(max_width=1_000_000)).maximum
    previous = console.width
    console.width = max(natural, previous)
    try:
        console.print(table)
    finally:
        console.width = previous


def _fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def port(
    source: str = typer.Argument(
        ..., help="A modeling_*.py file, or a model type of the installed transformers."
    ),
    out: Path = typer.Option(
        None, "--out", help="Where to write the port (default: engine/models/<model_type>.py)."
    ),
    no_register: bool = typer.Option(False, "--no-register", help="Do not add it to the engine registry."),
    force: bool = typer.Option(False, "--force", help="Overwrite a file porter did not generate."),
    allow_review: bool = typer.Option(
        False, "--allow-review", help="Write the file even with open review items."
    ),
) -> None:
    """Port SOURCE to an engine model file and register it."""
    from porter.port import port as run_port

    try:
        outcome = run_port(
            source, out, register_model=not no_register, force=force, allow_review=allow_review
        )
    except PorterError as error:
        _fail(str(error))
    index = outcome.result.context.index
    roles = Table(title=f"{outcome.source.display_name} -> {outcome.path}", show_header=True)
    roles.add_column("class")
    roles.add_column("role")
    for name in index.reachable:
        role = (
            "causal LM"
            if name == index.causal_lm
            else "backbone"
            if name == index.backbone
            else "decoder layer"
            if name == index.decoder_layer
            else "attention"
            if name in index.attention
            else "module"
        )
        roles.add_row(name, role)
    console.print(roles)
    counts: dict[str, int] = {}
    for change in outcome.result.changes:
        counts[change.rule] = counts.get(change.rule, 0) + 1
    console.print("rewrites: " + ", ".join(f"{rule} {count}" for rule, count in counts.items()))
    console.print(f"review items: {len(outcome.result.review)}")
    for item in outcome.result.review:
        console.print(f"  [yellow]{item.where}[/]: {item.message}")
    registered = (
        "registered"
        if outcome.registered
        else ("already registered" if not no_register else "not registered")
    )
    console.print(f"{outcome.architecture}: {registered}; ported in {outcome.seconds:.2f} s")


@app.command()
def verify(
    target: str = typer.Argument(
        ..., help="A model type, an architecture name, or the path of a ported file."
    ),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel size (gloo processes on CPU)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    steps: int = typer.Option(8, "--steps", min=1, help="Decode steps after the mixed prefill steps."),
    json_path: Path = typer.Option(None, "--json", help="Also write the results as JSON."),
    seed: int = typer.Option(0, "--seed"),
    reference: str = typer.Option(
        None,
        "--reference",
        help="What to compare with: a transformers model type, a modeling file, or a model directory "
        "with remote code (config.json's auto_map) (default: the model type in the port's header).",
    ),
    reference_python: str = typer.Option(
        None,
        "--reference-python",
        help="Run the reference side in this Python (e.g. a virtualenv with the transformers the "
        "remote code was written for); checkpoint and logits are exchanged through files.",
    ),
    settings: list[str] = typer.Option(
        None,
        "--set",
        help="KEY=VALUE: change an attribute of the small config (a variant of the architecture); "
        "VALUE is a JSON literal or else a string. Repeatable.",
    ),
) -> None:
    """Compare the port's logits with the HF original (random weights) through prefill and decode."""
    import torch

    from porter.output_guard import check_output_file
    from porter.verify.parity import verify_model
    from porter.verify.small_model import parse_overrides
    from porter.verify.target import reference_architecture, resolve_target

    tolerance = TOLERANCE.get(dtype, 0.0)
    if dtype not in TOLERANCE:
        _fail(f"--dtype must be one of {', '.join(TOLERANCE)}, not {dtype}")
    if device not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, not {device}")
    if device == "cuda" and torch.cuda.device_count() < tp:
        _fail(f"--tp {tp} needs {tp} CUDA devices; found {torch.cuda.device_count()}")
    if json_path is not None:
        try:  # before the run, which takes a while: its result must not be lost at the end
            check_output_file(json_path, "--json")
        except PorterError as error:
            _fail(str(error))
    try:
        overrides = parse_overrides(settings or [])
        resolved = resolve_target(target, reference)
        architecture = _causal_lm_class(resolved.port_path)
        model_class = (
            f"{resolved.module}:{architecture}" if resolved.module else f"{resolved.port_path}:{architecture}"
        )
        hf_architecture = (
            architecture if resolved.remote else reference_architecture(resolved.model_type, architecture)
        )
        with tempfile.TemporaryDirectory(prefix="porter-verify-") as work:
            report = verify_model(
                resolved.model_type,
                hf_architecture,
                model_class,
                Path(work),
                tp,
                device,
                getattr(torch, dtype),
                steps,
                seed,
                near_tie=0.0 if dtype == "float32" else tolerance,
                overrides=overrides,
                reference_python=reference_python,
            )
    except PorterError as error:
        _fail(str(error))
    except Exception as error:  # the port (or HF) failed while running: one line, where it broke
        _fail(f"verification could not run: {_describe_failure(error)}")
    table = Table(
        title=f"{architecture}: engine vs HF, tp={tp}, {device}, {dtype} (tolerance {tolerance:g} relative)"
        + "".join(f", {item}" for item in settings or [])
    )
    for column in ("step", "what ran", "max abs err", "max rel err", "greedy agree"):
        table.add_column(column, justify="right" if column != "what ran" else "left")
    for step in report.steps:
        ok = step.max_rel <= tolerance and step.tokens_agree == step.tokens
        style = "" if ok else "red"
        table.add_row(
            str(step.step),
            step.kind,
            f"{step.max_abs:.2e}",
            f"{step.max_rel:.2e}",
            f"{step.tokens_agree}/{step.tokens}",
            style=style,
        )
    console.print(table)
    passed = report.max_rel <= tolerance and report.all_tokens_agree
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "architecture": architecture,
                    "tp": tp,
                    "device": device,
                    "dtype": dtype,
                    "tolerance": tolerance,
                    "passed": passed,
                    "max_rel": report.max_rel,
                    "near_ties": sum(s.near_ties for s in report.steps),
                    "steps": [
                        vars(s) if hasattr(s, "__dict__") else {f: getattr(s, f) for f in s.__slots__}
                        for s in report.steps
                    ],
                },
                indent=2,
            )
        )
    variant = "".join(f"+{key}={json.dumps(value)}" for key, value in sorted(overrides.items()))
    if _is_bundled_port(architecture, resolved.port_path):  # a copy elsewhere says nothing about it
        _record_verify(architecture, tp, device, dtype + variant, report.max_rel, passed)
    if not passed:
        _fail(
            f"parity gap: max relative error {report.max_rel:.2e} (tolerance {tolerance:g}), "
            f"greedy tokens {'agree' if report.all_tokens_agree else 'differ'}"
        )
    ties = sum(step.near_ties for step in report.steps)
    excused = f" ({ties} near ties excused at {dtype})" if ties else ""
    console.print(
        f"[green]passed[/]: max relative error {report.max_rel:.2e}, greedy tokens identical{excused}"
    )


def _causal_lm_class(path: Path) -> str:
    import libcst as cst

    module = cst.parse_module(path.read_text())
    for statement in module.body:
        if isinstance(statement, cst.ClassDef) and any(
            isinstance(s, cst.FunctionDef) and s.name.value == "compute_logits" for s in statement.body.body
        ):
            return statement.name.value
    raise PorterError(f"{path} defines no class with compute_logits")


def _is_bundled_port(architecture: str, port_path: Path) -> bool:
    """Whether `port_path` is the file the engine registry runs for `architecture`."""
    from engine.models.registry import registered_architectures
    from porter.port import bundled_file

    entry = registered_architectures().get(architecture)
    return entry is not None and bundled_file(entry[0]).resolve() == port_path.resolve()


def _record_verify(architecture: str, tp: int, device: str, dtype: str, max_rel: float, passed: bool) -> None:
    """Keeps the last result per architecture for `porter list` (porter.verify.results)."""
    from porter.verify.results import record_result, run_name

    record_result(architecture, run_name(tp, device, dtype), max_rel, passed)


@app.command()
def review(
    target: str = typer.Argument(
        ...,
        metavar="SOURCE|PORT",
        help="A modeling_*.py file, a model directory with remote code, a model type of the installed "
        "transformers, or a checked-in port (engine/models/x.py: its header names the source).",
    ),
    rule: str = typer.Option(None, "--rule", help="Only changes of this rewrite (e.g. tensor-parallel)."),
    where: str = typer.Option(None, "--where", help="Only changes in this class (or Class.method)."),
    diff: bool = typer.Option(False, "--diff", help="Also print the unified diff of source and port."),
    side_by_side: bool = typer.Option(
        False, "--side-by-side", help="Each change as the source's lines next to the port's (wide terminals)."
    ),
    html_path: Path = typer.Option(
        None, "--html", help="Write a self-contained side-by-side review page (open it in a browser)."
    ),
    output_format: str = typer.Option(
        "terminal", "--format", help="terminal, json (porter/review/review.schema.json) or sarif (2.1.0)."
    ),
    output: Path = typer.Option(None, "--output", "-o", help="Write the json or sarif here, not to stdout."),
    source_path: str = typer.Option(
        None, "--source", help="The source of a checked-in port whose header names a file, not a module."
    ),
) -> None:
    """Explain every change a port makes: rule, place in the source and the port, before, after, why."""
    from porter.review.command import run_review

    try:
        run_review(
            console,
            errors,
            target,
            rule=rule,
            where=where,
            diff=diff,
            side_by_side=side_by_side,
            html_path=html_path,
            output_format=output_format,
            output=output,
            source=source_path,
        )
    except PorterError as error:
        _fail(str(error))


@app.command("list")
def list_models() -> None:
    """The architectures registered in the engine and their last verify results."""
    from engine.models.registry import registered_architectures
    from porter.port import ENGINE_MODELS, bundled_file
    from porter.verify.results import load_results

    verified = load_results()
    table = Table(title="registered architectures")
    for column in ("architecture", "file", "source", "last verify"):
        table.add_column(column)
    for architecture, (module, _) in sorted(registered_architectures().items()):
        path = bundled_file(module)
        header = path.read_text().splitlines()[:3] if path.exists() else []
        source = " ".join(line.removeprefix("# ") for line in header[1:3])
        results = verified.get(architecture, {})
        summary = ", ".join(
            f"{k}: {'pass' if v['passed'] else 'FAIL'} ({v['max_rel']:.1e})"
            for k, v in sorted(results.items())
        )
        table.add_row(
            architecture, str(path.relative_to(ENGINE_MODELS.parent.parent)), source, summary or "never"
        )
    _print_table(table)


@app.command()
def serve(
    model_dir: Path = typer.Argument(
        ..., help="A local HF model directory (config.json, safetensors, tokenizer) of a ported architecture."
    ),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel size."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on."),
    port_number: int = typer.Option(8000, "--port", min=1, max=65535, help="The TCP port to listen on."),
    max_model_len: int = typer.Option(None, "--max-model-len", min=1, help="Longest prompt + completion."),
    served_model_name: str = typer.Option(
        None, "--served-model-name", help="The name clients pass as `model` (default: MODEL_DIR as given)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), float32, float16, bfloat16."),
    num_kv_blocks: int = typer.Option(None, "--num-kv-blocks", min=1, help="Fixed KV cache size (blocks)."),
) -> None:
    """Serve MODEL_DIR over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from porter.engine_commands import serve_model

    try:
        serve_model(
            model_dir,
            host,
            port_number,
            served_model_name,
            tensor_parallel_size=tp,
            max_model_len=max_model_len,
            device=device,
            dtype=dtype,
            num_kv_blocks=num_kv_blocks,
        )
    except PorterError as error:
        _fail(str(error))


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="A local HF model directory of a ported architecture."),
    prompt: str = typer.Argument(..., help="The text to continue."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="The most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(-1, "--top-k", help="-1 is off."),
    seed: int = typer.Option(None, "--seed"),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel size."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Print the completion of PROMPT by the model in MODEL_DIR."""
    from porter.engine_commands import generate_text

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    try:
        text = generate_text(model_dir, prompt, sampling, tensor_parallel_size=tp, device=device, dtype=dtype)
    except PorterError as error:
        _fail(str(error))
    print(text)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
