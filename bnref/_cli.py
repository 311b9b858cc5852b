"""argparse value types shared by bnref's commands: a bad value is argparse's one-line error
(``error: argument --lr: ...``, exit status 2) before any work starts; and :func:`first_line`,
how a framework's paragraphs of error become one line of bnref's."""

from __future__ import annotations

import argparse
import math

__all__ = ["add_data_options", "finite_positive_float", "first_line", "int_at_least", "load_data", "non_negative_float", "positive_int",
           "seed"]

#: largest seed every RNG bnref seeds accepts (NumPy's SeedSequence, torch, jax.random.key)
MAX_SEED = 2**32 - 1


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: a framework's error often runs to paragraphs."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)


def seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**32 - 1]."""
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


def _finite_float(text: str, minimum: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {text}")
    return value


def finite_positive_float(text: str) -> float:
    """An argparse type: a finite float > 0 (``nan``, ``inf``, 0 and negatives are refused)."""
    return _finite_float(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite float >= 0."""
    return _finite_float(text, 0.0, strict=False)


def add_data_options(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--data-dir DIR`` and ``--synthetic``: Fashion-MNIST from DIR (or the default places), or
    explicitly the synthetic stand-in. Never a fall-back from one to the other."""
    p.add_argument("--data-dir", default=None, help=f"{what}directory with the four Fashion-MNIST IDX files "
                   "(default: $BNREF_DATA_DIR, the cache, /usr/share/datasets/fashion-mnist); missing files are an error")
    p.add_argument("--synthetic", action="store_true", help="use bnref.data.synthetic, a small learnable stand-in, "
                   "instead of Fashion-MNIST (figures drawn on it say so)")  # fmt: skip


def load_data(p: argparse.ArgumentParser, args: argparse.Namespace, file=None, **sizes):
    """The data :func:`add_data_options` asked for (``sizes``: the synthetic stand-in's ``n_train``,
    ``n_test``, ``seed``); a problem with it (not found, a typo'd directory, a corrupt or
    unreadable file) is argparse's error, exit status 2, before any work. Says what it uses, on
    ``file`` (default stdout; stderr where stdout is JSON for machines)."""
    from bnref import data

    try:
        ds = data.load_or_synthetic(args.data_dir, synthetic_data=args.synthetic, **sizes)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e) + ("" if args.synthetic else "\n(--synthetic runs on the synthetic stand-in instead)"))
    print(f"data: {data.describe_source(ds)}", file=file, flush=True)
    return ds
