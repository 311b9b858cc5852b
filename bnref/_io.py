"""Output files done safely: validated before any work, written atomically, strict JSON.

- :func:`check_output_paths` runs before a command starts its work: each path's directory
  exists and is writable, the path is not a directory, no two outputs are the same file,
  and a figure's extension is one matplotlib can write. A bad path is found in a second,
  not after an hour of training.
- :func:`atomic_write_bytes` / :func:`write_json` write a temporary file beside the target,
  flush it to disk and rename it over the target: readers (and a crash or Ctrl-C at any
  moment) see the old complete file or the new complete file, never a truncated one.
- :func:`new_figure` / :func:`save_figure`: a matplotlib figure drawn off-screen (its own Agg
  canvas, pyplot's backend left alone) and saved atomically in the format the path's extension names.
- :func:`strict_json` makes data JSON-safe without NaN/Infinity literals (which Python's
  ``json`` writes by default and strict parsers reject): a non-finite float becomes
  ``null`` and its key is listed under ``"nonfinite"`` in the same object, so the fact is
  kept, not hidden.

Standard library only (no framework import; matplotlib only inside the figure helpers).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

__all__ = ["atomic_write_bytes", "check_output_paths", "nearest_existing", "strict_json", "write_json", "new_figure",
           "save_figure", "FIGURE_SUFFIXES"]

#: what matplotlib's Agg backend writes (``FigureCanvasAgg.get_supported_filetypes()``)
FIGURE_SUFFIXES = (".eps", ".jpeg", ".jpg", ".pdf", ".pgf", ".png", ".ps", ".raw", ".rgba", ".svg", ".svgz",
                   ".tif", ".tiff", ".webp")  # fmt: skip


def check_output_paths(paths: Dict[str, Optional[str]], figures: Iterable[str] = (), make_dirs: bool = False) -> None:
    """Raise ``ValueError`` naming the option for the first unusable output path.

    ``paths`` maps an option name (``"--json"``) to a path or ``None`` (not requested);
    options named in ``figures`` must end in a suffix of :data:`FIGURE_SUFFIXES`.
    ``make_dirs``: the caller will create missing parent directories, so the nearest existing
    one must be a writable directory instead. Nothing is created or written.
    """
    seen: Dict[str, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        p = Path(path).expanduser()
        if str(path).strip() == "" or p.is_dir():
            raise ValueError(f"{option} {path!r} is a directory, not a file name")
        parent = p.parent if str(p.parent) else Path(".")
        if make_dirs:
            parent = nearest_existing(parent)
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            raise ValueError(f"{option} {path!r}: {str(parent)!r} {what}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path!r}: directory {str(parent)!r} is not writable")
        if p.exists() and not os.access(p, os.W_OK):
            raise ValueError(f"{option} {path!r} exists and is not writable")
        if option in figures and p.suffix.lower() not in FIGURE_SUFFIXES:
            raise ValueError(f"{option} {path!r}: unknown image format {p.suffix!r}; use one of {', '.join(FIGURE_SUFFIXES)}")
        key = os.path.realpath(p)
        if key in seen:
            raise ValueError(f"{option} and {seen[key]} name the same file {path!r}")
        seen[key] = option


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself or its nearest ancestor that exists: where ``mkdir -p path`` would start,
    so the directory that must be writable for it to succeed."""
    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful rename


def strict_json(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, scalars, NumPy scalars) that ``json`` can write
    with ``allow_nan=False``: each non-finite float becomes ``None``, and a dict holding such a
    value (directly, or in a list under that key) gains ``"nonfinite": [those keys]``."""
    if isinstance(obj, dict):
        out, bad = {}, []
        for k, v in obj.items():
            if _nonfinite(v):
                out[k] = None
                bad.append(k)
            else:
                if isinstance(v, (list, tuple)) and any(_nonfinite(e) for e in v):
                    bad.append(k)
                out[k] = strict_json(v)
        if bad:
            out["nonfinite"] = sorted(set(out.get("nonfinite") or []) | set(bad))
        return out
    if isinstance(obj, (list, tuple)):
        return [None if _nonfinite(v) else strict_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return strict_json(obj.item())  # NumPy / 0-d array scalars
    return obj


def _nonfinite(v: Any) -> bool:
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    return isinstance(v, float) and not math.isfinite(v)


def dumps(obj: Any, indent: int = 2) -> str:
    """``json.dumps`` of :func:`strict_json` (obj), refusing NaN/Infinity literals."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON to ``path``, atomically."""
    atomic_write_bytes(path, (dumps(obj) + "\n").encode())


def new_figure(columns: int = 1, size=(5.0, 3.8), rows: int = 1):
    """``(figure, axes)``: ``rows`` x ``columns`` axes (a 1-D array for one row, as
    ``subplots`` gives), each panel ``size`` inches, on a figure of its own
    with its own Agg canvas (files only, no display). Not pyplot's: drawing one neither switches
    the process's matplotlib backend (``matplotlib.use("Agg")`` did, and a notebook that trained a
    run showed no figure after it) nor registers the figure with pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * columns, size[1] * rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns)


def save_figure(fig, path: str | os.PathLike, rect=None) -> None:
    """Lay out ``fig`` (within ``rect``, figure coordinates ``(left, bottom, right, top)``, when
    given: room for a caption), write it to ``path`` atomically in the format of the path's
    extension, and close it."""
    import io

    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format=str(path).rsplit(".", 1)[-1].lower())
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: let pyplot forget it
        import matplotlib.pyplot as plt

        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
