"""Nightly reconciliation of the ledger against Stripe and AI provider cost reports.

* :mod:`reconciliation.providers` parses OpenAI and Anthropic cost/usage reports into typed Decimal rows;
* :mod:`reconciliation.staging` pages Stripe (through a :class:`~reconciliation.stripe_source.StripeSource`,
  the worker's gateway in production) into per-run staging tables, one page at a time;
* :mod:`reconciliation.checks` compares the staged rows and the ledger in SQL, one function per mismatch kind;
* :mod:`reconciliation.engine` runs it all (:func:`~reconciliation.engine.reconcile`) and records the run;
* :mod:`reconciliation.services` keeps mismatches by stable fingerprint and runs the review workflow
  (resolve, ignore, reopen, with notes and an audit trail);
* :mod:`reconciliation.cli` is ``billing-reconciler reconcile`` and ``billing-reconciler mismatches ...``.
"""
