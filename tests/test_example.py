"""The examples: the tiny GPT (a few steps of each clip mode on CPU give the same losses and norms) and the
mixture-of-experts clip on four gloo ranks."""

import importlib.util
import math
import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "train_tiny_gpt.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_tiny_gpt", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_modes_agree(example, tmp_path):
    runs = {m: example.train(m, steps=6, batch=4, context=32, quiet=True) for m in ("torch", "fusedclip", "fused-step")}
    ref = runs["torch"]["records"]
    assert any(r["total_norm"] > 0.5 for r in ref), "the clip never engaged; the comparison would prove nothing"
    for mode in ("fusedclip", "fused-step"):
        for a, b in zip(ref, runs[mode]["records"]):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (mode, a["step"])
            assert math.isclose(a["total_norm"], b["total_norm"], rel_tol=1e-4), (mode, a["step"])
            assert len(b["per_layer"]) == len(runs[mode]["names"])
    # The per-layer norms combine to the total (2-norm of the per-tensor norms).
    r = ref[0]
    assert math.isclose(math.sqrt(sum(v * v for v in r["per_layer"])), r["total_norm"], rel_tol=1e-4)
    # Loss goes down a little even in six steps.
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_plot_or_message(example, tmp_path, capsys):
    result = example.train("fused-step", steps=2, batch=2, context=16, quiet=True)
    path = tmp_path / "norms.png"
    wrote = example.write_plot(result, str(path), 0.5, quiet=True)
    if wrote:
        assert path.stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in capsys.readouterr().out


def _moe_example(rank: int, world: int) -> None:
    spec = importlib.util.spec_from_file_location("moe_clip", EXAMPLES / "moe_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(pp=2)  # checks its totals and gradients itself (float64 reference, torchtitan)
    without = os.environ.get("FUSEDCLIP_TEST_WITHOUT_TORCHTITAN", "") == "1"  # (see tests/test_moe_parallel.py)
    assert out["meshes"] == 2 and (without or out["torchtitan"] is not None), out
    assert math.isclose(out["total"], out["reference"], rel_tol=1e-5), out


def test_moe_example_four_ranks():
    from test_distributed import launch

    launch(_moe_example, 4)
