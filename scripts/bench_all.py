"""Run every benchmark script in scripts/ and print one table of figures and ratios.

Each benchmark runs as its own subprocess (as a person would run it), its output is shown as it goes and kept,
and its figures are read back from what it printed (or from its --json output, for a script that has one). The
table at the end puts each measured figure beside the baseline it is judged against and their ratio, followed by
each script's verdict lines (targets met or not).

The benchmarks need PostgreSQL and Redis (the production setup): DATABASE_URL and CELERY_BROKER_URL, or
--database-url / --broker-url; defaults are the local servers, database br_bench and Redis db 8.

    python scripts/bench_all.py                 # quick but meaningful sizes (a few minutes)
    python scripts/bench_all.py --full          # each script's full sizes (as in its docstring)
    python scripts/bench_all.py --only worker,reconcile --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/br_bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/8"


@dataclass
class Figure:
    """One measured figure beside its baseline: ``ratio`` = figure / baseline unless the script says otherwise."""

    measurement: str
    figure: str
    baseline: str = ""
    ratio: str = ""


@dataclass
class Result:
    """What one benchmark script did and printed."""

    name: str
    script: str
    argv: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (without the raw output)."""
        return {
            "name": self.name,
            "script": self.script,
            "argv": self.argv,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 1),
            "figures": [vars(f) for f in self.figures],
            "verdicts": self.verdicts,
            "error": self.error,
        }


# --- parsers of each script's printed output --------------------------------------------------------------------

NUM = r"[\d,]+(?:\.\d+)?"


def _n(text: str) -> float:
    return float(text.replace(",", ""))


def parse_ledger(lines: list[str]) -> list[Figure]:
    """``scenario workers consumes/s pgbench-tps ratio% [server-side-tps ratio%] layout`` rows."""
    row = re.compile(
        rf"^(?P<name>\S.*?)\s+(?P<workers>\d+)\s+(?P<rate>{NUM})\s+(?P<tps>{NUM})\s+(?P<ratio>\d+)%"
        rf"(?:\s+(?P<fn>{NUM})\s+(?P<fnratio>\d+)%)?\s"
    )
    out = []
    for line in lines:
        m = row.match(line)
        if m:
            out.append(
                Figure(
                    f"ledger consume, {m['name']}, {m['workers']} workers",
                    f"{m['rate']} consumes/s",
                    f"pgbench {m['tps']} tps",
                    f"{m['ratio']}%",
                )
            )
            if m["fn"]:
                out.append(
                    Figure(
                        f"ledger_consume() driven by pgbench, {m['name']}, {m['workers']} workers",
                        f"{m['fn']} tps",
                        f"pgbench {m['tps']} tps",
                        f"{m['fnratio']}%",
                    )
                )
    return out


def parse_webhooks(lines: list[str]) -> list[Figure]:
    """``label rate/s p50 .. ms p99 .. ms ratio`` rows, the pgbench row and the webhook/pgbench ratio."""
    row = re.compile(
        rf"^(?P<label>\S.*?)\s+(?P<rate>{NUM})/s\s+p50\s+(?P<p50>{NUM}) ms\s+"
        rf"p99\s+(?P<p99>{NUM}) ms\s*(?P<ratio>{NUM})?\s*$"
    )
    pgbench = re.compile(rf"^(?P<label>pgbench.*?)\s+(?P<rate>{NUM})/s")
    section = ""
    trivial: str | None = None
    out: list[Figure] = []
    pg_rate: str | None = None
    hook_rate: str | None = None
    for line in lines:
        if line.startswith("== "):
            section = line[3:].split(";")[0]
            continue
        m = row.match(line)
        if m:
            label = f"{m['label']} [{section}]" if section else m["label"]
            if m["ratio"]:
                hook_rate = m["rate"]
                out.append(
                    Figure(
                        f"webhooks: {label}",
                        f"{m['rate']}/s, p50 {m['p50']} ms, p99 {m['p99']} ms",
                        f"/healthz {trivial}/s" if trivial else "/healthz",
                        f"{_n(m['ratio']):.2f}",
                    )
                )
            else:
                trivial = m["rate"]
            continue
        m = pgbench.match(line)
        if m:
            pg_rate = m["rate"]
            if hook_rate:
                out.append(
                    Figure(
                        "webhooks: stored events vs INSERT-only pgbench",
                        f"{hook_rate}/s",
                        f"pgbench {pg_rate}/s",
                        f"{_n(hook_rate) / _n(pg_rate):.2f}",
                    )
                )
    return out


