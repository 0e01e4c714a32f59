"""GradClipper: the stateful clip for training loops that clip the same parameters every step."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .arguments import TensorOrTensors, as_list, check_nonnegative, collect_grads, parse_norm_type
from .backends import check_backend_name
from .clip import clip_grad_norm_, clip_norm_of_grads_
from .distributed import GroupArg, ReplicatedArg, parse_groups, parse_replicated


class GradClipper:
    """Clip the global gradient norm of a fixed parameter list; call it once per step.

    Arguments are validated once, here. The parameter list is held once; each call reads the current
    ``.grad`` of every parameter, so replaced, freed (None) or moved gradients are always seen as they are.
    Kernel backends keep their device-side tables cached between calls while the gradients stay in place.

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
        self.parameters: list[Tensor] = as_list(parameters)
        collect_grads(self.parameters)  # type checks now, not at the first step
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

    @torch.no_grad()
    def __call__(self) -> Tensor:
        """Clip in place and return the total norm before clipping."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if self.process_group is not None or any(type(g) is not Tensor for g in grads):
            # Distributed calls, DTensor and other subclasses take the general path.
            return clip_grad_norm_(
                self.parameters, self.max_norm, self.norm_type, self.error_if_nonfinite, backend=self.backend,
                process_group=self.process_group, replicated=self.replicated,
            )
        if not grads:
            return torch.tensor(0.0)
        return clip_norm_of_grads_(grads, self.max_norm, self.norm_type, self.error_if_nonfinite, None, self.backend)

    def __repr__(self) -> str:
        return (
            f"GradClipper({len(self.parameters)} parameters, max_norm={self.max_norm}, "
            f"norm_type={self.norm_type}, backend={self.backend!r})"
        )
