"""The benchmark dispatcher: every option of every selected backend is checked before anything is
measured (on main at 7b1ede4 `--variants ''` and `--threads 0` crashed, and `--backend all
--threads 1` failed only after the whole torch half had run)."""

import json

import pytest

from bnref import bench


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backend", "torch", "--variants", ""], "--variants names no variant"),
        (["--backend", "torch", "--variants", "bnref,nope"], "unknown variants"),
        (["--backend", "torch", "--threads", "0"], "argument --threads: must be >= 1"),
        (["--backend", "torch", "--steps", "0"], "argument --steps: must be >= 1"),
        (["--backend", "torch", "--settle", "nan"], "argument --settle: must be a finite number >= 0"),
        (["--backend", "jax", "--batch-size", "1"], "argument --batch-size: must be >= 2"),
        (["--backend", "all", "--threads", "1"], "unrecognized arguments: --threads 1"),
        (["--backend", "all", "--json", "/no/such/dir/bench.json"], "does not exist"),
    ],
    ids=["variants-empty", "variants-unknown", "threads-0", "steps-0", "settle-nan", "jax-batch-1", "all-threads", "json-dir"],
)
def test_bad_options_fail_before_any_measurement(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and message in captured.err, captured.err
    assert "===" not in captured.out  # nothing was measured


def test_all_backends_write_one_combined_strict_json(tmp_path, monkeypatch, capsys):
    import bnref.jax.bench as jax_bench
    import bnref.torch.bench as torch_bench

    ran = []
    monkeypatch.setattr(torch_bench, "run", lambda args: ran.append("torch") or {"ratios": {"bnref/torch.nn": 0.95}})
    monkeypatch.setattr(jax_bench, "run", lambda args: ran.append("jax") or {"ratios": {"x": float("nan")}})
    out = tmp_path / "bench.json"
    assert bench.main(["--backend", "all", "--json", str(out), "--steps", "3"]) == 0
    assert ran == ["torch", "jax"]
    saved = json.loads(out.read_text())  # one file, both backends (not the second overwriting the first)
    assert saved["torch"]["ratios"] == {"bnref/torch.nn": 0.95}
    assert saved["jax"]["ratios"] == {"x": None, "nonfinite": ["x"]}
