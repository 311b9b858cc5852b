"""The benchmark dispatcher: every option of every selected backend is checked before anything is
measured (on main at 7b1ede4 `--variants ''` and `--threads 0` crashed, and `--backend all
--threads 1` failed only after the whole torch half had run)."""

import json
import re

import pytest

from bnref import bench


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backend", "torch", "--variants", ""], "--variants names no variant"),
        (["--backend", "torch", "--variants", "bnref,nope"], "unknown variants"),
        (["--backend", "torch", "--variants", "bnref+compiled,bnref+compiled"], "names a variant twice"),
        (["--backend", "torch", "--variants", "seed+compiled"], "unknown variants ['seed+compiled']"),
        (["--backend", "torch", "--threads", "0"], "argument --threads: must be >= 1"),
        (["--backend", "torch", "--steps", "0"], "argument --steps: must be >= 1"),
        (["--backend", "torch", "--settle", "nan"], "argument --settle: must be a finite number >= 0"),
        (["--backend", "jax", "--batch-size", "1"], "argument --batch-size: must be >= 2"),
        (["--backend", "all", "--threads", "1"], "unrecognized arguments: --threads 1"),
        (["--backend", "all", "--json", "/no/such/dir/bench.json"], "does not exist"),
        (["--backend", "jax", "--variants", "bnref BN,nope"], "unknown variant(s) ['nope']"),
        (["--backend", "jax", "--steps-per-call", "0"], "argument --steps-per-call: must be >= 1"),
        (["--backend", "jax", "--device", "cuda"], "device 'cuda' is not available"),
        (["--backend", "torch", "--device", "cuda"], "device 'cuda' is not available"),
        (["--backend", "nnx", "--variants", "bnref BN"], "unknown variant(s) ['bnref BN']"),
        (["--backend", "nnx", "--steps-per-call", "0"], "argument --steps-per-call: must be >= 1"),
        (["--backend", "nnx", "--device", "cuda"], "device 'cuda' is not available"),
        (["--backend", "nnx", "--rounds", "0"], "argument --rounds: must be >= 1"),
        (["--backend", "nnx", "--threads", "1"], "unrecognized arguments: --threads 1"),
    ],
    ids=["variants-empty", "variants-unknown", "variants-twice", "seed-compiled", "threads-0", "steps-0", "settle-nan",
         "jax-batch-1", "all-threads", "json-dir", "jax-variants-unknown", "jax-steps-per-call-0", "jax-device-cuda",
         "torch-device-cuda", "nnx-variants-jax-s", "nnx-steps-per-call-0", "nnx-device-cuda", "nnx-rounds-0",
         "nnx-threads"],
)
def test_bad_options_fail_before_any_measurement(argv, message, usage_error):
    captured = usage_error(bench.main, argv)
    assert message in captured.err, captured.err
    assert "===" not in captured.out  # nothing was measured


def test_all_backends_write_one_combined_strict_json(tmp_path, monkeypatch, capsys):
    import bnref.jax.bench as jax_bench
    import bnref.nnx.bench as nnx_bench
    import bnref.torch.bench as torch_bench

    ran = []
    monkeypatch.setattr(torch_bench, "run", lambda args: ran.append("torch") or {"ratios": {"bnref/torch.nn": 0.95}})
    monkeypatch.setattr(jax_bench, "run", lambda args: ran.append("jax") or {"ratios": {"x": float("nan")}})
    monkeypatch.setattr(nnx_bench, "run", lambda args: ran.append("nnx") or {"ratios": {"bnref.nnx BN / flax.nnx BN": 1.0}})
    out = tmp_path / "bench.json"
    assert bench.main(["--backend", "all", "--json", str(out), "--steps", "3", "--synthetic"]) == 0
    assert ran == ["torch", "jax", "nnx"]
    saved = json.loads(out.read_text())  # one file, every backend (not the last overwriting the others)
    assert saved["torch"]["ratios"] == {"bnref/torch.nn": 0.95}
    assert saved["jax"]["ratios"] == {"x": None, "nonfinite": ["x"]}
    assert saved["nnx"]["ratios"] == {"bnref.nnx BN / flax.nnx BN": 1.0}


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


