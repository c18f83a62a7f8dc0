"""Money and credits as people read them: minor units formatted by each currency's own exponent.

Stripe counts every amount in the currency's smallest unit. Most currencies have two decimals (1000 usd is
$10.00), the zero-decimal ones have none (1000 jpy is ¥1,000), and five have three (1000 kwd is KWD 1.000).
https://docs.stripe.com/currencies#zero-decimal and #three-decimal.

Display only: the stored values (minor units, credit units, Decimal USD) are never rounded by this module.
JSON and CSV keep the exact values; tables, pages and summaries use these functions.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

# https://docs.stripe.com/currencies#zero-decimal
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
# https://docs.stripe.com/currencies#three-decimal
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

# Costs from providers are fractions of a cent per call: below a dollar they keep four decimals, so a column of
# small calls does not read as a column of $0.00.
USD_SMALL_PLACES = 4
USD_PLACES = 2
NO_VALUE = "—"


def exponent(currency: str | None) -> int:
    """How many decimals the currency's minor unit has in Stripe's API (2 unless listed otherwise)."""
    code = (currency or "").strip().lower()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def to_major(minor: int | Decimal, currency: str | None) -> Decimal:
    """Minor units to an exact Decimal amount in the currency's major unit: (1999, 'usd') -> 19.99."""
    places = exponent(currency)
    return Decimal(minor).scaleb(-places)


def to_minor(major: Decimal, currency: str | None) -> int:
    """A major-unit amount to whole minor units, rounding half to even (for converted amounts)."""
    return int((major.scaleb(exponent(currency))).to_integral_value(rounding=ROUND_HALF_EVEN))


def _decimal(value: object) -> Decimal | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _grouped(amount: Decimal, places: int) -> str:
    """An amount with thousands separators and exactly ``places`` decimals (half to even), sign in front."""
    quantized = amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    return f"{quantized:,.{places}f}"


def format_money(minor: object, currency: object) -> str:
    """Minor units as money: (1000, 'usd') -> $10.00, (1000, 'jpy') -> JPY 1,000, (5124, 'kwd') -> KWD 5.124.

    US dollars get the dollar sign; every other currency its upper-case ISO code, so no symbol is ambiguous
    ($ is also the sign of a dozen other dollars). Without a currency the number is shown with two decimals
    and marked unknown rather than guessed.
    """
    amount = _decimal(minor)
    if amount is None:
        return NO_VALUE if minor is None or minor == "" else str(minor)
    code = str(currency or "").strip().lower()
    text = _grouped(to_major(amount, code), exponent(code))
    if code == "usd":
        return f"-${text[1:]}" if text.startswith("-") else f"${text}"
    return f"{code.upper() or '(currency unknown)'} {text}"


def format_usd(value: object, places: int | None = None) -> str:
    """A Decimal USD amount (provider costs, revenue): $1,234.57, or $0.0123 below a dollar; exact in JSON.

    ``places`` fixes the decimals; by default two from a dollar up and four below it.
    """
    amount = _decimal(value)
    if amount is None:
        return NO_VALUE if value is None or value == "" else str(value)
    if places is None:
        places = USD_PLACES if abs(amount) >= 1 or not amount else USD_SMALL_PLACES
    text = _grouped(amount, places)
    if amount and Decimal(text.replace(",", "")) == 0:
        # Smaller than the last shown decimal: say so instead of printing a zero for a cost that is not.
        return f"{'-' if amount < 0 else ''}<${Decimal(1).scaleb(-places)}"
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def format_credits(units: object, *, label: bool = False) -> str:
    """Credit units as a whole number with thousands separators: 1234567 -> 1,234,567 (credits)."""
    amount = _decimal(units)
    if amount is None:
        return NO_VALUE if units is None or units == "" else str(units)
    text = f"{amount:,f}" if amount != amount.to_integral_value() else f"{int(amount):,}"
    return f"{text} credits" if label else text


def format_amount(value: object, unit: object = "minor", currency: object = None) -> str:
    """An amount in its unit, as reconciliation records them: money in minor units (with its currency),
    credits, tokens, USD, or a plain count."""
    amount = _decimal(value)
    if amount is None:
        return NO_VALUE if value is None or value == "" else str(value)
    if unit == "minor":
        return format_money(amount, currency)
    if unit == "usd":
        return format_usd(amount)
    if unit == "credits":
        return format_credits(amount, label=True)
    text = format_credits(amount.normalize())
    return f"{text} {unit}" if unit == "tokens" else text
