"""How the launchers start a kernel: through Triton's JITFunction the first time a specialisation is seen, then the
compiled kernel directly; and the no-op mode that the host-overhead benchmark measures our host work in.

`kernel[grid](...)` (JITFunction.run) binds and specialises every argument, builds a string key, looks the compiled
kernel up and checks the kernel's globals on every launch. Which compiled kernel a launch gets depends only on the
constexprs, the launch options (num_warps, and OPTIONS below, the same for every launch) and what Triton specialises
a runtime argument on: a tensor's dtype and 16-byte alignment; an int's width (i32, i64, u64) and whether it is 1 or a
multiple of 16 (tests/triton_preflight.py records launches by the same key). `Launcher` keys the CompiledKernel that
run() returned by exactly that (finer than Triton where a parameter is not specialised, never coarser), and calls it
the way run() does next time.
Under Triton's interpreter there is no compiled kernel: every launch goes through run().

Floating-point contraction is set, not left to Triton's default (which TRITON_DEFAULT_FP_FUSION changes, and
triton 3.10 is to change): off, which triton 3.9's TRITON_FORCE_DISABLE_FP_FUSION cannot override either. Every
float operation then rounds as the source writes it, as numpy does under the interpreter, whatever LLVM would fuse (a
kernel that wants an fma must write tl.fma). What that costs: the L2 reduce's x * x + acc is a multiply and an add,
not one fma, in a loop bound by memory. (libdevice's functions keep the fmas they call explicitly.)
tests/test_triton_compile.py checks the PTX: no fma where no libdevice function is inlined.

No-op mode (`stubbed()`): every launch of every Launcher is replaced by a call to a no-op of the same arguments, after
the key lookup, so what remains is the host work of a launch. It needs no GPU (and no interpreter); the kernels do
not run, so their outputs are left as allocated. For measurement only.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import triton.language as tl
from torch import Tensor
from triton import knobs
from triton.runtime import driver

_stubbed = 0  # depth of nested stubbed() blocks

# Compile options of every launch (and of tests/triton_preflight.py's ahead-of-time compiles, which record them);
# read-only, so that the launch keys, which hold them once (_OPTIONS_KEY), stay true.
OPTIONS = MappingProxyType({"enable_fp_fusion": False})


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    """Within this block no kernel of this package runs: each launch is a no-op after its host work."""
    global _stubbed
    _stubbed += 1
    try:
        yield
    finally:
        _stubbed -= 1


def is_stubbed() -> bool:
    return _stubbed > 0


def spec(arg: Any) -> Any:
    """What Triton specialises a runtime argument on (a superset of it: see the module docstring)."""
    if isinstance(arg, Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    if isinstance(arg, bool):
        return "i1", arg
    if isinstance(arg, int):
        width = "i32" if -(1 << 31) <= arg < (1 << 31) else ("u64" if arg >= (1 << 63) else "i64")
        return width, arg == 1, arg & 15 == 0
    if isinstance(arg, float):
        return "fp32"
    return type(arg), arg  # anything else by value (hashable or not: then it fails loudly, never silently)


class _NoOp:
    """A stand-in compiled kernel for stubbed(): takes what a CompiledKernel's launcher takes, does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def launch_metadata(*args: Any) -> None:
        return None

    @staticmethod
    def run(*args: Any) -> None:
        return None


_NO_OP = _NoOp()
_OPTIONS_KEY = tuple(sorted(OPTIONS.items()))


def _constexpr_flags(kernel: Any) -> tuple[bool, ...]:
    """Per parameter of the kernel, in order: whether it is a tl.constexpr."""
    params = inspect.signature(kernel.fn).parameters.values()
    return tuple(p.annotation is tl.constexpr or p.annotation in ("tl.constexpr", "constexpr") for p in params)