def test_torch_variant_names_say_bn_step_and_precision():
    from bnref.torch import bench as torch_bench

    assert torch_bench.describe("torch.nn+compiled+bfloat16") == {"bn": "torch.nn", "compiled": True, "precision": "bfloat16"}
    assert torch_bench.describe("none") == {"bn": "none", "compiled": False, "precision": "float32"}
    assert set(torch_bench.DEFAULT_VARIANTS) <= set(torch_bench.VARIANTS)
    assert torch_bench.parse_args(["--variants", "all", "--device", "cpu"]).variants == list(torch_bench.VARIANTS)
    with pytest.raises(ValueError, match="not a loop variant: 'seed'"):
        torch_bench.describe("seed")


@pytest.mark.usefixtures("torch_one_thread")
def test_torch_compiled_and_bfloat16_variants_report_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    variants = "bnref,bnref+compiled,torch.nn+compiled,bnref+bfloat16,bnref+compiled+bfloat16"
    assert bench.main(["--backend", "torch", "--synthetic", "--steps", "2", "--rounds", "2", "--warmup", "1",
                       "--batch-size", "32", "--device", "cpu", "--variants", variants, "--json", str(out),
                       "--no-memory"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "compile s" in text and "TF32 off" in text
    for v in variants.split(","):  # a row each: median, min, max, compile seconds ('-' for eager)
        compiled = r"\d+\.\d" if "compiled" in v else "-"
        assert re.search(rf"^{re.escape(v)}\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\s+{compiled}$", text, re.M), (v, text)
    for a, b in [("bnref+compiled", "bnref"), ("bnref+compiled", "torch.nn+compiled"), ("bnref+bfloat16", "bnref"),
                 ("bnref+compiled+bfloat16", "bnref+compiled")]:  # fmt: skip
        assert re.search(rf"^ratio {re.escape(a)} / {re.escape(b)}: \d+\.\d\d$", text, re.M), (a, b)
    saved = json.loads(out.read_text())["variants"]
    assert list(saved) == variants.split(",")
    assert saved["bnref+compiled+bfloat16"]["precision"] == "bfloat16" and saved["bnref+compiled+bfloat16"]["compiled"]
    for v, row in saved.items():
        assert len(row["examples_per_sec"]) == 2 and row["examples_per_sec_median"] > 0
        assert (row["compile_seconds"] > 0) == ("compiled" in v), v


# --- issue 18: the distance to the hardware's limit -------------------------------------------------


def test_lenet_flops_per_training_example_are_counted_from_its_layers():
    from bnref import hardware

    forward_macs = 86_400 + 153_600 + 30_720 + 10_080 + 840  # conv1, conv2, fc1, fc2, fc3
    assert hardware.lenet_train_flops() == 3 * 2 * forward_macs == 1_689_840


def test_peak_figures_name_their_source_and_an_unknown_device_has_none():
    from bnref import hardware

    assert hardware.peak_flops("NVIDIA H200", "bfloat16") == (989e12, "H200 data-sheet dense bfloat16 peak")
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "float32")[0] == 67e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "float32", tf32=True)[0] == 495e12
    peak, why = hardware.peak_flops("cpu")
    assert peak is None or (peak > 1e9 and "cores x" in why)
    assert hardware.peak_flops("Some TPU") == (None, "no peak figure known for 'Some TPU'")


def test_the_bench_prints_each_variant_s_fraction_of_peak():
    from bnref import bench as dispatcher

    result = {"device": "cuda:0", "device_kind": "NVIDIA H200", "tf32": False,
              "examples_per_sec": {"bnref": [1e6, 3e6, 2e6], "bnref+bfloat16": 4e6}}  # fmt: skip
    rows = dispatcher.distance_to_peak(result)
    assert rows["bnref"]["achieved_flops"] == 2e6 * 1_689_840  # the median of the rounds
    assert rows["bnref"]["fraction_of_peak"] == pytest.approx(2e6 * 1_689_840 / 67e12)
    assert rows["bnref+bfloat16"]["fraction_of_peak"] == pytest.approx(4e6 * 1_689_840 / 989e12)
    text = dispatcher.format_distance(rows)
    assert "1.69 MFLOP per training example" in text and "H200 data-sheet dense float32 peak" in text
    assert "5.04 % of peak of 67 TFLOP/s" in text


