"""bench_all.py finds every benchmark script, runs each at its smallest sizes, and fails loudly when one fails.

The smoke run goes through every script in scripts/ (the ones to come too) against the PostgreSQL and Redis the
suite uses, in a database of its own, so a benchmark that stops working fails the suite instead of rotting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bench_all
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import REPO, postgres_url, redis_url

FIGURE = 'print("figure: " + __import__("json").dumps({"measurement": "m", "figure": "1/s", "ratio": "1.00"}))'


def write_script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


class TestDiscovery:
    def test_every_bench_script_is_found_with_its_declared_sizes(self, tmp_path: Path) -> None:
        write_script(tmp_path, "bench_all.py", "")
        write_script(tmp_path, "bench_new.py", 'BENCH_ALL = {"smoke": ["--rows", "10"], "full": ["--rows", "1e6"]}\n')
        write_script(tmp_path, "bench_plain.py", "import argparse  # offers --smoke\n")
        write_script(tmp_path, "bench_defaults.py", "print('no sizes')\n")
        write_script(tmp_path, "helper.py", "")
        found = {b.name: b.sizes for b in bench_all.discover(tmp_path)}
        assert found == {
            "new": {"smoke": ("--rows", "10"), "full": ("--rows", "1e6")},
            "plain": {"smoke": ("--smoke",)},
            "defaults": {},
        }

    def test_the_repository_scripts_all_declare_a_smoke_size(self) -> None:
        benches = bench_all.discover()
        assert {"ledger", "worker", "reconcile", "webhooks", "review"} <= {b.name for b in benches}
        assert all("smoke" in b.sizes for b in benches), [b.name for b in benches if "smoke" not in b.sizes]
        # The two that share the Redis "events" queue say so, and never run side by side.
        assert {b.name for b in benches if "redis" in b.sizes.get("uses", ())} == {"webhooks", "worker"}

    def test_a_bad_sizes_literal_is_refused(self, tmp_path: Path) -> None:
        write_script(tmp_path, "bench_bad.py", 'BENCH_ALL = {"tiny": []}\n')
        with pytest.raises(ValueError, match="BENCH_ALL"):
            bench_all.discover(tmp_path)


@pytest.mark.postgres
@pytest.mark.redis
class TestRunning:
    @pytest.fixture
    def servers(self) -> Iterator[tuple[str, str]]:
        database, broker = postgres_url(), redis_url()
        if database is None or broker is None:
            pytest.skip("no PostgreSQL and Redis configured: set DATABASE_URL and CELERY_BROKER_URL")
        url = make_url(database)
        smoke = url.set(database=f"{url.database}_bench_smoke")
        yield smoke.render_as_string(hide_password=False), broker
        # The databases bench_all and bench_reconcile created for the run (the others drop their own).
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in (smoke.database, f"{smoke.database}_recon"):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    def run_all(self, servers: tuple[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        database, broker = servers
        env = dict(os.environ, BENCH_DATABASE_URL=database + "_recon", PYTHONPATH=str(REPO))
        command = [sys.executable, str(REPO / "scripts" / "bench_all.py"), "--database-url", database]
        command += ["--broker-url", broker, "--quiet", "--json", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)

    def test_a_failing_script_fails_the_run_and_is_named(self, servers: tuple[str, str], tmp_path: Path) -> None:
        write_script(tmp_path, "bench_good.py", FIGURE + "\n")
        write_script(tmp_path, "bench_broken.py", "import sys\nprint('half way')\nsys.exit(3)\n")
        write_script(tmp_path, "bench_silent.py", "print('done, but no figure')\n")
        out = self.run_all(servers, "--scripts-dir", str(tmp_path), timeout=120)
        assert out.returncode == 1, out.stderr[-2000:]
        results = {r["name"]: r for r in json.loads(out.stdout)["results"]}
        assert results["good"]["error"] == "" and results["good"]["figures"][0]["figure"] == "1/s"
        assert results["broken"]["error"].startswith("exit 3")
        assert "no figures" in results["silent"]["error"]
        assert "FAILED: broken" in out.stderr and "silent" in out.stderr.split("FAILED:")[-1]

    @pytest.mark.slow
    def test_every_script_runs_at_its_smallest_sizes(self, servers: tuple[str, str]) -> None:
        out = self.run_all(servers, "--smoke", "--jobs", "4", timeout=600)
        report = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
        assert out.returncode == 0, (out.stderr[-4000:], report)
        ran = {r["name"] for r in report["results"]}
        assert ran == {b.name for b in bench_all.discover()}
        for result in report["results"]:
            assert result["error"] == "" and result["figures"], result
            if result["name"] != "review":  # the review pages have no baseline: latencies alone
                # Each ratio says what both sides did.
                assert all(f["baseline"] and f["work"] and f["baseline_work"] for f in result["figures"]), result