class Launcher:
    """Launches of the @triton.jit kernel `namespace[name]` (a module's globals: looked up at each launch, so a
    test that wraps the module's kernel sees every launch): `launcher(grid, *args, num_warps=...)`, every parameter
    positional (the constexprs too, in the kernel's order)."""

    def __init__(self, namespace: dict, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self.kernel = kernel = namespace[name]
        self.constexpr = _constexpr_flags(kernel)
        self.interpreted = type(kernel).__name__ == "InterpretedFunction"
        self.compiled: dict[tuple, Any] = {}  # key -> CompiledKernel returned by JITFunction.run
        self.stubs: dict[tuple, Any] = {}  # the same keys, seen in stubbed() (kept apart: never launched for real)
        self.direct = 0  # real launches that skipped JITFunction.run

    def key_tail(self, num_warps: int, args: tuple) -> tuple:
        """What picks the compiled kernel, but the device (a launch adds the current one in front)."""
        return (num_warps, _OPTIONS_KEY) + tuple(a if c else spec(a) for a, c in zip(args, self.constexpr))

    def __call__(self, grid: tuple[int, ...], *args: Any, num_warps: int = 4) -> None:
        self.launch(grid, args, self.key_tail(num_warps, args), num_warps)

    def prepare(
        self, grid: tuple[int, ...], args: tuple, num_warps: int = 4, varying: tuple[int, ...] = ()
    ) -> Prepared:
        """This launch with its key worked out once, for a caller that repeats it: every argument the same but those
        at the positions `varying`, passed at each call (see Prepared)."""
        return Prepared(self, grid, args, num_warps, varying)

    def launch(self, grid: tuple[int, ...], args: tuple, tail: tuple, num_warps: int) -> None:
        """Launch with `tail` = self.key_tail(num_warps, args) (worked out by the caller, maybe once for many)."""
        if _stubbed:
            kernel = self.stubs.get(tail)
            if kernel is None:
                kernel = self.stubs[tail] = _NO_OP
            kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, 1, 0, kernel.function, kernel.packed_metadata, None,
                       None, None, *args)
            return
        jit = self.namespace[self.name]
        if self.interpreted or jit is not self.kernel or jit.pre_run_hooks:
            jit[grid](*args, num_warps=num_warps, **OPTIONS)
            return
        device = driver.active.get_current_device()
        key = (device,) + tail
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = jit[grid](*args, num_warps=num_warps, **OPTIONS)
            if kernel is not None and not hasattr(kernel, "result"):  # not an async compile's future
                self.compiled[key] = kernel
            return
        # What JITFunction.run does once it has found the kernel (triton 3.6), with the same hooks.
        stream = driver.active.get_current_stream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        self.direct += 1
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *args), knobs.runtime.launch_enter_hook,
                   knobs.runtime.launch_exit_hook, *args)


class Prepared:
    """One launch repeated by a kept plan (fusedclip.fastpath): the grid, the options and every argument but those at
    `varying` are fixed, and so is the key, worked out here once. `prepared(*values)` launches with `values` at the
    varying positions; a value that Triton would specialise differently from the first one (another dtype or
    alignment) takes the full path of Launcher.__call__ instead, so the key is never wrong."""

    __slots__ = ("launcher", "grid", "args", "num_warps", "varying", "specs", "tail")

    def __init__(self, launcher: Launcher, grid: tuple[int, ...], args: tuple, num_warps: int,
                 varying: tuple[int, ...]) -> None:
        self.launcher, self.grid, self.args, self.num_warps, self.varying = launcher, grid, args, num_warps, varying
        self.specs = tuple(spec(args[i]) for i in varying)
        self.tail = launcher.key_tail(num_warps, args)

    def __call__(self, *values: Any) -> None:
        args = self.args
        if values:
            args = list(args)
            for i, v in zip(self.varying, values):
                args[i] = v
            args = tuple(args)
            if tuple(map(spec, values)) != self.specs:
                self.launcher(self.grid, *args, num_warps=self.num_warps)
                return
        self.launcher.launch(self.grid, args, self.tail, self.num_warps)
