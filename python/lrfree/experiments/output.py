"""Where an experiment's results go: one folder with a markdown table, a JSON record and PNG figures."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

import torch


class UsageError(Exception):
    """Bad input the command line reports in one line, without a traceback."""


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device torch knows ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was requested but this machine has no CUDA device "
                         "(or this torch build has no CUDA support); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: lrfree's experiments run on cpu or cuda")
    return device


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A matplotlib figure that touches no global state (no pyplot, no backend switch)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


class Output:
    """An experiment's output folder."""

    def __init__(self, folder: str | pathlib.Path):
        self.folder = pathlib.Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write results to {self.folder}: {exc.strerror}") from None
        self.written: list[pathlib.Path] = []

    def text(self, name: str, content: str) -> pathlib.Path:
        path = self.folder / name
        path.write_text(content)
        self.written.append(path)
        return path

    def json(self, name: str, record: Any) -> pathlib.Path:
        return self.text(name, json.dumps(record, indent=1, default=float) + "\n")

    def figure(self, name: str, fig) -> pathlib.Path:
        path = self.folder / name
        fig.savefig(path, dpi=120)
        self.written.append(path)
        return path
