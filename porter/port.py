"""`porter port`: source in, formatted engine model file out, registered."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from porter.analysis.source import SourceFile, locate
from porter.emit import format_code, header, write_atomically
from porter.errors import PorterError
from porter.output_guard import check_writable_target, registry_conflicts
from porter.pipeline import PortResult, port_source
from porter.register import REGISTRY_PATH, register, registered
from porter.siblings import check_sibling_package, copy_siblings

ENGINE_MODELS = Path(__file__).resolve().parent.parent / "engine" / "models"


def bundled_file(module: str) -> Path:
    """The file of a registry module path (`engine.models.opt` -> engine/models/opt.py)."""
    return ENGINE_MODELS / f"{module.rsplit('.', 1)[-1]}.py"


@dataclass(slots=True)
class PortOutcome:
    source: SourceFile
    result: PortResult
    path: Path | None
    architecture: str
    registered: bool
    seconds: float


def generate(source: SourceFile, allow_review: bool = False) -> tuple[str, PortResult]:
    """The generated file's full text (header, formatted code) and what the port did."""
    result = port_source(source, allow_review)
    if result.review and not allow_review:
        first = result.review[0]
        more = f" (and {len(result.review) - 1} more)" if len(result.review) > 1 else ""
        raise PorterError(
            f"cannot port {first.where}: {first.message}{more}; --allow-review writes it anyway"
        )
    if not result.review:
        # The file as it will be written is what the check runs, and what is returned when it passes.
        text = format_code(header(source.display_name) + "\n" + result.code)
        _check_runs(text, source, result)
        if not result.review:
            return text, result
        if not allow_review:
            item = result.review[0]
            raise PorterError(f"cannot port {item.where}: {item.message}; --allow-review writes it anyway")
    code = header(source.display_name) + "\n" + _mark_review_items(result)
    return format_code(code), result


def _check_runs(text: str, source: SourceFile, result: PortResult) -> None:
    """Builds and runs the port once on a small config (porter.verify.smoke); a failure becomes a
    review item naming the line, so no port is written as if it were fine and then fails to run."""
    from porter.verify.smoke import place_of, smoke_check

    failure = smoke_check(text, source, result.context.index.causal_lm)
    if failure is not None:
        where, code = place_of(text, failure.line)
        at = f" at `{code}`" if code else ""
        result.context.flag(
            "check", where, f"the port fails on a small config{at} (prefill + decode): {failure.message}"
        )


def _mark_review_items(result: PortResult) -> str:
    if not result.review:
        return result.code
    notes = "".join(f"# REVIEW {item.where}: {' '.join(item.message.split())}\n" for item in result.review)
    return notes + "\n" + result.code


def default_output(source: SourceFile) -> Path:
    if not source.model_type:
        raise PorterError("cannot tell the model type from the source's name; pass --out")
    return ENGINE_MODELS / f"{source.model_type}.py"


def port(
    source_arg: str,
    out: Path | None = None,
    register_model: bool = True,
    force: bool = False,
    allow_review: bool = False,
) -> PortOutcome:
    started = time.perf_counter()
    source = locate(source_arg)
    out = out or default_output(source)
    check_writable_target(out, force)
    if source.siblings:
        source = replace(source, support_package=f"{out.stem}_code")
        check_sibling_package(source, out, force)
    module = _module_name(out)
    if register_model and module is None:
        # Checked before anything is written: a port that cannot be registered leaves no file behind.
        raise PorterError(
            f"{out} is outside engine/models; register it with engine.models.registry.register_model, "
            "or pass --no-register"
        )
    text, result = generate(source, allow_review)
    architecture = result.context.index.causal_lm
    entries = registered(REGISTRY_PATH)
    displaced = registry_conflicts(
        out,
        module,
        architecture,
        source.display_name,
        entries,
        {entry_module: bundled_file(entry_module) for entry_module, _ in entries.values()},
        force,
    )
    previous = out.read_bytes() if out.is_file() else None
    _write(out, text)
    copy_siblings(source, text, out)
    try:
        registered_now = (
            register(architecture, module, architecture, REGISTRY_PATH, drop=displaced)
            if register_model
            else False
        )
    except (OSError, PorterError) as error:
        # The registry still names what `out` held: put it back rather than leave an entry pointing at nothing.
        if previous is None:
            out.unlink(missing_ok=True)
        else:
            out.write_bytes(previous)
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise PorterError(
            f"cannot update the registry {REGISTRY_PATH}: {reason}; {out} is unchanged"
        ) from None
    return PortOutcome(source, result, out, architecture, registered_now, time.perf_counter() - started)


def _write(out: Path, text: str) -> None:
    try:
        write_atomically(out, text)
    except OSError as error:  # a read-only filesystem, no permission, a path through a file
        raise PorterError(f"cannot write {out}: {error.strerror or error}") from None


def _module_name(path: Path) -> str | None:
    try:
        relative = path.resolve().relative_to(ENGINE_MODELS)
    except ValueError:
        return None
    return "engine.models." + ".".join(relative.with_suffix("").parts)