def test_the_options_bench_backend_all_passes_to_both_backends_parse_in_both():
    """`python -m bnref.bench --backend all` hands the same options to every backend: the shared
    ones (device, variants, TF32, memory) must parse in each (NNX's too)."""
    import bnref.jax.bench as jax_bench
    import bnref.nnx.bench as nnx_bench
    import bnref.torch.bench as torch_bench

    argv = ["--device", "cpu", "--variants", "all", "--tf32", "--no-memory", "--steps", "3", "--rounds", "1"]
    for module in (jax_bench, torch_bench, nnx_bench):
        args = module.parse_args(argv)
        assert args.tf32 and not args.memory and list(args.variants) == list(module.VARIANTS)


# --- issue 19: the Flax NNX bench ------------------------------------------------------------------


def test_nnx_bench_measures_bnref_nnx_against_flax_nnx_side_by_side_in_both_loops(tmp_path, capsys):
    """A tiny run through the dispatcher: bnref.nnx's BN, flax.nnx's and no BN in bnref's loop (the
    JAX loop over the NNX model), and both BNs in NNX's own nnx.jit step; each ratio printed and
    saved, the targets said."""
    out = tmp_path / "bench.json"
    variants = "bnref.nnx BN,flax.nnx BN,no BN,bnref.nnx BN nnx.jit,flax.nnx BN nnx.jit"
    assert bench.main(["--backend", "nnx", "--synthetic", "--steps", "1", "--rounds", "1", "--batch-size", "16",
                       "--device", "cpu", "--variants", variants, "--json", str(out), "--no-memory"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert re.search(r"; jax [\d.]+, flax [\d.]+ \(nnx\); TF32 off$", text, re.M), text
    for label in ("bnref.nnx BN / flax.nnx BN", "bnref.nnx BN / flax.nnx BN, nnx.jit step"):
        assert re.search(rf"^ratio {re.escape(label)}: \d+\.\d{{3}} \(target >= 0.9: (met|NOT met)\)$", text, re.M), text
    for label in ("bnref.nnx BN / no BN", "bnref loop / nnx.jit step"):
        assert re.search(rf"^ratio {re.escape(label)}: \d+\.\d{{3}}$", text, re.M), text
    assert "peak device memory" not in text and "distance to the limit" in text
    saved = json.loads(out.read_text())
    assert list(saved["examples_per_sec"]) == variants.split(",")
    fastest = max(("bnref.nnx BN", "flax.nnx BN"), key=saved["examples_per_sec"].get)
    assert set(saved["ratios"]) == {"bnref.nnx BN / flax.nnx BN", "bnref.nnx BN / flax.nnx BN, nnx.jit step",
                                    "bnref.nnx BN / no BN", "bnref loop / nnx.jit step",
                                    f"fastest float32 variant of bnref's loop ({fastest}) / flax.nnx BN nnx.jit"}
    assert all(v > 0 for v in saved["ratios"].values())


def test_nnx_bench_variants_are_the_nnx_models_as_each_loop_builds_them():
    """``flax.nnx BN`` is flax.nnx.BatchNorm as users get it (fast variance, as the JAX bench's
    flax BN is linen's); bnref.nnx BN the two-pass bnref.nnx.BatchNorm; the loops' models are NNX's."""
    import numpy as np
    from flax import nnx

    from bnref.nnx import bench as nnx_bench
    from bnref.nnx.layers import BatchNorm

    X, y = np.zeros((32, 28, 28), np.uint8), np.arange(32) % 10
    makers = nnx_bench._makers(X, y, np.arange(32, dtype=np.int32), 16, 0, 2)
    assert tuple(makers) == nnx_bench.VARIANTS
    tutorial = makers["flax.nnx BN nnx.jit"]()
    assert type(tutorial.model.bn1) is nnx.BatchNorm and tutorial.model.bn1.use_fast_variance
    mine = makers["bnref.nnx BN nnx.jit"]()
    assert type(mine.model.bn1) is BatchNorm and not mine.model.bn1.use_fast_variance
    assert set(nnx_bench.TARGETS) == {"bnref.nnx BN / flax.nnx BN"}
