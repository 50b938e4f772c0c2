"""The response cache stage: outermost in a route's pipeline, so a hit spends no retry budget,
no rate-limit token and never reaches the breaker.

What it decides comes from `core.cache_rules`; this file does the waiting and the streaming:

- a miss streams the upstream response to the client while copying it (up to
  `max_object_bytes`) for the store; a larger one streams through and is not stored, and an
  aborted one (client gone, upstream reset) leaves no partial entry;
- concurrent misses for one key make one upstream request (the others wait for it, bounded by
  `coalesce_wait_s`, then go upstream themselves); with Redis a lease extends this across pods;
- stale-while-revalidate answers at once and refreshes in the background, one refresh per key;
- stale-if-error: when the inner pipeline raises any `ProxyError` (connect error, timeout, open
  breaker, a local 429) or answers 5xx, a stale copy within its window is served instead,
  without another upstream call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import final

import trio

from resilient_ambassador.core.cache_control import CacheControl, cache_control
from resilient_ambassador.core.cache_rules import (
    CONDITIONAL_HEADERS,
    UNSAFE_METHODS,
    CachedEntry,
    Freshness,
    KeyBuilder,
    build_entry,
    cache_status,
    freshness,
    has_credentials,
    has_validators,
    hit_status,
    merge_not_modified,
    never_usable,
    not_modified,
    not_modified_headers,
    not_stored_reason,
    request_bypass_reason,
    request_wants_revalidation,
    response_headers,
    revalidation_headers,
    same_origin_paths,
    usable_on_error,
    vary_matches,
)
from resilient_ambassador.core.config import RouteCacheConfig
from resilient_ambassador.core.errors import ClientError, ProxyError
from resilient_ambassador.core.messages import (
    EMPTY_BODY,
    Body,
    BufferedBody,
    Handler,
    Outcome,
    Request,
    Response,
)
from resilient_ambassador.stores.cache_memory import CacheStore

log = logging.getLogger("resilient_ambassador.cache")

CACHE_STATUS = b"cache-status"
# How often a pod that lost the Redis lease looks for the entry another pod is fetching.
PEER_POLL_S = 0.05


@final
@dataclass(slots=True)
class CacheStats:
    """Counters for /stats, shared by every route's stage."""

    hits: int = 0
    misses: int = 0
    stale_served: int = 0  # stale-while-revalidate and stale-if-error answers
    stale_if_error: int = 0
    revalidated: int = 0  # 304 from the upstream refreshed an entry
    stored: int = 0
    not_stored: int = 0
    bypassed: int = 0  # methods and requests the cache does not handle
    collapsed: int = 0  # waited for another request's response instead of going upstream
    background_refreshes: int = 0
    invalidations: int = 0


@final
class _Flight:
    """One upstream request for a key that others may wait on."""

    __slots__ = ("done", "entry", "failed", "failed_status")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.entry: CachedEntry | None = None
        # The upstream failed (an error, or this 5xx): waiters with a stale copy serve it
        # instead of asking again.
        self.failed = False
        self.failed_status: int | None = None


