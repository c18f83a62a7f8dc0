"""What every benchmark script shares with ``bench_all.py``: how a figure is printed so the table can read it.

A script prints each measured figure with :func:`figure`: one line starting ``figure:`` and a JSON object with
the measurement, the figure, the baseline measured in the same run, their ratio, and the two sides' work in
words (what the figure's side did, what the baseline's side did). ``bench_all.py`` reads those lines from any
``scripts/bench_*.py`` it runs; a person reads the same words. A script tells ``bench_all.py`` its sizes with a
module-level literal (read without importing the script)::

    BENCH_ALL = {"smoke": ["--smoke"], "quick": ["--seconds", "2"], "full": []}

``smoke`` is the smallest run that still goes through every code path (the test suite runs it: seconds, not
minutes), ``quick`` the default of ``bench_all.py``, ``full`` its ``--full``.
"""

from __future__ import annotations

import json
import os
from typing import Any

PREFIX = "figure: "


def figure(
    measurement: str,
    value: str,
    *,
    baseline: str = "",
    ratio: float | str | None = None,
    work: str = "",
    baseline_work: str = "",
) -> None:
    """Print one figure for people and for ``bench_all.py``: what was measured, beside what, and the ratio."""
    shown = f"{ratio:.2f}" if isinstance(ratio, float) else (ratio or "")
    record: dict[str, Any] = {
        "measurement": measurement,
        "figure": value,
        "baseline": baseline,
        "ratio": shown,
        "work": work,
        "baseline_work": baseline_work,
    }
    print(PREFIX + json.dumps(record), flush=True)


def parse_figures(lines: list[str]) -> list[dict[str, str]]:
    """The figures a script printed with :func:`figure` (other lines ignored)."""
    out = []
    for line in lines:
        if line.startswith(PREFIX):
            try:
                record = json.loads(line[len(PREFIX) :])
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append({k: str(v) for k, v in record.items()})
    return out


def machine_load() -> str:
    """The machine's CPUs and load averages, printed beside every run's figures."""
    one, five, fifteen = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} {five:.2f} {fifteen:.2f}"
