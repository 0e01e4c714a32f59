"""The command line: bench writes a complete, truthful record; info names every backend."""

import json
import subprocess
import sys

import pytest

from fusedclip import __main__ as cli
from fusedclip.presets import PRESETS


def test_presets_match_their_architectures():
    # Parameter counts of the real models these configs describe.
    assert (PRESETS["gpt2"].tensors, PRESETS["gpt2"].params) == (148, 124_439_808)
    assert PRESETS["llama-1b"].params == 1_235_814_400
    assert PRESETS["llama-7b"].params == 6_738_415_616
    assert PRESETS["many-small"].tensors >= 2000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_writes_record(tmp_path, capsys, dtype):
    out = tmp_path / "sub" / "record.json"
    rc = cli.main(["bench", "--preset", "tiny", "--dtype", dtype, "--device", "cpu", "--reps", "3", "--out", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    impls = {r["impl"] for r in record["results"]}
    assert {"torch foreach", "torch loop", "fusedclip torch"} <= impls
    assert {r["case"] for r in record["results"]} == {"clip", "noclip"}
    assert record["preset"]["tensors"] == PRESETS["tiny"].tensors and record["preset"]["dtype"] == dtype
    assert record["copy_bandwidth_GBps"] > 0 and record["environment"]["torch"]
    for r in record["results"]:
        assert r["matched"], r
        assert r["median_ms"] > 0 and r["GBps"] > 0
        assert r["speedup_vs_torch_foreach"] is not None
        if r["impl"].startswith("fusedclip"):
            assert r["total_dtype"] == "float32"
    table = capsys.readouterr().out
    assert "fusedclip torch" in table and "vs torch" in table
    assert cli.main(["table", str(out)]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| record |") and len(md) == 2 + 2  # header, rule, one row per case
    assert all(str(out) in line and "fusedclip torch" in line for line in md[2:])


def test_bench_refuses_what_does_not_fit(monkeypatch):
    import fusedclip.bench

    monkeypatch.setattr(fusedclip.bench, "free_memory", lambda device: 1 << 30)
    with pytest.raises(SystemExit, match="GiB"):
        cli.main(["bench", "--preset", "gpt2", "--device", "cpu"])


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--preset", "gpt5"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--preset", "tiny", "--reps", "0"])
    with pytest.raises(SystemExit, match="unknown or unavailable"):
        cli.main(["bench", "--preset", "tiny", "--device", "cpu", "--impl", "fusedclip cudnn"])


def test_info_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "fusedclip", "info", "--json"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    info = json.loads(out)
    assert "torch" in info["available_backends"]
    assert set(info["available_backends"]) | set(info["unavailable_backends"]) == {"cuda", "triton", "torch"}
