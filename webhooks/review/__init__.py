"""Review pages: mismatches, reconciliation runs and customers, for finance and support staff."""
