"""Check one built fusedclip._C against the torch it was built for, without a GPU: it loads, every op it defines
has a CUDA kernel, and build_info() gives the CUDA version and the archs it was compiled for.

usage: python .ci/check_cuda_extension.py PATH/_C.<abi>.so ARCHS     (ARCHS as the build names them: "8.0;9.0+PTX")

Run by .ci/torch-cuda-build.sh, once for the setup.py build and once for the CMake build.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

# The ops csrc/ops.cpp defines; a new one must be added here (and given a CUDA kernel) for CI to pass.
EXPECTED_OPS = {
    "clamp", "norm", "norm_and_coef", "scale", "scale_per_tensor", "scale_units", "unit_norms",
    "planned_norm", "planned_scale", "planned_clamp",  # a kept plan's calls (the tables alone)
}


def check(path: str, archs: str) -> list[str]:
    problems = []
    before = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedclip::")}
    spec = importlib.util.spec_from_file_location("fusedclip._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers the ops (static initializers of the library)
    defined = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedclip::")} - before
    names = {n.split("::", 1)[1] for n in defined}
    print(f"  ops: {', '.join(sorted(names))}")
    if names != EXPECTED_OPS:
        problems.append(f"ops defined {sorted(names)}, expected {sorted(EXPECTED_OPS)}")
    for name in sorted(defined):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            problems.append(f"{name} has no CUDA kernel")
    info = dict(module.build_info())
    print(f"  build_info: {info}")
    if info.get("cuda_archs") != archs:
        problems.append(f"build_info()['cuda_archs'] is {info.get('cuda_archs')!r}, expected {archs!r}")
    if str(info.get("cuda_version")).split(".")[0] != str(torch.version.cuda).split(".")[0]:
        problems.append(f"built with CUDA {info.get('cuda_version')}, torch has CUDA {torch.version.cuda}")
    if torch.cuda.is_available():
        problems.append("a GPU is visible: this check is meant for a GPU-less machine (the GPU tests cover that one)")
    elif info.get("loaded_binary_arch") is not None:
        problems.append("loaded_binary_arch is set without a GPU")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, archs = argv[1], argv[2]
    print(f"checking {path} (torch {torch.__version__})")
    problems = check(path, archs)
    for p in problems:
        print(f"  PROBLEM: {p}", file=sys.stderr)
    print("  ok" if not problems else f"  {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
