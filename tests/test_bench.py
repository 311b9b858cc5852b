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
def test_bad_options_fail_before_any_measurement(argv, message, usage_error):
    captured = usage_error(bench.main, argv)
    assert message in captured.err, captured.err
    assert "===" not in captured.out  # nothing was measured


def test_all_backends_write_one_combined_strict_json(tmp_path, monkeypatch, capsys):
    import bnref.jax.bench as jax_bench
    import bnref.torch.bench as torch_bench

    ran = []
    monkeypatch.setattr(torch_bench, "run", lambda args: ran.append("torch") or {"ratios": {"bnref/torch.nn": 0.95}})
    monkeypatch.setattr(jax_bench, "run", lambda args: ran.append("jax") or {"ratios": {"x": float("nan")}})
    out = tmp_path / "bench.json"
    assert bench.main(["--backend", "all", "--json", str(out), "--steps", "3", "--synthetic"]) == 0
    assert ran == ["torch", "jax"]
    saved = json.loads(out.read_text())  # one file, both backends (not the second overwriting the first)
    assert saved["torch"]["ratios"] == {"bnref/torch.nn": 0.95}
    assert saved["jax"]["ratios"] == {"x": None, "nonfinite": ["x"]}


@pytest.mark.parametrize("argv,message", [
    (["--data-dir", "{tmp}/typo"], "typo (data_dir argument) does not exist"),
    (["--data-dir", "{tmp}/corrupt"], "bad magic number"),
    (["--data-dir", "{tmp}/corrupt", "--synthetic"], "--synthetic and --data-dir exclude each other"),
], ids=["typo", "corrupt", "both"])  # fmt: skip
def test_bad_data_fails_before_any_measurement_and_is_never_replaced_by_synthetic_data(argv, message, tmp_path,
                                                                                        usage_error, monkeypatch,
                                                                                        corrupt_fashion_dir):
    import bnref.torch.bench as torch_bench

    monkeypatch.setattr(torch_bench, "run", lambda args: pytest.fail("measured despite bad data"))
    err = usage_error(bench.main, ["--backend", "torch", *[a.format(tmp=tmp_path) for a in argv]]).err
    assert message in err and "Traceback" not in err, err


def test_synthetic_data_is_used_only_when_asked_and_said(monkeypatch, capsys):
    import bnref.torch.bench as torch_bench

    seen = []
    monkeypatch.setattr(torch_bench, "run", lambda args: seen.append(args.data.source) or {})
    assert bench.main(["--backend", "torch", "--synthetic"]) == 0
    assert seen == ["synthetic(seed=0)"] and "NOT Fashion-MNIST" in capsys.readouterr().out
