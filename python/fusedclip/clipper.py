"""GradClipper: the stateful clip for training loops that clip the same parameters every step."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch, distributed, fastpath
from .arguments import (
    TensorOrTensors,
    as_list,
    check_nonnegative,
    collect_grads,
    parse_norm_type,
    warn_if_listed_twice,
    warn_if_repeated,
)
from .backends import check_backend_name
from .clip import clip_grad_norm_, clip_norm_
from .distributed import GroupArg, ReplicatedArg, parse_groups, parse_replicated


class GradClipper:
    """Clip the global gradient norm of a fixed parameter list; call it once per step.

    Arguments are validated once, here (a parameter listed twice is reported here, once). The parameter list is
    held once; each call reads the current ``.grad`` of every parameter, so replaced, freed (None) or moved
    gradients are always seen as they are. While every gradient stays where it was, a call checks just that and
    reuses the previous call's plan (fusedclip.fastpath); kernel backends keep their device tables between calls.

    >>> clipper = GradClipper(model.parameters(), max_norm=1.0)
    >>> total = clipper()  # after backward(), before optimizer.step()
    """

    def __init__(
        self,
        parameters: TensorOrTensors,
        max_norm: Union[float, int],
        norm_type: Union[float, int, str] = 2.0,
        *,
        error_if_nonfinite: bool = False,
        backend: Optional[str] = None,
        process_group: GroupArg = None,
        replicated: ReplicatedArg = None,
    ) -> None:
        self.parameters: list[Tensor] = list(as_list(parameters))  # its own: the caller's list may change
        collect_grads(self.parameters)  # type checks now, not at the first step
        self._listed_twice = warn_if_listed_twice(self.parameters, stacklevel=2)
        self.max_norm = check_nonnegative(max_norm, "max_norm")
        self.norm_type = parse_norm_type(norm_type)
        self.error_if_nonfinite = bool(error_if_nonfinite)
        check_backend_name(backend)
        self.backend = backend
        # Distributed (see clip_grad_norm_): checked now; DTensor gradients need neither.
        if replicated is not None and not callable(replicated) and not isinstance(replicated, Tensor):
            replicated = list(replicated)  # a generator is read once, here
        parse_replicated(replicated, parse_groups(process_group))
        self.process_group = process_group
        self.replicated = replicated

    def __call__(self) -> Tensor:
        """Clip in place and return the total norm before clipping."""
        if not torch.compiler.is_compiling():
            call = distributed.find(self.parameters, True, self.backend, None, self.process_group, self.replicated)
            if call is not None:  # distributed (DTensor gradients, process_group): the layout kept, one collective
                with torch.no_grad():
                    return call.clip(self.max_norm, self.norm_type, self.error_if_nonfinite)
        if self.process_group is None and not torch.compiler.is_compiling():
            plan = fastpath.find(self.parameters, True, self.backend, None)
            if plan is not None:
                step = None if self.error_if_nonfinite else dispatch.prepared_clip_norm(
                    plan, self.max_norm, self.norm_type
                )
                if step is not None:
                    return step()  # kernel launches: no no_grad needed (entering one costs more than the step)
                with torch.no_grad():
                    return clip_norm_(plan, self.max_norm, self.norm_type, self.error_if_nonfinite)
        with torch.no_grad():
            return self._general()

    def _general(self) -> Tensor:
        """The call that validates, groups and keeps its plan (fastpath.remember); under no_grad."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if self.process_group is not None or any(type(g) is not Tensor for g in grads):
            # Distributed calls, DTensor and other subclasses take the general path.
            return clip_grad_norm_(
                self.parameters, self.max_norm, self.norm_type, self.error_if_nonfinite, backend=self.backend,
                process_group=self.process_group, replicated=self.replicated,
            )
        if not grads:
            return torch.tensor(0.0)
        if not self._listed_twice:  # (that was said once, at construction) distinct parameters sharing a gradient
            warn_if_repeated(self.parameters, grads, stacklevel=3)
        plan = dispatch.make_plan(grads, self.backend)
        if not torch.compiler.is_compiling():
            fastpath.remember(self.parameters, True, self.backend, None, plan)
        return clip_norm_(plan, self.max_norm, self.norm_type, self.error_if_nonfinite)

    def __repr__(self) -> str:
        return (
            f"GradClipper({len(self.parameters)} parameters, max_norm={self.max_norm}, "
            f"norm_type={self.norm_type}, backend={self.backend!r})"
        )
