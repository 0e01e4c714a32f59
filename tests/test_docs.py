"""The README against the code: the API table's signatures, and the claims about which inputs each function takes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import fusedclip
from reference import random_grads

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_IN_TABLE = {"TorchPatch"}  # the handle patch_torch() returns; users never construct it


def between(text: str, marker: str) -> str:
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    assert start in text and end in text, f"README.md has no {start} ... {end} block"
    return text[text.index(start) + len(start) : text.index(end)]


def rendered_signature(name: str) -> str:
    """`name(params) -> return` as the README shows it: defaults and markers (*), no parameter annotations."""
    obj = getattr(fusedclip, name)
    sig = inspect.signature(obj)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    bare = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    if inspect.isclass(obj) or sig.return_annotation is inspect.Signature.empty:
        return f"{name}{bare}"
    return f"{name}{bare} -> {sig.return_annotation}"


def table_signatures() -> dict[str, str]:
    """name -> the signature written in the first column of the README's API table."""
    found: dict[str, str] = {}
    for line in between(README.read_text(), "api-table").strip().splitlines()[2:]:
        first_cell = line.split(" | ")[0]
        for code in re.findall(r"`([^`]+)`", first_cell):
            name = code.split("(", 1)[0]
            assert name not in found, f"{name} appears twice in the API table"
            found[name] = code
    return found


def test_api_table_lists_every_public_name_with_its_real_signature():
    table = table_signatures()
    public = set(fusedclip.__all__) - NOT_IN_TABLE
    assert set(table) == public, f"missing: {sorted(public - set(table))}, unknown: {sorted(set(table) - public)}"
    wrong = {name: rendered_signature(name) for name in public if table[name] != rendered_signature(name)}
    assert not wrong, "README API table out of date; write these signatures:\n" + "\n".join(
        f"  `{sig}`" for sig in wrong.values()
    )


def params_with_grads(seed: int) -> list[torch.nn.Parameter]:
    params = []
    for g in random_grads(3, seed=seed):
        p = torch.nn.Parameter(torch.ones_like(g))
        p.grad = g
        params.append(p)
    return params


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: fusedclip.clip_grad_norm_(ps, 1.0),
        lambda ps: fusedclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(2.0)),
        lambda ps: fusedclip.clip_grad_value_(ps, 0.5),
        lambda ps: fusedclip.clip_grad_norm_per_tensor_(ps, 1.0),
        lambda ps: fusedclip.GradClipper(ps, 1.0)(),
        lambda ps: fusedclip.adaptive_clip_grad_(ps),
        lambda ps: fusedclip.get_total_norm(p.grad for p in ps) if not isinstance(ps, torch.Tensor)
        else fusedclip.get_total_norm(ps.grad),
        lambda ps: fusedclip.multi_tensor_norm(p.grad for p in ps) if not isinstance(ps, torch.Tensor)
        else fusedclip.multi_tensor_norm(ps.grad),
    ],
)
def test_the_readme_claim_single_tensor_and_generator(call):
    # "The functions that take `parameters` or `tensors` ... also accept a single tensor or a generator"
    single, single_listed = params_with_grads(1), params_with_grads(1)
    generated, listed = params_with_grads(2), params_with_grads(2)
    for got, expected in [(call(single[0]), call([single_listed[0]])), (call(p for p in generated), call(listed))]:
        assert (got is None and expected is None) or torch.equal(got, expected)
    for a, b in zip(single + generated, single_listed + listed):
        assert torch.equal(a.grad, b.grad)


def test_the_readme_claim_clip_by_global_norm_takes_a_list():
    grads = random_grads(2, seed=2)
    with pytest.raises(TypeError, match="list"):
        fusedclip.clip_by_global_norm(grads[0], 1.0)
    clipped, _ = fusedclip.clip_by_global_norm([grads[0], None, grads[1]], 1.0)
    assert clipped[1] is None


def pip_requirements(command: str) -> list[str]:
    """Every requirement named by `pip install` in a shell command line (options and paths left out)."""
    reqs = []
    for part in re.split(r"&&|;|\|\|", command):
        words = part.split()
        if "pip" in words and "install" in words:
            args = words[words.index("install") + 1 :]
            skip_next = False
            for w in args:
                if skip_next:
                    skip_next = False
                elif w in ("--index-url", "--extra-index-url", "-r", "-c"):
                    skip_next = True
                elif not w.startswith("-") and not w.startswith((".", '".')):
                    reqs.append(w.strip('"'))
    return reqs


def test_readme_installs_are_pinned_and_the_test_command_is_all_ci_runs():
    readme = README.read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("## Usage")]
    test_command = [ln for ln in between(readme, "test-command").splitlines() if ln and not ln.startswith("```")]
    assert len(test_command) == 1, test_command
    # Every install names exact versions: an unpinned torch resolves to the newest CUDA build (~2 GB of nvidia-*).
    code = "\n".join(re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S))
    reqs = pip_requirements(code)
    for name in ("torch", "triton", "accelerate", "zclip", "setuptools"):
        pins = {r for r in reqs if re.split(r"[=<>!~]", r)[0] == name}
        assert pins and all(re.fullmatch(rf"{name}==[\d.]+", r) for r in pins), (name, pins)
        assert len(pins) == 1, f"the Quick start installs two versions of {name}: {pins}"
    assert set(pip_requirements(test_command[0])) >= {"accelerate==1.15.0", "zclip==1.0.0"}  # CI's optional tests
    # --no-build-isolation builds with the setuptools installed: one that reads the SPDX license (test below).
    setuptools_pin = [r for r in pip_requirements(test_command[0]) if r.startswith("setuptools==")]
    assert setuptools_pin and tuple(map(int, setuptools_pin[0].split("==")[1].split(".")[:2])) >= (77, 0)
    assert "--index-url https://download.pytorch.org/whl/cpu" in quick_start  # how to take the CPU build
    # CI installs nothing of its own before the README's command: a README user runs exactly what CI runs.
    ci = (README.parent / ".ci" / "run").read_text()
    before = ci[: ci.index("<!-- test-command -->")]
    assert "pip install" not in "\n".join(ln for ln in before.splitlines() if not ln.lstrip().startswith("#"))


def test_the_license_is_an_spdx_expression_the_installed_setuptools_reads():
    """pyproject's `project.license` is the SPDX string (the table form is deprecated: setuptools stops taking it in
    2027); setuptools reads that form from 77 on, and the README's commands pin one that does."""
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(README.parent / "pyproject.toml")
    assert config["project"]["license"] == "BSD-3-Clause", setuptools.__version__
    assert "setuptools>=77" in config["build-system"]["requires"]
