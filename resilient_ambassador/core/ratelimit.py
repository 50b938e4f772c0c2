"""Rate-limit maths: GCRA decisions, descriptor keys and the IETF RateLimit header values.

GCRA (the generic cell rate algorithm) is a token bucket kept as one number, the theoretical
arrival time (TAT) of the next request: no refill task, and one read-modify-write per decision,
which is what lets Redis run it as one atomic script. With an emission interval `T = period /
count` and a burst of `B`, a request at `now` is admitted when `max(tat, now) + T - B*T <= now`;
then the TAT moves on by `T`. Any window of length `t` admits at most `B + t/T` requests.

A request may also *reserve* a later slot (queue mode): if the slot is at most `max_wait_s`
away, the TAT is advanced now and the caller waits until its slot. Reservations are handed out
in call order, so waiters are served first come, first served.

A process may also *lease* tokens (`Leased`): take several from a shared bucket in one step
and admit locally while it holds them. A leased token keeps the slot it was charged for and is
given up once that slot is due (the time a request on the non-leasing path would have taken it),
so leasing never admits more in a window than the bucket would have.

Everything here is pure: the clock is an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import final

from resilient_ambassador.core.fingerprint import fingerprint

# A token due within a microsecond counts as due: float sums such as 0.1 + 0.1 + 0.1 must not
# refuse a request that arrives exactly on time (Redis's clock has microseconds, no finer).
EPSILON_S = 1e-6


@final
@dataclass(frozen=True, slots=True)
class Limit:
    """`count` requests per `period_s`, with up to `burst` admitted at once."""

    count: float
    period_s: float
    burst: int

    @property
    def interval_s(self) -> float:
        """The emission interval: one token comes back every this many seconds."""
        return self.period_s / self.count

    def scaled(self, share: float) -> Limit:
        """This limit's share for one of several processes (`share` = 1 / replicas); the burst
        shrinks with it but never below one."""
        return Limit(self.count * share, self.period_s, max(1, math.floor(self.burst * share)))


def default_burst(count: float, period_s: float) -> int:
    """One second's worth of the rate (at least 1): `10/s` -> 10, `600/m` -> 10, `1/m` -> 1."""
    return max(1, math.ceil(count / period_s - 1e-9))