def parse_worker(lines: list[str]) -> list[Figure]:
    """``workload count seconds per-second ratio x`` rows (the first row is the no-op baseline)."""
    row = re.compile(rf"^(?P<name>\S.*?)\s+(?P<count>\d+)\s+(?P<sec>{NUM})\s+(?P<rate>{NUM})\s+(?P<ratio>{NUM})x$")
    out: list[Figure] = []
    noop = ""
    for line in lines:
        m = row.match(line)
        if not m:
            continue
        if not noop:
            noop = m["rate"]
            out.append(Figure(f"worker: {m['name']}", f"{m['rate']}/s", "(baseline)", "1.00"))
        else:
            out.append(Figure(f"worker: {m['name']}", f"{m['rate']}/s", f"no-op {noop}/s", m["ratio"]))
    return out


def parse_reconcile(lines: list[str]) -> list[Figure]:
    """``entries topups events group-by reconcile paging ledger ratio peak-MB mismatches`` rows."""
    row = re.compile(
        rf"^\s*(?P<entries>\d+)\s+(?P<topups>\d+)\s+(?P<events>\d+)\s+(?P<gb>{NUM})\s+(?P<wall>{NUM})\s+"
        rf"(?P<paging>{NUM})\s+(?P<ledger>{NUM})\s+(?P<ratio>{NUM}|inf)\s+(?P<peak>{NUM})\s+(?P<mm>\d+)\s*$"
    )
    out = []
    for line in lines:
        m = row.match(line)
        if m:
            out.append(
                Figure(
                    f"reconcile {int(m['entries']):,} entries",
                    f"{m['wall']} s (Stripe paging {m['paging']} s), peak {m['peak']} MB",
                    f"GROUP BY {m['gb']} s",
                    f"{m['ratio']} (ledger part)",
                )
            )
    return out


def parse_review(lines: list[str]) -> list[Figure]:
    """``page median p95 max`` rows and the deep-page ratios."""
    row = re.compile(rf"^\s+(?P<label>\S.*?)\s+(?P<median>{NUM})ms\s+(?P<p95>{NUM})ms\s+(?P<max>{NUM})ms\s*$")
    ratio = re.compile(rf"^\s+(?P<label>\S.*?/ page 1)\s+(?P<ratio>{NUM})\s*$")
    out = []
    for line in lines:
        m = row.match(line)
        if m:
            out.append(Figure(f"review: {m['label']}", f"median {m['median']} ms, p95 {m['p95']} ms"))
            continue
        m = ratio.match(line)
        if m:
            out.append(Figure(f"review: {m['label']}", "", "page 1", m["ratio"]))
    return out


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    quick: tuple[str, ...]
    full: tuple[str, ...]
    parse: Callable[[list[str]], list[Figure]]


# Quick settings: small enough for a few minutes in all, big enough that each ratio still means something.
BENCHES = (
    Bench("ledger", "bench_ledger.py", ("--seconds", "2", "--accounts", "2000"), (), parse_ledger),
    Bench("webhooks", "bench_webhooks.py", ("--duration", "5", "--warmup", "1"), (), parse_webhooks),
    Bench(
        "worker", "bench_worker.py", ("--customers", "120", "--noop-tasks", "2000", "--single", "300"), (), parse_worker
    ),
    Bench(
        "reconcile",
        "bench_reconcile.py",
        ("--sizes", "10000,100000"),
        ("--sizes", "10000,100000,1000000"),
        parse_reconcile,
    ),
    Bench(
        "review",
        "bench_review.py",
        ("--mismatches", "20000", "--entries", "200000", "--repeat", "5"),
        (),
        parse_review,
    ),
)

# Sentences worth keeping beside the table: targets and whether they were met, growth, errors counted.
VERDICT = re.compile(r"target|growth|peak memory|violation|not processed|failures|slowest page", re.IGNORECASE)


# --- running -------------------------------------------------------------------------------------------------------


