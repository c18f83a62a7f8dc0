"""What every benchmark script shares with ``bench_all.py``: how a figure is printed so the table can read it.

A script prints each measured figure with :func:`figure`: one line starting ``figure:`` and a JSON object with
the measurement, the figure, the baseline measured in the same run, their ratio, and the two sides' work in
words (what the figure's side did, what the baseline's side did). ``bench_all.py`` reads those lines from any
``scripts/bench_*.py`` it runs; a person reads the same words. A script tells ``bench_all.py`` its sizes with a
module-level literal (read without importing the script)::

    BENCH_ALL = {"smoke": ["--smoke"], "quick": ["--seconds", "2"], "full": []}

``smoke`` is the smallest run that still goes through every code path (the test suite runs it: seconds, not
minutes), ``quick`` the default of ``bench_all.py``, ``full`` its ``--full``.

It also holds what several scripts need to set a run up: :class:`Server` (``billing-reconciler serve`` in a
subprocess, up when /healthz answers), :func:`free_port`, :func:`scratch_database` / :func:`drop_database` (a
database of the run's own on the benchmark's PostgreSQL server) and :func:`run_pgbench` (a baseline script through
pgbench's C client, prepared statements).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]

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


# --- the server under test -----------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``billing-reconciler serve`` in a subprocess, with ``env`` on top of this process's environment; ready when
    its /healthz answers. Use it as a context manager, or call :meth:`stop`."""

    def __init__(
        self, env: Mapping[str, str], *, workers: int = 1, server: str | None = None, start_timeout: float = 30.0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = tempfile.mkdtemp(prefix="bench-server-metrics-")
        full_env = {**os.environ, **env}
        if workers > 1:  # several processes share their Prometheus counters through files
            full_env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        command = [sys.executable, "-c", "from worker.cli import main; main()", "serve", "--port", str(self.port)]
        command += ["--workers", str(workers), *(["--server", server] if server else [])]
        self.process = subprocess.Popen(command, env=full_env, cwd=REPO)
        what = f"{server + ', ' if server else ''}{workers} workers"
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise SystemExit(f"the server ({what}) exited with {self.process.returncode} while starting")
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server ({what}) did not start")

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its worker processes (Linux /proc)."""
        stats = processes()
        tree = {self.process.pid}
        for _ in range(3):
            tree |= {pid for pid, (ppid, _, _) in stats.items() if ppid in tree}
        return sum(stats[pid][2] for pid in tree if pid in stats)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples named exactly ``name`` on /metrics."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=5).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s) and remove its metrics folder."""
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def processes() -> dict[int, tuple[int, str, float]]:
    """Every process on this machine (Linux /proc), by pid: its parent's pid, its name and its CPU seconds so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = tail.split()
        found[int(entry.name)] = (int(fields[1]), head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / ticks)
    return found


def postgres_cpu() -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL process on this machine, by pid.

    The difference of two readings (:func:`cpu_since`) is what the database did between them, on whatever
    connections it had, counted by the kernel: a measure the machine's other load moves far less than a rate.
    """
    return {pid: seconds for pid, (_, name, seconds) in processes().items() if name == "postgres"}


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two :func:`postgres_cpu` readings (a process started in between counts from zero)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


# --- databases -----------------------------------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as libpq (psycopg, pgbench) spells it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _admin_execute(url: str, statement: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(url).set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(admin), autocommit=True) as conn:
        conn.execute(statement)


def scratch_database(url: str, name: str) -> str:
    """Create (again: dropped first if it exists) the database ``name`` on ``url``'s server; its URL."""
    from sqlalchemy.engine import make_url

    _admin_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin_execute(url, f'CREATE DATABASE "{name}"')
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop ``url``'s database (closing its connections) if it exists."""
    from sqlalchemy.engine import make_url

    _admin_execute(url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


# Tables the ledger's hot paths update in place (balances, grants, holds, limit counters).
UPDATED_TABLES = ("accounts", "grants", "holds", "limit_counters")


def autovacuum(url: str) -> str:
    """The server's ``autovacuum`` setting (on this machine's PostgreSQL it is off)."""
    import psycopg

    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
    return str(row[0]) if row else "?"


def vacuum(url: str, tables: tuple[str, ...] = UPDATED_TABLES) -> None:
    """VACUUM (ANALYZE) ``tables``, so that a measured run starts as autovacuum keeps them in production.

    With autovacuum off, a table updated in place keeps every dead row version: each run would start on what
    the runs before it left (longer HOT chains, dead index entries, stale statistics), and a figure would depend
    on its place in the script. Both sides of a ratio start after it.
    """
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        present = {name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        chosen = [name for name in tables if name in present]
        if chosen:
            conn.execute("VACUUM (ANALYZE) " + ", ".join(chosen))


# --- pgbench ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pgbench:
    """What one pgbench run reached: transactions per second, and its own average latency as it printed it."""

    tps: float
    latency_avg: str


def run_pgbench(url: str, script_text: str, clients: int, duration: float, *, threads: int | None = None) -> Pgbench:
    """pgbench's C client running ``script_text`` (one transaction per run of the script) on ``url``'s database
    with ``clients`` connections for ``duration`` seconds (at least 1), prepared statements (``-M prepared``)."""
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is needed for the baselines (Debian: postgresql-client)")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(script_text)
    command = [
        "pgbench", "-n", "-M", "prepared", "-f", script.name, "-c", str(clients),
        "-j", str(threads or min(clients, 4)), "-T", str(max(1, round(duration))), libpq_url(url),
    ]  # fmt: skip
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        os.unlink(script.name)
    match = re.search(r"^tps = ([0-9.]+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise SystemExit(f"pgbench failed: {(out.stderr.strip() or out.stdout.strip())[-2000:]}")
    latency = re.search(r"latency average = (.+)$", out.stdout, re.MULTILINE)
    return Pgbench(float(match.group(1)), latency.group(1).strip() if latency else "?")