@final
@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request against one limit.

    `allowed`: it may go, after `wait_s` (0 unless a queued slot was reserved). Otherwise
    `retry_after_s` says when a token will be free. `remaining` is the tokens left after this
    decision and `reset_s` the time until the bucket is full again (for the RateLimit header).
    """

    allowed: bool
    wait_s: float = 0.0
    retry_after_s: float = 0.0
    remaining: int = 0
    reset_s: float = 0.0


def decision_from(allowed: bool, wait_s: float, ahead_s: float, limit: Limit) -> Decision:
    """A Decision from the raw outcome of a GCRA step: `ahead_s` is how far the TAT is ahead
    of now after the step (the time until the bucket is full again). Shared by the in-memory
    maths and the Redis script, which returns exactly these three numbers."""
    ahead_s = max(0.0, ahead_s)
    interval = limit.interval_s
    if not allowed:
        return Decision(False, retry_after_s=max(0.0, wait_s), remaining=0, reset_s=ahead_s)
    # Tokens left: how many more intervals fit before the TAT passes now + burst*T. A small
    # epsilon keeps 2.9999999 from rounding a whole token away.
    remaining = max(0, math.floor((limit.burst * interval - ahead_s) / interval + 1e-9))
    return Decision(True, wait_s=max(0.0, wait_s), remaining=remaining, reset_s=ahead_s)


def gcra(tat: float, now: float, limit: Limit, max_wait_s: float = 0.0) -> tuple[Decision, float]:
    """One GCRA step: the decision and the new TAT (unchanged when rejected).

    `max_wait_s` > 0 reserves a later slot when one is that close; 0 admits only now."""
    interval = limit.interval_s
    new_tat = max(tat, now) + interval
    wait_s = new_tat - limit.burst * interval - now
    if wait_s > max_wait_s + EPSILON_S:
        return decision_from(False, wait_s, tat - now, limit), tat
    return decision_from(True, wait_s, new_tat - now, limit), new_tat


# How long a leased token stays usable after the lease was asked for. Tokens are charged to
# the shared bucket when they are leased, so one used later counts against an earlier window:
# this bounds how much later (and how long an unused one stays idle).
LEASE_TTL_S = 1.0


@final
@dataclass(slots=True)
class Leased:
    """Tokens this process holds for one shared bucket: `count` of them, usable until `until`.

    They were charged to the bucket when leased, so using them later can put more admissions
    in a window than the bucket alone allows: at most the tokens held when the window opens,
    `(lease - 1) x processes` (docs/configuration.md, "Leasing tokens"). A strict rule (a
    token given up when its slot in the bucket is due) has no such excess, but a token leased
    from a bucket with room is due at once, so a generous limit got nothing from its lease."""

    until: float
    count: int

    def take(self, now: float) -> bool:
        """Use one token; False when none is left or they expired."""
        if self.count <= 0 or now >= self.until:
            self.count = 0
            return False
        self.count -= 1
        return True

    def usable(self, now: float) -> int:
        return self.count if now < self.until else 0


def leased_after(granted: int, sent_at: float, ttl_s: float = LEASE_TTL_S) -> Leased:
    """What remains of a lease of `granted` tokens after the caller used the first. `sent_at`
    is our clock when the call went out, so the expiry comes out early, never late."""
    return Leased(sent_at + ttl_s, max(0, granted - 1))


# -- descriptors --------------------------------------------------------------------------------

KEY_KINDS = ("route", "upstream", "client_ip", "header", "credential")


def descriptor_key(kind: str, scope: str, value: bytes = b"") -> str:
    """The bucket's name: a hash of what the request is limited by, so a Redis key never holds
    client input or a credential, and its length never depends on what a client sent.
    `scope` is the route (or upstream) name; `value` the client address, header value or
    credential fingerprint (empty for `route` and `upstream`)."""
    return fingerprint((kind.encode(), scope.encode(), value), domain=b"ratelimit")


# -- IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers) --------------------------------


def policy_header(name: str, limit: Limit) -> bytes:
    """`RateLimit-Policy: "name";q=Q;w=W`: quota Q per window W whole seconds. A sub-second or
    fractional period is expressed over the nearest whole-second window."""
    window_s = max(1, round(limit.period_s))
    quota = max(1, math.floor(limit.count * window_s / limit.period_s + 1e-9))
    return f'"{_sf_string(name)}";q={quota};w={window_s}'.encode()


def ratelimit_header(name: str, decision: Decision) -> bytes:
    """`RateLimit: "name";r=R;t=T`: R requests left, T whole seconds until the quota resets."""
    reset = math.ceil(decision.retry_after_s if not decision.allowed else decision.reset_s)
    return f'"{_sf_string(name)}";r={decision.remaining};t={max(0, reset)}'.encode()


def _sf_string(text: str) -> str:
    """A structured-field sf-string body (RFC 8941 3.3.3): printable ASCII, `"` and `\\` escaped."""
    out = []
    for ch in text:
        if not " " <= ch <= "~":
            continue
        out.append("\\" + ch if ch in '"\\' else ch)
    return "".join(out)


@final
class ConnectionRate:
    """New connections on a tcp listener (`relay.connection_rate`): the same GCRA as request
    limits, `count` per `per_s` with a burst of one period's worth (a restart does not refuse
    the first wave of reconnects). Pure: the caller passes `now`."""

    __slots__ = ("_limit", "_tat")

    def __init__(self, count: float, per_s: float) -> None:
        if count <= 0 or per_s <= 0:
            raise ValueError("a rate needs a count and a period greater than 0")
        self._limit = Limit(count, per_s, max(1, math.floor(count)))
        self._tat = -math.inf

    def try_take(self, now: float) -> bool:
        """Take one token if there is one; False means refuse this connection."""
        decision, self._tat = gcra(self._tat, now, self._limit)
        return decision.allowed
