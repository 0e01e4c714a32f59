"""patch_torch(): make code that calls torch.nn.utils' clip functions use fusedclip's, without editing it.

The names are replaced on the modules, so callers that look them up at call time (``torch.nn.utils.clip_grad_norm_``
as Hugging Face accelerate, Lightning and most training scripts do) see fusedclip. A name bound earlier with
``from torch.nn.utils import clip_grad_norm_`` keeps pointing at torch's function.
"""

from __future__ import annotations

import threading
import warnings
from types import ModuleType
from typing import Any, Callable, Optional

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import clip

# torch name -> fusedclip replacement.
_REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "clip_grad_norm_": clip.clip_grad_norm_,
    "clip_grad_value_": clip.clip_grad_value_,
    "get_total_norm": clip.get_total_norm,
    "clip_grads_with_norm_": clip.clip_grads_with_norm_,
}
# torch.nn.utils.clip_grad holds get_total_norm / clip_grads_with_norm_ under private names (torch 2.6+), and its
# clip_grad_norm_ calls them from there; a torch that makes them public is covered by the public names.
_PRIVATE_ALIASES = {"get_total_norm": "_get_total_norm", "clip_grads_with_norm_": "_clip_grads_with_norm_"}

# torch's own four functions as they were when fusedclip was imported (before any patch): what the benchmark
# and the tests compare against, whatever the patch state.
TORCH_ORIGINALS: dict[str, Callable[..., Any]] = {name: getattr(torch.nn.utils, name) for name in _REPLACEMENTS}

_lock = threading.Lock()
_active: Optional["TorchPatch"] = None


def _targets() -> list[tuple[ModuleType, str, str]]:
    """(module, attribute, public name) for every place torch keeps one of the four functions."""
    out = []
    for name in _REPLACEMENTS:
        for module in (torch.nn.utils, torch.nn.utils.clip_grad):
            if hasattr(module, name):
                out.append((module, name, name))
        private = _PRIVATE_ALIASES.get(name)
        if private is not None and hasattr(torch.nn.utils.clip_grad, private):
            out.append((torch.nn.utils.clip_grad, private, name))
    return out


class TorchPatch:
    """Handle returned by :func:`patch_torch`. ``unpatch()`` or leaving a ``with`` block restores torch's functions.

    Only the handle that did the patching undoes it: in nested ``with patch_torch():`` blocks the inner exit
    leaves the patch in place for the outer block.
    """

    def __init__(self, saved: list[tuple[ModuleType, str, Any]], owner: bool) -> None:
        self._saved = saved  # (module, attribute, what was there before)
        self._owner = owner

    @property
    def active(self) -> bool:
        """Whether torch's functions are currently replaced by fusedclip's."""
        return _active is not None

    def unpatch(self) -> bool:
        """Undo the patch if this handle made it and it is still in place; returns whether anything was undone."""
        if not self._owner:
            return False
        with _lock:
            return _restore(self)

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"TorchPatch(active={self.active}, owner={self._owner}, names={sorted(_REPLACEMENTS)})"


def _restore(handle: TorchPatch) -> bool:
    """Put back what `handle` replaced. Must hold _lock."""
    global _active
    if _active is not handle:
        return False
    for module, attr, original in handle._saved:
        current = getattr(module, attr, None)
        ours = _REPLACEMENTS.get(attr) or _REPLACEMENTS.get(_public(attr))
        if current is not ours:
            # Someone replaced our function after us: leave theirs, it may wrap ours or torch's.
            warnings.warn(
                f"{module.__name__}.{attr} was replaced after fusedclip.patch_torch(); leaving it as it is",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        setattr(module, attr, original)
    _active = None
    return True


def _public(attr: str) -> str:
    for public, private in _PRIVATE_ALIASES.items():
        if private == attr:
            return public
    return attr


def patch_torch() -> TorchPatch:
    """Replace ``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and ``clip_grads_with_norm_`` in
    ``torch.nn.utils`` and ``torch.nn.utils.clip_grad`` with fusedclip's drop-ins.

    Calling it again while patched changes nothing and returns a handle that does not own the patch.

    Returns
    -------
    TorchPatch
        Use ``handle.unpatch()``, :func:`unpatch_torch` or ``with patch_torch(): ...`` to restore torch's functions.

    Examples
    --------
    >>> import fusedclip, torch
    >>> with fusedclip.patch_torch():
    ...     total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # runs fusedclip
    """
    global _active
    with _lock:
        if _active is not None:
            return TorchPatch(_active._saved, owner=False)
        saved = []
        for module, attr, public in _targets():
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, _REPLACEMENTS[public])
        _active = TorchPatch(saved, owner=True)
        return _active


def unpatch_torch() -> bool:
    """Restore torch's own functions exactly as they were before :func:`patch_torch`; returns whether it was
    patched."""
    with _lock:
        return _active is not None and _restore(_active)


def is_patched() -> bool:
    """Whether :func:`patch_torch` is in effect."""
    return _active is not None
