"""The one progress bar of bnref's loops (training epochs, precise BN passes): tqdm when asked
for and stderr is a terminal, else the iterable itself. Framework-free; tqdm is imported only
when a bar is drawn."""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["bar"]


def bar(items: Iterable, desc: str, enabled: bool, total: Optional[int] = None) -> Iterable:
    """``items`` with a transient progress bar labelled ``desc`` when ``enabled`` (``disable=None``:
    tqdm stays silent when stderr is not a terminal, as in CI logs); ``total``: how many items
    there are, for an iterator that cannot say."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, unit="batch", disable=None, total=total)
