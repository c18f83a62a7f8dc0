"""A plain Python model of one ledger account, written from the documented rules, not from the ledger's code.

The rules (README, the docstrings of ledger.consume, ledger.holds, ledger.grants, ledger.clawback):
- a grant adds its units to the balance; outstanding debt is settled from it first (its remaining is less by that);
- consumption draws grants with units left in order: higher priority first, then earliest expiry (never-expiring
  last), then oldest; a grant whose expiry has passed is not drawn, and the first draw after it lapsed expires
  what is left of it (the balance drops by that); what no grant covers within the overdraft limit becomes debt;
- a request the balance (less lapsed units) plus overdraft cannot cover is refused whole, nothing written;
- a hold draws like a consumption and raises ``held``; capturing charges what the call used (less than held gives
  the rest back, more draws what the balance allows and reports the shortfall); releasing gives all back; giving
  back first cancels debt the hold created, then refills the grants it drew, last drawn first, and any rest goes
  to the account's newest grant;
- a freeze (dispute opened) sets aside what remains of a grant, out of the balance; an unfreeze gives it back;
- a clawback takes units back from a grant, never more than it gave net of earlier clawbacks: from its remaining
  units first, then its frozen ones, the rest (already spent) becomes debt;
- replaying a request id with the same parameters changes nothing and returns the original result.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Refused(Exception):
    """The model refuses: what the ledger must refuse too."""

    def __init__(self, kind: str, available: int | None = None) -> None:
        super().__init__(kind, available)
        self.kind = kind
        self.available = available


@dataclass
class ModelGrant:
    index: int  # creation order (the ledger's ids grow with it)
    units: int
    remaining: int
    priority: int
    expiry: str  # "never", "lapsed" (already past), "later" (a day away)
    clawed: int = 0
    frozen: int = 0

    def draw_key(self) -> tuple[int, int, int, int]:
        # Higher priority first; then earliest expiry ("lapsed" < "later" < never); then oldest.
        rank = {"lapsed": 0, "later": 1, "never": 2}[self.expiry]
        return (-self.priority, rank == 2, rank, self.index)


@dataclass
class ModelHold:
    units: int
    drawn: list[tuple[int, int]]  # (grant index, units) in draw order
    debt_funded: int
    status: str = "open"
    capture_units: object = None  # the units argument of its capture, once captured
    capture_result: tuple[int, int, int, int, int] | None = None


@dataclass
class ModelAccount:
    overdraft: int = 0
    balance: int = 0
    debt: int = 0
    held: int = 0
    grants: list[ModelGrant] = field(default_factory=list)
    holds: dict[str, ModelHold] = field(default_factory=dict)

    # --- drawing -----------------------------------------------------------------------------------------------

    def _lapsed(self) -> list[ModelGrant]:
        return [g for g in self.grants if g.expiry == "lapsed" and g.remaining > 0]

    def available(self) -> int:
        return max(0, self.balance - sum(g.remaining for g in self._lapsed()) + self.overdraft)

    def _expire_lapsed(self) -> int:
        expired = 0
        for g in self._lapsed():
            self.balance -= g.remaining
            expired += g.remaining
            g.remaining = 0
        return expired

    def _debit(self, units: int, *, partial: bool = False) -> tuple[int, list[tuple[int, int]], int]:
        if units == 0:
            return 0, [], 0
        available = self.available()
        if available < units:
            if not partial:
                raise Refused("insufficient", available)
            units = available
        self._expire_lapsed()
        need = units
        funded = []
        for g in sorted((g for g in self.grants if g.remaining > 0 and g.expiry != "lapsed"), key=ModelGrant.draw_key):
            if need == 0:
                break
            take = min(need, g.remaining)
            g.remaining -= take
            funded.append((g.index, take))
            need -= take
        return units, funded, need

    def _give_back(self, units: int, drawn: list[tuple[int, int]], debt_funded: int) -> None:
        debt_back = min(units, debt_funded, self.debt)
        left = units - debt_back
        for index, took in reversed(drawn):
            if left == 0:
                break
            give = min(left, took)
            self.grants[index].remaining += give
            left -= give
        if left:
            self.grants[-1].remaining += left
        self.balance += units
        self.debt -= debt_back

    # --- operations --------------------------------------------------------------------------------------------

    def grant(self, units: int, priority: int, expiry: str) -> tuple[int, int]:
        """(grant index, balance after)."""
        settle = min(units, self.debt)
        self.grants.append(ModelGrant(len(self.grants), units, units - settle, priority, expiry))
        self.balance += units
        self.debt -= settle
        return len(self.grants) - 1, self.balance

    def consume(self, units: int) -> tuple[int, int, list[tuple[int, int]]]:
        """(units charged, balance after, (grant index, units) in draw order)."""
        drawn, funded, uncovered = self._debit(units)
        self.balance -= drawn
        self.debt += uncovered
        return drawn, self.balance, funded

    def hold(self, request_id: str, units: int) -> tuple[int, int]:
        """(units held, balance after)."""
        drawn, funded, uncovered = self._debit(units)
        self.balance -= drawn
        self.debt += uncovered
        self.held += drawn
        self.holds[request_id] = ModelHold(drawn, funded, uncovered)
        return drawn, self.balance

    def capture(self, request_id: str, units: int | None) -> tuple[int, int, int, int, int]:
        """(held, captured, released, shortfall, balance after); a repeat with the same units replays."""
        hold = self.holds[request_id]
        if hold.status == "captured":
            if hold.capture_units != units:
                raise Refused("conflict")
            assert hold.capture_result is not None
            return hold.capture_result
        if hold.status != "open":
            raise Refused("not_open")
        wanted = hold.units if units is None else units
        extra = shortfall = 0
        if wanted > hold.units:
            extra, _funded, uncovered = self._debit(wanted - hold.units, partial=True)
            shortfall = wanted - hold.units - extra
            self.balance -= extra
            self.debt += uncovered
        captured = min(wanted, hold.units) + extra
        self.held -= hold.units
        released = hold.units - min(wanted, hold.units)
        if released:
            self._give_back(released, hold.drawn, hold.debt_funded)
        hold.status, hold.capture_units = "captured", units
        hold.capture_result = (hold.units, captured, released, shortfall, self.balance)
        return hold.capture_result

    def release(self, request_id: str, *, expired: bool = False) -> str:
        """The hold's status after; releasing a released or expired hold again changes nothing."""
        hold = self.holds[request_id]
        if hold.status in ("released", "expired"):
            return hold.status
        if hold.status == "captured":
            raise Refused("not_open")
        self._give_back(hold.units, hold.drawn, hold.debt_funded)
        self.held -= hold.units
        hold.status = "expired" if expired else "released"
        return hold.status

    def expire(self) -> tuple[int, int]:
        """Expire lapsed grants, then release every open hold (all are past their ten minutes an hour on)."""
        grants = len(self._lapsed())
        self._expire_lapsed()
        opened = [rid for rid, h in self.holds.items() if h.status == "open"]
        for rid in opened:
            self.release(rid, expired=True)
        return grants, len(opened)

    def clawback(self, index: int, units: int) -> tuple[int, int]:
        """(units taken from the grant's remaining and frozen units, units recorded as debt)."""
        g = self.grants[index]
        wanted = min(units, g.units - g.clawed)
        from_remaining = min(wanted, g.remaining)
        from_frozen = min(wanted - from_remaining, g.frozen)
        debt = wanted - from_remaining - from_frozen
        g.remaining -= from_remaining
        g.frozen -= from_frozen
        g.clawed += wanted
        self.balance -= from_remaining + debt  # frozen units already left the balance when frozen
        self.debt += debt
        return from_remaining + from_frozen, debt

    def freeze(self, index: int) -> int:
        """Units frozen."""
        g = self.grants[index]
        units, g.remaining, g.frozen = g.remaining, 0, g.frozen + g.remaining
        self.balance -= units
        return units

    def unfreeze(self, index: int) -> int:
        """Units given back."""
        g = self.grants[index]
        units, g.frozen, g.remaining = g.frozen, 0, g.remaining + g.frozen
        self.balance += units
        return units
