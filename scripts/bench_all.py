"""Run every benchmark script in scripts/ (every ``bench_*.py``) and print one table of figures and ratios.

Each benchmark runs as its own subprocess (as a person would run it), its output is shown as it goes and kept,
and its figures are read back from its ``figure:`` lines (scripts/benchkit.py). The table at the end puts each
measured figure beside the baseline it is judged against, their ratio and the two sides' work in words, followed
by each script's verdict lines (targets met or not). A script that exits non-zero, times out or prints no figure
fails the whole run (exit 1, named at the end). Sizes come from each script's ``BENCH_ALL`` literal (smoke, quick,
full); ``--args NAME=ARGS`` overrides one script's.

The benchmarks need PostgreSQL and Redis (the production setup): DATABASE_URL and CELERY_BROKER_URL, or
--database-url / --broker-url; defaults are the local servers, database br_bench and Redis db 8.

    python scripts/bench_all.py                 # quick but meaningful sizes (a few minutes)
    python scripts/bench_all.py --full          # each script's full sizes (as in its docstring)
    python scripts/bench_all.py --smoke         # smallest sizes: every code path, seconds each (the test's run)
    python scripts/bench_all.py --only worker,reconcile --json
    python scripts/bench_all.py --args 'ledger=--seconds 1 --workers 4'
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

from benchkit import machine_load, parse_figures  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/br_bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/8"


@dataclass
class Figure:
    """One measured figure beside its baseline: ``ratio`` = figure / baseline unless the script says otherwise."""

    measurement: str
    figure: str
    baseline: str = ""
    ratio: str = ""
    work: str = ""
    baseline_work: str = ""


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


# --- reading figures ------------------------------------------------------------------------------------------

NUM = r"[\d,]+(?:\.\d+)?"


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
    """One discovered script and the arguments of each size."""

    name: str
    script: str
    sizes: dict[str, tuple[str, ...]]
    path: Path
    declared: bool = True  # it has a BENCH_ALL literal (else its sizes were guessed from its options)


SIZES = ("smoke", "quick", "full")
# Besides the sizes, BENCH_ALL may say what a script holds for itself while it runs ("uses": ["redis"]): with
# --jobs, two scripts using the same thing never run at once (their queues would mix).
KEYS = (*SIZES, "uses")


# Scripts that print their own table rather than ``figure:`` lines (see scripts/benchkit.py).
LEGACY_PARSERS: dict[str, Callable[[list[str]], list[Figure]]] = {"review": parse_review}


def declared_sizes(script: Path) -> dict[str, tuple[str, ...]]:
    """The script's ``BENCH_ALL = {...}`` literal, read without importing it (empty when it has none)."""
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "BENCH_ALL" for t in node.targets):
            value = ast.literal_eval(node.value)
            if not isinstance(value, dict) or not set(value) <= set(KEYS):
                raise ValueError(f"{script.name}: BENCH_ALL must be a dict with keys among {', '.join(KEYS)}")
            return {k: tuple(str(a) for a in v) for k, v in value.items()}
    return {}


def discover(scripts: Path = SCRIPTS) -> list[Bench]:
    """Every ``bench_*.py`` in scripts/ but this one, with its sizes (a script without BENCH_ALL runs its defaults,
    and ``--smoke``, else ``--quick``, for the smallest size when it mentions one)."""
    benches = []
    for script in sorted(scripts.glob("bench_*.py")):
        if script.name == Path(__file__).name:
            continue
        sizes = declared_sizes(script)
        declared = bool(sizes)
        text = script.read_text(encoding="utf-8")
        if "smoke" not in sizes and ("--smoke" in text or "--quick" in text):
            sizes["smoke"] = ("--smoke",) if "--smoke" in text else ("--quick",)
        benches.append(Bench(script.stem.removeprefix("bench_"), script.name, sizes, script, declared))
    return benches


# Sentences worth keeping beside the table: targets and whether they were met, growth, errors counted.
VERDICT = re.compile(r"\btarget\b|growth|peak memory|violation|not processed|failures|slowest page", re.IGNORECASE)


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


def run_one(bench: Bench, extra: list[str], *, env: dict[str, str], timeout: float, echo: bool) -> Result:
    """Run one benchmark script with ``extra`` arguments, echoing and keeping its output; read its figures."""
    argv = [sys.executable, str(bench.path), *extra]
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
    result.figures = [Figure(**f) for f in parse_figures(result.output)]
    if not result.figures and bench.name in LEGACY_PARSERS:
        result.figures = LEGACY_PARSERS[bench.name](result.output)
    result.verdicts = [line.strip() for line in result.output if VERDICT.search(line)]
    if not result.figures and not result.error:
        result.error = "printed no figures (scripts/benchkit.py figure() lines); see its output above"
    return result


