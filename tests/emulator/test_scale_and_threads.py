"""Paging cost stays O(page) however big the store is, and the server is safe under concurrent use."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import stripe
from stripe_emulator import Clock, EmulatorServer, Store

from .conftest import START


class CountingDict(dict[str, Any]):
    """The store's object table, counting lookups."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        CountingDict.lookups += 1
        return super().get(key, default)


def _big_store(topups: int, customers: int) -> tuple[Store, list[str]]:
    store = Store(clock=Clock(START), record_events=False)
    ids = [store.create_customer().id for _ in range(customers)]
    for index in range(topups):
        if index % 50 == 0:
            store.clock.advance(60)
        store.topup(ids[index % customers])
    return store, ids


class TestPagingCost:
    def test_a_page_deep_in_a_big_list_reads_about_a_page_of_objects(self) -> None:
        store, customers = _big_store(4000, 40)
        store._objects = CountingDict(store._objects)  # type: ignore[assignment]
        everything_ids = [key[2] for key in store._keys["charge"]]
        cursor = everything_ids[len(everything_ids) // 2]

        CountingDict.lookups = 0
        page, has_more = store.list_page("charge", limit=100, starting_after=cursor)
        deep_page_lookups = CountingDict.lookups

        CountingDict.lookups = 0
        mine, _ = store.list_page("charge", limit=100, filters={"customer": customers[7]})
        filtered_lookups = CountingDict.lookups

        CountingDict.lookups = 0
        window, _ = store.list_page("charge", limit=10, created={"gte": START + 60 * 40, "lt": START + 60 * 41})
        window_lookups = CountingDict.lookups

        assert len(page) == 100 and has_more and page[0].created <= store.get(cursor).created
        assert deep_page_lookups <= 102
        assert len(mine) == 100 and {c.customer for c in mine} == {customers[7]}  # type: ignore[attr-defined]
        assert filtered_lookups <= 101  # the customer index, not a scan of 4,000 charges
        assert len(window) == 10 and window_lookups <= 11

    def test_auto_paging_backwards_with_ending_before(self, server: EmulatorServer, store: Store) -> None:
        customer = store.create_customer()
        for _ in range(25):
            store.clock.advance(1)
            store.create_payment(customer, 100)
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url})
        newest_first = [c.id for c in client.v1.charges.list(params={"limit": 100}).data]

        older_to_newer = [
            c.id
            for c in client.v1.charges.list(params={"limit": 4, "ending_before": newest_first[-1]}).auto_paging_iter()
        ]

        assert older_to_newer == list(reversed(newest_first[:-1]))


class TestThreads:
    def test_readers_and_a_writer_at_once(self, server: EmulatorServer, store: Store) -> None:
        customer = store.create_customer()
        errors: list[str] = []
        done = threading.Event()

        def read() -> None:
            with httpx.Client(headers={"Authorization": "Bearer sk_test_x"}) as http:
                while not done.is_set():
                    page = http.get(f"{server.url}/v1/charges", params={"limit": 50})
                    if page.status_code != 200:
                        errors.append(page.text)
                        return
                    created = [(c["created"], c["id"]) for c in page.json()["data"]]
                    if [c for c, _ in created] != sorted((c for c, _ in created), reverse=True):
                        errors.append("page out of order")

        readers = [threading.Thread(target=read) for _ in range(4)]
        for reader in readers:
            reader.start()
        for index in range(300):
            if index % 10 == 0:
                store.clock.advance(1)
            store.topup(customer)
        done.set()
        for reader in readers:
            reader.join()

        assert errors == []
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url})
        assert sum(1 for _ in client.v1.charges.list(params={"limit": 100}).auto_paging_iter()) == 300
