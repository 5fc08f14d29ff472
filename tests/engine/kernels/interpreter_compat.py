"""Lets Triton 3.6's interpreter run loops whose bounds were loaded from memory under NumPy >= 2.4.

The interpreter turns a scalar into a Python int with `int(array)`, and the scalar a `tl.load`
returns is a one-element array, which NumPy 2.4 no longer converts (triton-lang/triton#9171,
fixed upstream after 3.6 by squeezing the array first). Import this before any kernel runs; on a
Triton without the old conversion it changes nothing.
"""

from __future__ import annotations

import triton.runtime.interpreter as interpreter

_patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)

if _patch_lang_tensor is not None:

    def _patch_with_squeezed_index(tensor, scope) -> None:
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_with_squeezed_index
