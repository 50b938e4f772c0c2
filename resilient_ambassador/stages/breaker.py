"""Circuit breaker stage: one per upstream, in front of every attempt (inside retry, so a
retry passes the breaker again and an open breaker is never retried).

pybreaker owns the state machine: the consecutive-failure counter, closed -> open at
`fail_max`, half-open -> closed after `success_threshold` successes, half-open -> open on a
failed probe, and the listeners that see every transition. This stage owns what pybreaker
cannot do on trio: admission (open / half-open with a probe limit, on trio's clock) and
deciding what an outcome is before pybreaker hears about it.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import final

import pybreaker
import trio

from resilient_ambassador.core.breaker_window import VolumeWindow
from resilient_ambassador.core.config import BreakerConfig
from resilient_ambassador.core.errors import (
    BreakerOpen,
    DeadlineExceeded,
    StaleConnection,
    UpstreamError,
    UpstreamPoolTimeout,
)
from resilient_ambassador.core.messages import Handler, Request, Response

log = logging.getLogger("resilient_ambassador.breaker")

# Retry-After is sent in whole seconds (rounded up), so 1 s is the smallest hint there is; a
# probe in flight normally settles the half-open state well within it.
HALF_OPEN_RETRY_AFTER_S = 1.0

# UpstreamErrors that say nothing about the upstream's health, so they never count:
# - UpstreamPoolTimeout: our own connection pool is saturated (local overload, a burst of our
#   traffic). Counting it would let local load cut off a healthy upstream for reset_timeout_s;
#   a slow upstream holding the connections shows up as UpstreamTimeout on those calls anyway.
# - StaleConnection: the peer closed an idle keep-alive connection, which RFC 9112 9.3.1 allows
#   at any time; the client replays it (a non-replayable one becomes UpstreamProtocolError).
# - DeadlineExceeded: the route's overall budget ran out, and a client may shorten that budget
#   with the deadline header; a client must not be able to trip the breaker for everyone.
NOT_UPSTREAM_FAULTS: tuple[type[UpstreamError], ...] = (
    UpstreamPoolTimeout,
    StaleConnection,
    DeadlineExceeded,
)

# pybreaker's fail_max while the volume guard is not met: a streak can never reach it.
_UNREACHABLE_FAIL_MAX = sys.maxsize


class _Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NOT_COUNTED = "not_counted"  # cancelled, client gone, client error, local saturation


class _ReportedFailure(Exception):
    """Raised inside `breaker.calling()` to report a failure; never leaves this module."""


@final
@dataclass(frozen=True, slots=True)
class BreakerStats:
    """A snapshot for /stats. Counters are totals since start."""

    upstream: str
    state: str  # "closed", "open" or "half-open" (pybreaker's names)
    consecutive_failures: int  # pybreaker's fail_counter
    successes: int  # calls that reached the upstream and counted as a success
    failures: int  # calls that counted as a failure (error or failure status)
    not_counted: int  # cancelled, client gone, client error, local saturation
    rejected: int  # answered with BreakerOpen without calling the upstream
    opened: int  # times the breaker opened
    probes_in_flight: int


@final
@dataclass(frozen=True, slots=True)
class BreakerChange:
    """A state change, as change hooks see it (see `BreakerStage.add_change_hook`)."""

    upstream: str
    state: str  # the new state: "closed", "open" or "half-open"
    # True when `open_for()` opened it (another replica's verdict), False when this
    # replica's own calls did.
    forced: bool = False
    open_for_s: float = 0.0  # when opened: seconds until a probe may pass


@final
class BreakerStage:
    """Circuit breaker for one upstream, shared by every route to it.

    Outcomes. A failure is an `UpstreamError` from the inner handler (connect, DNS, TLS,
    timeouts, protocol errors; not those in `NOT_UPSTREAM_FAULTS`) or a response whose status
    is in `config.failure_statuses`; that response is still returned to the caller. Any other
    response (4xx included) is a success. Anything else the inner handler raises - a client
    disconnect, a `ClientError`, `trio.Cancelled`, a bug - counts as neither and is re-raised
    unchanged, never as `CircuitBreakerError`.

    Why the outcome is reported after the await: pybreaker counts anything leaving
    `breaker.calling()` as a failure, and an `exclude` predicate turns it into a success (which
    resets the failure streak, and in half-open can close the breaker on a probe that never
    answered). Neither is true of a cancelled call. So the stage awaits the inner handler
    outside pybreaker, classifies the result, and reports successes and failures through
    `with breaker.calling(): ...` synchronously (no await, so nothing can cancel it); calls
    that count as neither are simply not reported. Admission is done here for the same reason:
    pybreaker's open -> half-open check reads `datetime.now()` and lets every concurrent call
    through in half-open. The stage checks open time on `clock` (trio's, so MockClock works),
    moves pybreaker to half-open with its public `half_open()`, and lets at most
    `half_open_max_probes` probes through at once.

    A result is reported only if the breaker has not changed state since the call was
    admitted: a late failure from before the breaker opened must not push the open period
    back, and a late success from a non-probe must not close a half-open breaker.

    Volume guard: pybreaker opens when its consecutive-failure counter reaches `fail_max`,
    checked at the failure. Right before reporting an outcome the stage sets `fail_max` to
    `failure_threshold` if at least `min_requests` counted calls finished in the last
    `window_s`, else to an unreachable number. The streak keeps counting either way, so a
    quiet upstream opens as soon as the volume is there and the streak is long enough.

    Open: `BreakerOpen` (503, `retry_after_s` = time left until half-open) is raised at once,
    never a response, so an outer cache stage can catch it and serve a stale copy instead
    (stale-if-error); the retry stage must not retry it.

    Not seen: errors while the caller streams the response body happen after this stage has
    returned; the breaker has already counted the response head.

    Sharing (docs/shared-breaker.md): `add_change_hook` tells a sync task about transitions,
    and `open_for` opens a closed breaker for a given time on another replica's word; what
    follows (BreakerOpen, then half-open probes) is the same as after a local open.
    """

    def __init__(
        self,
        inner: Handler,
        config: BreakerConfig,
        *,
        name: str,
        clock: Callable[[], float] = trio.current_time,
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
    ) -> None:
        """`listeners` are extra pybreaker listeners: the hook for metrics and traces."""
        self._inner = inner
        self.config = config
        self.name = name
        self._clock = clock
        self._window = VolumeWindow(config.min_requests, config.window_s)
        self._epoch = 0  # bumped on every state change; see _settle
        self._half_open_at: float | None = None  # on `clock`; set when it opens
        self._forced_open_s: float | None = None  # set only while open_for() opens it
        self._change_hooks: list[Callable[[BreakerChange], None]] = []
        self._probes_in_flight = 0
        self._successes = 0
        self._failures = 0
        self._not_counted = 0
        self._rejected = 0
        self._opened = 0
        # With only our own listeners, a success on a closed breaker with no failure streak
        # changes nothing in pybreaker (counter 0 -> 0, no transition), so it can skip pybreaker
        # on the hot path; an extra listener may want its `success` callback, so not then.
        self._quiet_success_shortcut = not listeners
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=config.failure_threshold,
            reset_timeout=config.reset_timeout_s,
            success_threshold=config.success_threshold,
            # Ours first: the log line and telemetry then see the new opened_at.
            listeners=[_Transitions(self._on_state_change), _LogListener(self), *listeners],
            name=name,
        )

    @property
    def state(self) -> str:
        """pybreaker's state name: closed, open or half-open. An open breaker whose timeout has
        elapsed stays open until the next call moves it to half-open (as in pybreaker)."""
        state: str = self._breaker.current_state
        return state

    def time_until_half_open(self) -> float:
        """Seconds left before an open breaker lets a probe through (0 if not open)."""
        if self.state != pybreaker.STATE_OPEN or self._half_open_at is None:
            return 0.0
        return max(0.0, self._half_open_at - self._clock())

    def add_change_hook(self, hook: Callable[[BreakerChange], None]) -> None:
        """Call `hook` on every state change, synchronously on the calling task and after the
        stage's own bookkeeping (so `time_until_half_open()` already holds for an open). It
        must not block or call back into the stage; an exception from it is logged and
        dropped, never raised into a request. (pybreaker has not updated `state` yet when
        hooks run: use `change.state`.)"""
        self._change_hooks.append(hook)

    def open_for(self, remaining_s: float) -> bool:
        """Open a closed breaker for `remaining_s` seconds (another replica saw the upstream
        fail); then half-open probing proceeds as after a local open. Does nothing (False) if
        the breaker is not closed: an open one keeps its own timer, a half-open one lets its
        probe decide. Calls admitted before are not counted, as after any transition."""
        if remaining_s <= 0 or self.state != pybreaker.STATE_CLOSED:
            return False
        self._forced_open_s = remaining_s
        try:
            self._breaker.open()  # pybreaker's public API: listeners see closed -> open
        finally:
            self._forced_open_s = None
        return True

    def stats(self) -> BreakerStats:
        return BreakerStats(
            upstream=self.name,
            state=self.state,
            consecutive_failures=self._breaker.fail_counter,
            successes=self._successes,
            failures=self._failures,
            not_counted=self._not_counted,
            rejected=self._rejected,
            opened=self._opened,
            probes_in_flight=self._probes_in_flight,
        )

    async def __call__(self, request: Request) -> Response:
        try:
            probe = self._admit()
        except BreakerOpen:
            request.outcome.breaker = "open"
            raise
        epoch = self._epoch
        try:
            try:
                response = await self._inner(request)
            except BaseException as exc:
                self._settle(epoch, _classify_error(exc, self.config.failure_errors))
                raise
            outcome = (
                _Outcome.FAILURE if response.status in self.config.failure_statuses else _Outcome.SUCCESS
            )
            try:
                self._settle(epoch, outcome)
            except BaseException:
                response.release()  # we drop it: hand the connection back
                raise
            return response
        finally:
            if probe:
                self._probes_in_flight -= 1

    def _admit(self) -> bool:
        """Let the call through (True if it is a half-open probe) or raise BreakerOpen."""
        state = self.state
        if state == pybreaker.STATE_CLOSED:
            return False
        if state == pybreaker.STATE_OPEN:
            left_s = self.time_until_half_open()
            if left_s > 0:
                self._rejected += 1
                raise BreakerOpen(
                    f"circuit breaker for upstream {self.name!r} is open; next probe in {left_s:.1f}s",
                    upstream=self.name,
                    retry_after_s=left_s,
                )
            self._breaker.half_open()
        if self._probes_in_flight >= self.config.half_open_max_probes:
            self._rejected += 1
            raise BreakerOpen(
                f"circuit breaker for upstream {self.name!r} is half-open and its probe"
                f"{'s are' if self.config.half_open_max_probes > 1 else ' is'} in flight",
                upstream=self.name,
                retry_after_s=HALF_OPEN_RETRY_AFTER_S,
            )
        self._probes_in_flight += 1
        return True

    def _settle(self, epoch: int, outcome: _Outcome) -> None:
        """Count the outcome and report it to pybreaker (synchronously: nothing can cancel it)."""
        if outcome is _Outcome.NOT_COUNTED:
            self._not_counted += 1
            return
        now = self._clock()
        self._window.record(now)
        failed = outcome is _Outcome.FAILURE
        if failed:
            self._failures += 1
        else:
            self._successes += 1
        if epoch != self._epoch:
            return  # admitted under an earlier state: its verdict is stale
        if (
            not failed
            and self._quiet_success_shortcut
            and self._breaker.fail_counter == 0
            and self._breaker.current_state == pybreaker.STATE_CLOSED
        ):
            return
        self._breaker.fail_max = (
            self.config.failure_threshold if self._window.satisfied(now) else _UNREACHABLE_FAIL_MAX
        )
        try:
            with self._breaker.calling():
                if failed:
                    raise _ReportedFailure
        except (_ReportedFailure, pybreaker.CircuitBreakerError):
            # CircuitBreakerError here only means "this failure opened it": the caller still
            # gets the upstream's own answer, since this call did reach the upstream.
            pass

    def _on_state_change(self, new_state: str) -> None:
        self._epoch += 1
        forced = self._forced_open_s is not None
        open_for_s = 0.0
        if new_state == pybreaker.STATE_OPEN:
            self._opened += 1
            open_for_s = self.config.reset_timeout_s if self._forced_open_s is None else self._forced_open_s
            self._half_open_at = self._clock() + open_for_s
        change = BreakerChange(upstream=self.name, state=new_state, forced=forced, open_for_s=open_for_s)
        for hook in self._change_hooks:
            try:
                hook(change)
            except Exception:
                log.exception("breaker change hook failed for upstream %s", self.name)


def maybe_breaker(
    inner: Handler,
    config: BreakerConfig,
    name: str,
    *,
    listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
) -> Handler:
    """The breaker around `inner`, or `inner` itself when the breaker is disabled (no stage,
    no per-call cost)."""
    if not config.enabled:
        return inner
    return BreakerStage(inner, config, name=name, listeners=listeners)


def _classify_error(exc: BaseException, kinds: frozenset[str]) -> _Outcome:
    if (
        isinstance(exc, UpstreamError)
        and not isinstance(exc, NOT_UPSTREAM_FAULTS)
        and exc.failure_kind in kinds
    ):
        return _Outcome.FAILURE
    return _Outcome.NOT_COUNTED


@final
class _Transitions(pybreaker.CircuitBreakerListener):
    """Feeds pybreaker's transitions back to the stage (open time on our clock, epoch)."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        # Use new_state, not cb.current_state: pybreaker notifies before it updates storage.
        self._on_change(new_state.name)


@final
class _LogListener(pybreaker.CircuitBreakerListener):
    """State changes to the log: opening is a warning, recovery steps are info."""

    def __init__(self, stage: BreakerStage) -> None:
        self._stage = stage

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        stage = self._stage
        old = old_state.name if old_state is not None else "?"
        if new_state.name == pybreaker.STATE_OPEN:
            forced_s = stage._forced_open_s
            if forced_s is not None:
                why = "another replica opened it"
            elif old == pybreaker.STATE_HALF_OPEN:
                why = "a probe failed"
            else:
                why = f"{cb.fail_counter} consecutive failures"
            log.warning(
                "circuit breaker for upstream %s opened (%s): answering 503 for %gs",
                stage.name,
                why,
                round(forced_s if forced_s is not None else stage.config.reset_timeout_s, 3),
            )
        elif new_state.name == pybreaker.STATE_HALF_OPEN:
            log.info(
                "circuit breaker for upstream %s half-open: up to %d probe(s) pass",
                stage.name,
                stage.config.half_open_max_probes,
            )
        else:
            log.info("circuit breaker for upstream %s closed (was %s)", stage.name, old)
