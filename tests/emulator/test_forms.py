"""Stripe's form encoding, decoded."""

from __future__ import annotations

import pytest
from stripe_emulator.forms import FormError, decode_form


class TestDecodeForm:
    def test_nested_keys_indexed_and_appended_lists(self) -> None:
        body = (
            "customer=cus_1&metadata[a]=1&metadata[b]=&expand[]=x&expand[]=y.z"
            "&line_items[0][price]=p&line_items[0][quantity]=2&line_items[1][price]=q&created[gte]=5"
        )

        assert decode_form(body) == {
            "customer": "cus_1",
            "metadata": {"a": "1", "b": ""},
            "expand": ["x", "y.z"],
            "line_items": [{"price": "p", "quantity": "2"}, {"price": "q"}],
            "created": {"gte": "5"},
        }

    def test_url_escapes_as_the_stripe_package_sends_them(self) -> None:
        assert decode_form("expand%5B0%5D=data.line_items&types%5B0%5D=a&types%5B1%5D=b") == {
            "expand": ["data.line_items"],
            "types": ["a", "b"],
        }

    def test_broken_brackets_are_an_error(self) -> None:
        with pytest.raises(FormError):
            decode_form("a[b=c")