def print_table(results: list[Result]) -> None:
    """One table of every figure with the two sides' work in words, then each script's verdicts and errors."""
    rows = [("benchmark", "measurement", "figure", "baseline", "ratio")]
    for r in results:
        for f in r.figures:
            rows.append((r.name, f.measurement, f.figure, f.baseline, f.ratio))
    widths = [min(max(len(row[i]) for row in rows), 70) for i in range(5)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(rows[0], widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in results:
        for f in r.figures:
            row = (r.name, f.measurement, f.figure, f.baseline, f.ratio)
            print("  ".join(cell[:70].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            if f.work or f.baseline_work:
                print(f"{'':{widths[0]}}    work: {f.work or '?'}  |  baseline: {f.baseline_work or '?'}")
    print()
    for r in results:
        status = "ok" if not r.error else f"FAILED ({r.error})"
        print(f"{r.name} ({r.script} {' '.join(r.argv[1:])}): {r.seconds:.0f}s, {status}")
        for verdict in r.verdicts:
            print(f"    {verdict}")
    print(f"\nmachine: {machine_load()} at the end")


def run_in_lanes(benches: list[Bench], run: Callable[[Bench], Result], *, jobs: int) -> list[Result]:
    """Run every bench, up to ``jobs`` at once, never two that use the same thing together; results in order."""
    if jobs <= 1:
        return [run(b) for b in benches]
    # One lane per shared thing (its scripts one after another), every other script a lane of its own. A script
    # that declares nothing (no BENCH_ALL) may hold anything: it runs alone, after the others.
    lanes: dict[str, list[Bench]] = {}
    alone = [b for b in benches if not b.declared]
    for bench in benches:
        if bench.declared:
            uses = bench.sizes.get("uses", ())
            lanes.setdefault(uses[0] if uses else f"own:{bench.name}", []).append(bench)
    done: dict[str, Result] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for lane_results in pool.map(lambda lane: [run(b) for b in lane], lanes.values()):
            done.update((r.name, r) for r in lane_results)
    done.update((b.name, run(b)) for b in alone)
    return [done[b.name] for b in benches]


def parse_overrides(values: list[str], names: set[str]) -> dict[str, list[str]]:
    """``--args NAME=ARGS`` options: the arguments to give one script instead of its declared ones."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--args {value!r}: expected NAME=ARGS with NAME among {', '.join(sorted(names))}")
        out[name] = shlex.split(rest)
    return out


def main(argv: list[str] | None = None) -> int:
    scripts_dir = SCRIPTS
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scripts-dir" in argv:  # tests point it at a folder of their own scripts
        at = argv.index("--scripts-dir")
        scripts_dir, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2 :]
    benches_found = discover(scripts_dir)
    names = {b.name for b in benches_found}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="each script's full sizes (slow: tens of minutes)")
    size.add_argument("--smoke", action="store_true", help="each script's smallest sizes (the test suite's run)")
    parser.add_argument("--only", default="", help="comma-separated benchmarks: " + ",".join(sorted(names)))
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="arguments for one script instead of its declared sizes, e.g. --args 'ledger=--seconds 1'",
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script (default 900, --full 5400)")
    parser.add_argument("--quiet", action="store_true", help="do not echo each script's output as it runs")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="scripts run at once (default 1: figures are only comparable run alone; more for --smoke)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object at the end")
    args = parser.parse_args(argv)

    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - names
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; found: {', '.join(sorted(names))}")
    try:
        overrides = parse_overrides(args.args, names)
    except ValueError as exc:
        parser.error(str(exc))
    database_url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    problems = check_servers(database_url, args.broker_url)
    if problems:
        print("bench_all needs PostgreSQL and Redis (the benchmarks measure the production setup):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print("set DATABASE_URL and CELERY_BROKER_URL, or pass --database-url and --broker-url", file=sys.stderr)
        return 2
    benches = [b for b in benches_found if (not wanted or b.name in wanted)]
    prepare_database(database_url)

    level = "full" if args.full else "smoke" if args.smoke else "quick"
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, CELERY_BROKER_URL=args.broker_url, PYTHONUNBUFFERED="1")
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    env.setdefault("BENCH_DATABASE_URL", database_url.rsplit("/", 1)[0] + "/br_recon_bench")
    timeout = args.timeout or (5400.0 if args.full else 900.0)

    def run(bench: Bench) -> Result:
        extra = overrides.get(bench.name, list(bench.sizes.get(level, ())))
        print(f"== {bench.name}: {bench.script} {' '.join(extra)} ({level} sizes)", file=sys.stderr, flush=True)
        result = run_one(bench, extra, env=env, timeout=timeout, echo=not args.quiet)
        if result.error:
            print(f"== {bench.name}: FAILED: {result.error}", file=sys.stderr, flush=True)
        return result

    results = run_in_lanes(benches, run, jobs=args.jobs)
    if args.json:
        print(json.dumps({"level": level, "machine": machine_load(), "results": [r.as_dict() for r in results]}))
    else:
        print_table(results)
    failed = [r for r in results if r.error]
    if failed:
        print(f"\nFAILED: {', '.join(f'{r.name} ({r.error})' for r in failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
