"""What the demo and the benchmark runner refuse to do: delete a directory they did not make, run without servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CLI = (sys.executable, "-c", "from worker.cli import main; main()")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}


class TestDemoWorkdir:
    def test_refuses_to_recreate_a_directory_it_did_not_make(self, tmp_path: Path) -> None:
        precious = tmp_path / "notes.txt"
        precious.write_text("keep me", encoding="utf-8")
        proc = subprocess.run(
            [*CLI, "demo", "--no-wait", "--port", "0", "--workdir", str(tmp_path)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "not a demo work directory" in proc.stderr
        assert precious.read_text(encoding="utf-8") == "keep me"


class TestBenchAll:
    def test_says_it_needs_postgres_and_redis(self) -> None:
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "bench_all.py"),
                "--database-url",
                "postgresql+psycopg://postgres@127.0.0.1:9/nowhere",
                "--broker-url",
                "redis://127.0.0.1:9/0",
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2
        assert "needs PostgreSQL and Redis" in proc.stderr
        assert "PostgreSQL at postgresql+psycopg://postgres@127.0.0.1:9/nowhere does not answer" in proc.stderr
        assert "Redis at redis://127.0.0.1:9/0 does not answer" in proc.stderr