def check_servers(database_url: str, broker_url: str) -> list[str]:
    """Problems reaching PostgreSQL and Redis (empty when both answer)."""
    problems = []
    if not database_url.startswith("postgresql"):
        problems.append(f"DATABASE_URL must name PostgreSQL, got {database_url!r}")
    else:
        try:
            import psycopg
            from sqlalchemy.engine import make_url

            admin = make_url(database_url).set(drivername="postgresql", database="postgres")
            with psycopg.connect(admin.render_as_string(hide_password=False), connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            problems.append(f"PostgreSQL at {database_url} does not answer: {exc}")
    if not broker_url.startswith("redis"):
        problems.append(f"CELERY_BROKER_URL must name Redis, got {broker_url!r}")
    else:
        try:
            import redis

            redis.Redis.from_url(broker_url, socket_connect_timeout=5).ping()
        except Exception as exc:
            problems.append(f"Redis at {broker_url} does not answer: {exc}")
    return problems


def prepare_database(database_url: str) -> None:
    """Create the benchmarks' database if missing and migrate it (the webhook and worker benchmarks write to it)."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{url.database}"')
    sys.path.insert(0, str(REPO))
    from ledger.db import make_engine
    from ledger.migrate import migrate

    engine = make_engine(database_url, pool_size=1)
    try:
        migrate(engine)
    finally:
        engine.dispose()


def has_json_option(script: Path, env: dict[str, str]) -> bool:
    """Whether the script offers machine-readable output (``--json`` in its --help)."""
    try:
        out = subprocess.run(
            [sys.executable, str(script), "--help"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return "--json" in out.stdout


def figures_from_json(text: str) -> list[Figure]:
    """Figures from a script's JSON output: every numeric leaf, named by its path."""
    start = text.find("{")
    if start < 0:
        return []
    try:
        data = json.loads(text[start:])
    except ValueError:
        return []
    out: list[Figure] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(Figure(path, f"{value:g}", "", "ratio" if "ratio" in path else ""))

    walk(data, "")
    return out


def run_one(bench: Bench, *, full: bool, env: dict[str, str], timeout: float, echo: bool) -> Result:
    """Run one benchmark script, echoing and keeping its output; parse its figures."""
    script = SCRIPTS / bench.script
    argv = [sys.executable, str(script), *(bench.full if full else bench.quick)]
    use_json = has_json_option(script, env)
    if use_json:
        argv.append("--json")
    result = Result(bench.name, bench.script, argv[1:])
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(5)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            result.output.append(line)
            if echo:
                print(f"  {bench.name:>9} | {line}", file=sys.stderr, flush=True)
        result.returncode = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        timer.cancel()
    result.seconds = time.monotonic() - started
    if timed_out.is_set():
        result.error = f"timed out after {timeout:.0f}s"
    elif result.returncode != 0:
        tail = [line for line in result.output if line.strip()][-3:]
        result.error = f"exit {result.returncode}: " + " / ".join(tail)
    result.figures = figures_from_json("\n".join(result.output)) if use_json else bench.parse(result.output)
    result.verdicts = [line.strip() for line in result.output if VERDICT.search(line)]
    if not result.figures and not result.error:
        result.error = "printed no figures this script's parser recognises; see its output above"
    return result


def print_table(results: list[Result]) -> None:
    """One table of every figure, then each script's verdicts and errors."""
    rows = [("benchmark", "measurement", "figure", "baseline", "ratio")]
    for r in results:
        for f in r.figures:
            rows.append((r.name, f.measurement, f.figure, f.baseline, f.ratio))
    widths = [min(max(len(row[i]) for row in rows), 90) for i in range(5)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(rows[0], widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows[1:]:
        print("  ".join(cell[:90].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    for r in results:
        status = "ok" if not r.error else f"FAILED ({r.error})"
        print(f"{r.name} ({r.script} {' '.join(r.argv[1:])}): {r.seconds:.0f}s, {status}")
        for verdict in r.verdicts:
            print(f"    {verdict}")
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="each script's full sizes (slow: tens of minutes)")
    parser.add_argument("--only", default="", help="comma-separated benchmarks: " + ",".join(b.name for b in BENCHES))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script (default 900, --full 5400)")
    parser.add_argument("--quiet", action="store_true", help="do not echo each script's output as it runs")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object at the end")
    args = parser.parse_args()

    database_url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    problems = check_servers(database_url, args.broker_url)
    if problems:
        print("bench_all needs PostgreSQL and Redis (the benchmarks measure the production setup):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print("set DATABASE_URL and CELERY_BROKER_URL, or pass --database-url and --broker-url", file=sys.stderr)
        return 2
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    benches = [b for b in BENCHES if (not wanted or b.name in wanted)]
    missing = [b.script for b in benches if not (SCRIPTS / b.script).is_file()]
    benches = [b for b in benches if (SCRIPTS / b.script).is_file()]
    prepare_database(database_url)

    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, CELERY_BROKER_URL=args.broker_url, PYTHONUNBUFFERED="1")
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    env.setdefault("BENCH_DATABASE_URL", database_url.rsplit("/", 1)[0] + "/br_recon_bench")
    timeout = args.timeout or (5400.0 if args.full else 900.0)
    results = []
    for bench in benches:
        print(
            f"== {bench.name}: {bench.script} ({'full' if args.full else 'quick'} sizes)", file=sys.stderr, flush=True
        )
        results.append(run_one(bench, full=args.full, env=env, timeout=timeout, echo=not args.quiet))
    if args.json:
        print(json.dumps({"results": [r.as_dict() for r in results], "missing": missing}, indent=2))
    else:
        print_table(results)
        if missing:
            print(f"not found (skipped): {', '.join(missing)}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
