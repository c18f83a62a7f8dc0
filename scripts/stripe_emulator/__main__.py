"""Run the emulator as a process: ``python -m stripe_emulator --port 12111`` (or ``python scripts/stripe_emulator``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a directory: make the package importable by name
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from stripe_emulator import DEFAULT_API_VERSION, EmulatorServer, Store
else:
    from . import DEFAULT_API_VERSION, EmulatorServer, Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stripe_emulator", description="A local Stripe API emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--api-version", default=DEFAULT_API_VERSION)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--demo-customers", type=int, default=0, help="create this many customers with a top-up each at start"
    )
    parser.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="call FUNCTION(store) from MODULE before serving, to build a dataset (repeatable)",
    )
    parser.add_argument("--no-events", action="store_true", help="do not record events (smaller bulk datasets)")
    args = parser.parse_args(argv)
    store = Store(api_version=args.api_version, seed=args.seed, record_events=not args.no_events)
    for target in args.load:
        module_name, _, function_name = target.partition(":")
        if not function_name:
            parser.error(f"--load takes MODULE:FUNCTION, got {target!r}")
        getattr(importlib.import_module(module_name), function_name)(store)
    for index in range(args.demo_customers):
        customer = store.create_customer(email=f"customer{index}@example.com", name=f"Customer {index}")
        store.topup(customer)
    server = EmulatorServer(store, host=args.host, port=args.port)
    print(f"stripe emulator listening on {server.url} (api version {store.api_version})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
