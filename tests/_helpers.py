"""Plain helpers that several test modules import (``from _helpers import ...``: pytest puts
``tests/`` on the path, as for ``from test_convert import ...``). Framework-free: the spec's
tests import it and run without torch or JAX. The fixtures are in ``conftest.py``.

- ``make_shards``: data-parallel shards of one batch (the spec's sync tests, SyncBatchNorm's).
- ``limit``: a test's hard time limit, enforced by conftest's ``hard_limit`` fixture (the
  distributed tests: ``pytestmark = pytest.mark.usefixtures("hard_limit")``).
"""

import numpy as np

#: seconds a test under conftest's ``hard_limit`` may take unless it says otherwise with @limit
DEFAULT_LIMIT_S = 120


def make_shards(sizes, c=3, seed=0, offset=5.0):
    """One shard per entry of ``sizes`` (its batch size, 0 allowed), shape ``(n, c, 4)``: channel
    ``k`` has spread ``k + 1`` around ``offset``."""
    rng = np.random.default_rng(seed)
    return [offset + (1 + np.arange(c)).reshape(1, c, 1) * rng.standard_normal((n, c, 4)) for n in sizes]



def limit(seconds: int):
    """Give a test a hard limit of ``seconds`` (default :data:`DEFAULT_LIMIT_S`), enforced by
    conftest's ``hard_limit``: past it, the test fails (and the launcher's cleanup kills its processes)."""

    def mark(test):
        test.limit_s = seconds
        return test

    return mark
