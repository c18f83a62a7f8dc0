"""The test suite (a package, so that tests/reconciliation is never imported as the real reconciliation)."""