@final
class CacheStage:
    """RFC 9111 shared cache in front of `inner` for one route."""

    def __init__(
        self,
        inner: Handler,
        config: RouteCacheConfig,
        store: CacheStore,
        *,
        route: str,
        authority: bytes = b"",
        partition: Callable[[], str] = lambda: "",
        stats: CacheStats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inner = inner
        self._config = config
        self._store = store
        self._route = route
        self._authority = authority  # the upstream's, for same-origin Location invalidation
        self._partition = partition if config.partition_by_credential else (lambda: "")
        self._keys = KeyBuilder(route, tuple(name.encode() for name in config.key_headers))
        self.stats = stats or CacheStats()
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._refreshing: set[str] = set()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery background refreshes run in (the app starts this)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- the request path ------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        bypass = request_bypass_reason(request.method, request.headers)
        if bypass is not None:
            self.stats.bypassed += 1
            request.outcome.cache = "bypass"
            if request.method in UNSAFE_METHODS:
                return await self._unsafe(request)
            return _with_status(await self._inner(request), cache_status(fwd=bypass))
        req_cc = cache_control(request.headers)
        partition = self._partition()
        key = self._keys.key(request.target, partition, request.headers)
        entry = await self._store.get(key)
        fwd = "uri-miss"
        if entry is not None and not self._usable_for(entry, request):
            entry, fwd = None, "vary-miss"
        revalidate = self._config.respect_client_no_cache and request_wants_revalidation(req_cc)
        if entry is not None:
            now = self._clock()
            state = freshness(entry, now, revalidate=revalidate)
            if state is Freshness.FRESH:
                self.stats.hits += 1
                request.outcome.cache = "hit"
                return self._answer(request, entry, now, hit_status(entry.ttl_s(now)))
        # Every variant of the URL shares this one: what an unsafe method invalidates.
        url = self._keys.url(request.target, partition)
        if entry is None:
            return await self._miss(request, req_cc, key, url, fwd)
        if state is Freshness.STALE_WHILE_REVALIDATE and self._refresh_later(request, entry, key, url):
            self.stats.stale_served += 1
            request.outcome.cache = "stale"
            status = cache_status(hit=True, ttl_s=entry.ttl_s(now), detail="stale-while-revalidate")
            return self._answer(request, entry, now, status)
        fwd = "request" if revalidate else "stale"
        return await self._revalidate_once(request, req_cc, entry, key, url, fwd)

    async def _revalidate_once(
        self, request: Request, req_cc: CacheControl, entry: CachedEntry, key: str, url: str, fwd: str
    ) -> Response:
        """Concurrent requests for one stale entry make one revalidation: the others wait for
        it, then answer from what it stored, or serve their stale copy if it failed (no second
        upstream call during an outage)."""
        flight = self._flights.get(key)
        if flight is not None:
            refreshed = await self._wait_for(flight, request)
            if refreshed is not None and refreshed.ttl_s(self._clock()) > 0:
                return self._collapsed(request, refreshed)
            if flight.failed and (stale := self._stale_on_error(request, entry, flight.failed_status)):
                return stale
            return await self._revalidate(request, req_cc, entry, key, url, fwd)
        flight = _Flight()
        self._flights[key] = flight
        try:
            return await self._revalidate(request, req_cc, entry, key, url, fwd, flight=flight)
        except BaseException:
            self._finish(key, flight, None)
            raise

    def _usable_for(self, entry: CachedEntry, request: Request) -> bool:
        if entry.vary and not vary_matches(entry, request.headers):
            return False
        # RFC 9111 3.5: only entries the origin marked shareable answer credentialed requests.
        return entry.credentials_ok or not has_credentials(request.headers)

    def _answer(self, request: Request, entry: CachedEntry, now: float, status: bytes) -> Response:
        """A response from a stored entry: 304 when the client's own conditional matches a
        2xx (an error has no representation to be unchanged), headers only for HEAD, `Age`
        always."""
        if 200 <= entry.status < 300 and not_modified(request.headers, entry.headers):
            headers = not_modified_headers(entry.headers)
            headers.append((b"age", str(int(entry.age_s(now))).encode()))
            headers.append((CACHE_STATUS, status))
            return Response(304, headers, EMPTY_BODY, b"Not Modified")
        headers = response_headers(entry, now)
        headers.append((CACHE_STATUS, status))
        body = EMPTY_BODY if request.method == b"HEAD" else BufferedBody(entry.body)
        return Response(entry.status, headers, body, entry.reason)

    # -- misses and coalescing -------------------------------------------------------------

    async def _miss(self, request: Request, req_cc: CacheControl, key: str, url: str, fwd: str) -> Response:
        self.stats.misses += 1
        request.outcome.cache = "miss"
        if request.method != b"GET":
            # A HEAD cannot fill the cache, so it neither leads nor waits for a GET.
            return await self._fetch(request, req_cc, key, url, fwd, None)
        flight = self._flights.get(key)
        if flight is not None:
            entry = await self._wait_for(flight, request)
            if entry is not None:
                return self._collapsed(request, entry)
            return await self._fetch(request, req_cc, key, url, fwd, None)
        flight = _Flight()
        self._flights[key] = flight
        try:
            if not await self._store.lease(key, self._config.coalesce_wait_s):
                entry = await self._wait_for_peer(request, key)
                if entry is not None:
                    self._finish(key, flight, entry)
                    return self._collapsed(request, entry)
            return await self._fetch(request, req_cc, key, url, fwd, flight)
        except BaseException:
            self._finish(key, flight, None)
            raise

    async def _wait_for(self, flight: _Flight, request: Request) -> CachedEntry | None:
        with trio.move_on_after(self._config.coalesce_wait_s):
            await flight.done.wait()
        entry = flight.entry
        return entry if entry is not None and self._usable_for(entry, request) else None

    async def _wait_for_peer(self, request: Request, key: str) -> CachedEntry | None:
        """Another pod holds the lease: poll the store for its entry, within the bound. None
        (go upstream) once the bound passes or the lease comes free without an entry, in
        which case this pod now holds the lease."""
        with trio.move_on_after(self._config.coalesce_wait_s):
            while True:
                await trio.sleep(PEER_POLL_S)
                entry = await self._store.get(key)
                if entry is not None and self._usable_for(entry, request):
                    return entry
                if await self._store.lease(key, self._config.coalesce_wait_s):
                    return None
        return None

    def _collapsed(self, request: Request, entry: CachedEntry) -> Response:
        self.stats.collapsed += 1
        request.outcome.cache = "hit"
        now = self._clock()
        return self._answer(
            request, entry, now, cache_status(hit=True, ttl_s=entry.ttl_s(now), collapsed=True)
        )

    def _failed(self, key: str, flight: _Flight | None, status: int | None) -> None:
        if flight is not None:
            flight.failed, flight.failed_status = True, status
        self._finish(key, flight, None)

    def _finish(self, key: str, flight: _Flight | None, entry: CachedEntry | None) -> None:
        if flight is None or flight.done.is_set():
            return
        self._store.release_lease(key)
        flight.entry = entry
        flight.done.set()
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _fetch(
        self,
        request: Request,
        req_cc: CacheControl,
        key: str,
        url: str,
        fwd: str,
        flight: _Flight | None,
    ) -> Response:
        """Forward a miss without the client's conditionals (so a full, storable response
        comes back; we answer the conditional ourselves), then store and send it."""
        headers = [(n, v) for n, v in request.headers if n not in CONDITIONAL_HEADERS]
        request_time = self._clock()
        try:
            response = await self._inner(request.replace(headers=headers))
        except BaseException:
            self._finish(key, flight, None)
            raise
        return await self._store_and_send(request, req_cc, response, key, url, fwd, flight, request_time)

    async def _store_and_send(
        self,
        request: Request,
        req_cc: CacheControl,
        response: Response,
        key: str,
        url: str,
        fwd: str,
        flight: _Flight | None,
        request_time: float,
        fwd_status: int | None = None,
    ) -> Response:
        response_time = self._clock()
        res_cc = cache_control(response.headers)
        why = not_stored_reason(
            request.method, request.headers, req_cc, response.status, response.headers, res_cc, self._config
        )
        if why is None and never_usable(
            response.status, response.headers, res_cc, response_time, self._config
        ):
            why = "stale"  # nothing would ever use it: no freshness, no stale window, no validator
        if (
            why is None
            and response.body.length is not None
            and response.body.length > self._config.max_object_bytes
        ):
            why = "size"

        def make(body: bytes) -> CachedEntry:
            return build_entry(
                key=key,
                url_key=url,
                target=request.target,
                request_headers=request.headers,
                status=response.status,
                reason=response.reason,
                headers=response.headers,
                body=body,
                request_time=request_time,
                response_time=response_time,
                config=self._config,
            )

        if why is None and make(b"").storage_ttl_s(response_time) <= 0:
            why = "stale"  # nothing would ever use it: no freshness and no stale window
        if why is not None:
            self.stats.not_stored += 1
            self._finish(key, flight, None)
            status = cache_status(fwd=fwd, fwd_status=fwd_status, detail=why)
            if 200 <= response.status < 300 and not_modified(request.headers, response.headers):
                response.release()
                return Response(304, [*not_modified_headers(response.headers), (CACHE_STATUS, status)])
            return _with_status(response, status)

        def complete(body: bytes | None) -> None:
            if body is None:
                self._finish(key, flight, None)
                return
            entry = make(body)
            self._store.put(entry)
            self.stats.stored += 1
            self._finish(key, flight, entry)

        status = cache_status(fwd=fwd, fwd_status=fwd_status, stored=True)
        if 200 <= response.status < 300 and not_modified(request.headers, response.headers):
            # The client already has it: read the body for the store here, answer 304.
            body = await _read_limited(response, self._config.max_object_bytes)
            complete(body)
            return Response(304, [*not_modified_headers(response.headers), (CACHE_STATUS, status)])
        tee = TeeBody(response.body, self._config.max_object_bytes, complete)
        original_release = response.release

        def release() -> None:
            original_release()
            tee.abandon()

        return Response(
            response.status, [*response.headers, (CACHE_STATUS, status)], tee, response.reason, release
        )

    # -- stale entries -----------------------------------------------------------------------

    async def _revalidate(
        self,
        request: Request,
        req_cc: CacheControl,
        entry: CachedEntry,
        key: str,
        url: str,
        fwd: str,
        *,
        background: bool = False,
        flight: _Flight | None = None,
    ) -> Response:
        """Ask the upstream (conditionally when the entry has validators); serve the stale
        entry instead if that fails and stale-if-error allows it."""
        if has_validators(entry):
            headers = revalidation_headers(request.headers, entry)
        else:
            headers = [(n, v) for n, v in request.headers if n not in CONDITIONAL_HEADERS]
        request_time = self._clock()
        fallback = not background and usable_on_error(entry, request_time)
        try:
            response = await self._inner(request.replace(headers=headers, stale_fallback=fallback))
        except ClientError:
            self._finish(key, flight, None)
            raise  # the client's own fault (its body, its deadline header): no stale cover
        except ProxyError as exc:
            self._failed(key, flight, None)
            stale = None if background else self._stale_on_error(request, entry, None)
            if stale is None:
                raise
            log.info("serving stale %s after %s", _path(request), exc.reason)
            return stale
        if response.status >= 500 and not background:
            stale = self._stale_on_error(request, entry, response.status)
            if stale is not None:
                self._failed(key, flight, response.status)
                response.release()
                return stale
        if response.status == 304 and has_validators(entry):
            response.release()
            merged = merge_not_modified(
                entry,
                response.headers,
                request_time=request_time,
                response_time=self._clock(),
                config=self._config,
            )
            self._store.put(merged)
            self._finish(key, flight, merged)
            self.stats.revalidated += 1
            request.outcome.cache = "revalidated"
            now = self._clock()
            status = cache_status(fwd=fwd, fwd_status=304, ttl_s=merged.ttl_s(now), stored=True)
            return self._answer(request, merged, now, status)
        self.stats.misses += 1
        request.outcome.cache = "miss"
        return await self._store_and_send(
            request, req_cc, response, key, url, fwd, flight, request_time, fwd_status=response.status
        )

    def _stale_on_error(self, request: Request, entry: CachedEntry, status: int | None) -> Response | None:
        now = self._clock()
        if not usable_on_error(entry, now):
            return None
        self.stats.stale_served += 1
        self.stats.stale_if_error += 1
        request.outcome.cache = "stale"
        value = cache_status(fwd="stale", fwd_status=status, ttl_s=entry.ttl_s(now), detail="stale-if-error")
        return self._answer(request, entry, now, value)

    def _refresh_later(self, request: Request, entry: CachedEntry, key: str, url: str) -> bool:
        """Start one background refresh for `key` (unless one runs); False without a nursery."""
        if self._nursery is None:
            return False
        if key not in self._refreshing and key not in self._flights:
            self._refreshing.add(key)
            detached = Request(
                method=b"GET",
                target=request.target,
                headers=list(request.headers),
                http_version=request.http_version,
                client_ip=request.client_ip,
                outcome=Outcome(),
            )
            self._nursery.start_soon(self._refresh, detached, entry, key, url)
        return True

    async def _refresh(self, request: Request, entry: CachedEntry, key: str, url: str) -> None:
        self.stats.background_refreshes += 1
        try:
            response = await self._revalidate(
                request, cache_control(request.headers), entry, key, url, "stale", background=True
            )
            try:
                async for _ in response.body:
                    pass  # drives the tee into the store
            finally:
                response.release()
        except ProxyError as exc:
            log.debug("background refresh of %s failed: %s", _path(request), exc.reason)
        finally:
            self._refreshing.discard(key)

    # -- unsafe methods ----------------------------------------------------------------------

    async def _unsafe(self, request: Request) -> Response:
        """RFC 9111 4.4: a non-error answer to POST/PUT/DELETE/PATCH invalidates the URL and
        same-origin Location/Content-Location."""
        response = await self._inner(request)
        if response.status < 400:
            partition = self._partition()
            for target in (request.target, *same_origin_paths(response.headers, self._authority)):
                self._store.invalidate(self._keys.url(target, partition))
                self.stats.invalidations += 1
        return _with_status(response, cache_status(fwd="method"))


@final
class TeeBody:
    """Streams a body to the client while copying it, up to `limit_bytes`, for the store.
    `complete` gets the whole body after the last chunk, or None (too large, failed, or
    abandoned before the end): a partial body is never stored."""

    __slots__ = ("_body", "_chunks", "_complete", "_done", "_iter", "_limit", "_size")

    def __init__(self, body: Body, limit_bytes: int, complete: Callable[[bytes | None], None]) -> None:
        self._body = body
        self._iter: AsyncIterator[bytes] | None = None
        self._limit = limit_bytes
        self._complete = complete
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._done = False

    @property
    def length(self) -> int | None:
        return self._body.length

    @property
    def replayable(self) -> bool:
        return False

    def ready(self) -> bool:
        return self._body.ready()

    def __aiter__(self) -> TeeBody:
        return self

    async def __anext__(self) -> bytes:
        if self._iter is None:
            self._iter = aiter(self._body)
        try:
            chunk = await anext(self._iter)
        except StopAsyncIteration:
            self._end(b"".join(self._chunks) if self._chunks is not None else None)
            raise
        except BaseException:
            self._end(None)
            raise
        if self._chunks is not None:
            self._size += len(chunk)
            if self._size > self._limit:
                self._chunks = None  # too large: keep streaming, stop copying
            else:
                self._chunks.append(chunk)
        return chunk

    def abandon(self) -> None:
        self._end(None)

    def _end(self, body: bytes | None) -> None:
        if not self._done:
            self._done = True
            self._complete(body)


async def _read_limited(response: Response, limit_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.body:
            size += len(chunk)
            if size > limit_bytes:
                return None
            chunks.append(chunk)
    finally:
        response.release()
    return b"".join(chunks)


def _with_status(response: Response, value: bytes) -> Response:
    response.headers = [*response.headers, (CACHE_STATUS, value)]
    return response


def _path(request: Request) -> str:
    """For a log line: the path without the query (it may carry a token), bounded."""
    return request.path[:200].decode("latin-1")
