"""Remote code's own modules travel with its port.

A remote-code modeling file imports modules of its directory (its configuration, helpers). What the
port still imports of them is copied, with the sibling modules those import in turn, into a package
next to the port (`<port>_code/`), which the port imports relatively; the copies are the files as
they are, so the port runs the same helper code as the original.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from porter.analysis.source import SourceFile, sibling_imports
from porter.errors import PorterError

MARKER = "# copied by porter from a remote-code model directory; re-run porter port to refresh\n"


def imported_siblings(source: SourceFile, port_text: str) -> list[str]:
    """The sibling modules the port imports, with those they import in turn, in a stable order."""
    package = source.sibling_package
    wanted = []
    for node in ast.walk(ast.parse(port_text)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            head, _, rest = node.module.partition(".")
            if head == package and rest:
                wanted.append(rest.split(".")[0])
    found: list[str] = []
    while wanted:
        name = wanted.pop(0)
        if name in found:
            continue
        found.append(name)
        path = source.path.parent / f"{name}.py"
        wanted += [n for n in sibling_imports(path, path.read_text()) if n not in found]
    return found


def check_sibling_package(source: SourceFile, out: Path, force: bool) -> None:
    """Refuses to write into a folder next to `out` that porter did not make (before anything is
    written)."""
    init = out.parent / source.sibling_package / "__init__.py"
    if init.parent.exists() and not force and not (init.is_file() and init.read_text().startswith(MARKER)):
        raise PorterError(f"{init.parent} exists and was not made by porter; --force overwrites it")


def copy_siblings(source: SourceFile, port_text: str, out: Path) -> list[Path]:
    """Copies the siblings the port imports into `<out's folder>/<package>/`; returns the copies."""
    names = imported_siblings(source, port_text)
    if not names:
        return []
    package = out.parent / source.sibling_package
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(MARKER)
    copies = []
    for name in names:
        target = package / f"{name}.py"
        shutil.copyfile(source.path.parent / f"{name}.py", target)
        copies.append(target)
    return copies
