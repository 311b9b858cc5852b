"""The cross-backend parity matrix, one test per cell, so a failing cell names itself."""

import json

import pytest

from bnref import parity, spec

CELLS = [
    (p, l, d, i)
    for p in spec.PRESETS
    for l in parity.LAYOUTS
    for d in parity.DTYPES
    for i in parity.IMPLEMENTATIONS
]


def _expressible(preset, impl):
    running_var = spec.PRESETS[preset].running_var
    if impl == "torch.nn":
        return running_var == "unbiased"
    if impl == "flax.linen":
        return running_var == "biased"
    return True


@pytest.mark.parametrize("preset,layout,dtype,impl", CELLS, ids=["-".join(c) for c in CELLS])
def test_parity_cell(preset, layout, dtype, impl):
    r = parity.run_cell(preset, layout, dtype, impl)
    if not _expressible(preset, impl):
        # Shown in the table, with the reason: never silently hidden.
        assert r.status == "not expressible", r
        assert "running average" in r.reason
        return
    assert r.status == "pass", r.reason
    assert set(r.errors) == {"forward/y", "state/running_mean", "state/running_var", "backward/dx",
                             "backward/dgamma", "backward/dbeta", "eval/y"}  # fmt: skip


def test_cli_table_and_json(capsys):
    args = ["--preset", "torch", "--dtype", "float64"]
    assert parity.main(args) == 0
    out = capsys.readouterr().out
    assert "not expressible: flax.linen always uses the biased variance" in out
    assert "NCHW/NHWC" in out and "eval y" in out
    assert parity.main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(parity.LAYOUTS) * len(parity.IMPLEMENTATIONS)
    assert {r["status"] for r in rows} == {"pass", "not expressible"}


def test_cli_fails_on_a_broken_implementation(monkeypatch, capsys):
    import bnref.torch._runners as runners

    real = runners.run_functional

    def off_by_a_bit(inputs, convention, axis, dtype, train):
        out = dict(real(inputs, convention, axis, dtype, train))
        out["y"] = out["y"] + 1e-3
        return out

    monkeypatch.setattr(runners, "run_functional", off_by_a_bit)
    assert parity.main(["--preset", "d2l", "--dtype", "float32", "--impl", "bnref.torch"]) == 1
    assert "forward/y (bnref.torch, preset=d2l, NCHW, float32, step 0)" in capsys.readouterr().out
