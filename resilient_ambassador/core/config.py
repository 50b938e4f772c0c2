"""The validated configuration model: what every other module reads.

Built by `resilient_ambassador.config_loader` from YAML (or from CLI flags in one-liner mode).
Every value here is already parsed and checked: durations are float seconds (`*_s`), sizes are
int bytes (`*_bytes`). Frozen, so a running request can never see a half-changed config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, final

from resilient_ambassador.core.templates import Template

KiB = 1024
MiB = 1024 * KiB


@final
@dataclass(frozen=True, slots=True)
class UpstreamURL:
    """An upstream origin: scheme, host, port and an optional base path prefixed to every target."""

    scheme: Literal["http", "https", "tcp", "tls"]
    host: str
    port: int
    base_path: str = ""

    @property
    def uses_tls(self) -> bool:
        return self.scheme in ("https", "tls")

    @property
    def authority(self) -> str:
        """Host header value: the port is omitted when it is the scheme's default (RFC 9110 7.2)."""
        default = {"http": 80, "https": 443}.get(self.scheme)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}"


@final
@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS origination towards an upstream. Verification is on unless explicitly turned off."""

    verify: bool = True
    ca_file: str | None = None  # None: system CAs (and SSL_CERT_FILE / SSL_CERT_DIR)
    cert_file: str | None = None  # client certificate for mTLS
    key_file: str | None = None
    server_name: str | None = None  # SNI + name checked; None: the URL host
    min_version: Literal["1.2", "1.3"] = "1.2"


@final
@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    # 3.5 s is Varnish's connect timeout: long enough for a cross-region TLS handshake,
    # short enough that a dead endpoint does not hold the app's request for a minute.
    connect_s: float = 3.5
    # Time from the request being sent to the response head arriving (Envoy's route timeout
    # default is 15 s).
    response_s: float = 15.0
    # Longest silence between two reads of a response body.
    read_idle_s: float = 60.0


@final
@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_connections: int = 100
    # Close pooled connections idle this long; below typical upstream keep-alive timeouts
    # (nginx 75 s) so we rarely reuse one the peer is about to close.
    idle_timeout_s: float = 60.0
    # How long a request waits for a free connection when max_connections are busy.
    acquire_timeout_s: float = 5.0


# RFC 9110 9.2.2: methods whose repetition has the same intended effect; POST and PATCH are not.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
DEFAULT_FAILURE_STATUSES: frozenset[int] = frozenset({502, 503, 504})
# Upstream error kinds a breaker may count (see core.errors `failure_kind`).
FAILURE_ERROR_KINDS: frozenset[str] = frozenset({"connect", "dns", "tls", "timeout", "bad_response"})


@final
@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Circuit breaker for one upstream (pybreaker's state machine), in front of every attempt."""

    enabled: bool = True
    # Consecutive failures that open the breaker (pybreaker `fail_max`; Envoy outlier detection
    # ejects after 5 consecutive 5xx).
    failure_threshold: int = 5
    # Open -> half-open after this long (Envoy's base ejection time is 30 s).
    reset_timeout_s: float = 30.0
    # Successful probes needed in half-open to close again (pybreaker `success_threshold`).
    success_threshold: int = 1
    # Concurrent probes let through while half-open; the rest fail fast.
    half_open_max_probes: int = 1
    # Volume guard: never open unless at least this many requests were seen in `window_s`,
    # so a quiet upstream is not cut off by a short streak of bad luck.
    min_requests: int = 10
    window_s: float = 10.0
    failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
    failure_errors: frozenset[str] = FAILURE_ERROR_KINDS
    # "redis": an open breaker is shared with every daemon using the same Redis (see
    # docs/shared-breaker.md); "none": this process only.
    shared: Literal["none", "redis"] = "none"
    sync_interval_s: float = 0.5  # how often shared state is read back from Redis


@final
@dataclass(frozen=True, slots=True)
class RedisConfig:
    """The Redis that shared state (breakers now; limits and cache later) lives in."""

    # redis://host:6379/0, rediss://, sentinel://host:26379/master, redis+cluster://host:6379
    # (core.redis_target); None: no shared state
    url: str | None = None
    # Budget for one Redis round trip: past it the call is abandoned and we fall back to local
    # state (redis-py's own retries would turn a dead Redis into multi-second stalls).
    timeout_s: float = 0.25
    key_prefix: str = "ra:"
    # rediss:// and rediss+cluster://: CA, client certificate, verification (server_name is not
    # supported: redis-py checks the host in the URL). None: system CAs, no client certificate.
    tls: TLSConfig | None = None


@final
@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries for one route, Envoy-style, bounded by a budget so a failing upstream never
    sees a retry storm."""

    retries: int = 1  # extra attempts after the first (Envoy's num_retries default); 0 = off
    methods: frozenset[str] = IDEMPOTENT_METHODS
    on_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
    # Full-jitter exponential backoff: sleep uniform(0, min(max, base * 2**n)); Envoy's base is
    # 25 ms and its cap 10x the base.
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    per_try_timeout_s: float | None = None  # None: only the upstream's response timeout
    # Retries may add at most this share on top of requests in the window (Envoy/Linkerd 20%),
    # with a floor so a quiet route can still retry.
    budget_ratio: float = 0.2
    budget_min_per_s: float = 3.0
    budget_window_s: float = 10.0
    # Request bodies up to this size are buffered so they can be replayed; larger ones are
    # streamed and never retried.
    buffer_body_bytes: int = 64 * KiB
    # Honour an upstream `Retry-After` on 429/503 (give up when it is past the deadline).
    respect_retry_after: bool = True


@final
@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A route's rate limit (docs/resilience.md): GCRA, `count` per `period_s` with a burst,
    one bucket per descriptor (`key`)."""

    count: float
    period_s: float
    burst: int  # requests admitted at once; the loader defaults it to one second's worth
    # route: one bucket for the route; upstream: one for every route to the upstream with this
    # key; client_ip: per downstream peer; header: per value of `key_header`; credential: per
    # injected credential (hashed), shared by every route to the upstream.
    key: Literal["route", "upstream", "client_ip", "header", "credential"] = "route"
    key_header: str | None = None  # lower-case; set when key is "header"
    # reject: 429 at once; queue: wait (FIFO) for a token up to max_wait, then 429.
    mode: Literal["reject", "queue"] = "reject"
    # Long enough to smooth a burst into the rate, short enough that an app's own timeout
    # (often 5-10 s) is not spent waiting in our queue; never past the request's deadline.
    max_wait_s: float = 2.0
    max_queue: int = 100  # waiters per route and process; more are rejected at once
    backend: Literal["memory", "redis"] = "memory"
    # When Redis does not answer: local (this process's share of the rate: rate /
    # expected_replicas), allow (fail open), deny (fail closed, 429).
    on_backend_failure: Literal["local", "allow", "deny"] = "local"
    expected_replicas: int = 1
    # Tokens a process takes from a Redis bucket per round trip (0: one per decision). Only
    # with backend redis and mode reject; at most the burst (docs/configuration.md).
    lease: int = 0


@final
@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Upstream-quota awareness: read the upstream's RateLimit / X-RateLimit / Retry-After and
    hold its traffic until the reset instead of hammering it."""

    enabled: bool = False
    # queue: wait out a pause (or a pacing slot) up to max_wait, else 429 at once; reject:
    # 429 with the upstream's reset as Retry-After while paused.
    mode: Literal["reject", "queue"] = "queue"
    max_wait_s: float = 2.0
    # Pace requests once Remaining is at or below this share of the limit.
    pace_below: float = 0.1
    # redis: a pause is shared with every daemon using the same Redis.
    shared: Literal["none", "redis"] = "none"


@final
@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: UpstreamURL
    tls: TLSConfig = field(default_factory=TLSConfig)
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # Injected on every request to this upstream, replacing any client copy.
    headers: tuple[tuple[str, Template], ...] = ()
    # Injected query parameters, replacing any client copy of the same name.
    query: tuple[tuple[str, Template], ...] = ()
    # Host header sent upstream; None: the URL authority.
    host_header: str | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)


@final
@dataclass(frozen=True, slots=True)
class RouteCacheConfig:
    """The response cache for one route (RFC 9111 shared cache; docs/resilience.md)."""

    enabled: bool = False
    # For responses without freshness information (no max-age, s-maxage or Expires) whose
    # status is cacheable by default; None: such responses are only kept for stale serving.
    default_ttl_s: float | None = None
    max_ttl_s: float | None = None  # caps every freshness lifetime, the upstream's included
    key_headers: tuple[str, ...] = ()  # lower-case request headers whose values join the key
    # Entries are keyed by a hash of the injected credential, so pods with different keys
    # never share them; only matters when the upstream injects a secret.
    partition_by_credential: bool = True
    # Windows used when the response does not set its own (RFC 5861 directives win).
    stale_while_revalidate_s: float = 0.0
    stale_if_error_s: float = 0.0
    heuristic: bool = False  # RFC 9111 4.2.2 heuristic freshness (10% of Last-Modified age)
    store_set_cookie: bool = False  # nginx and Varnish do not store responses that set cookies
    # A client's `Cache-Control: no-cache` / `max-age=0` forces a revalidation only when this is
    # on. Off by default, as in nginx and Varnish: some HTTP clients send it on every request,
    # which would spend the upstream quota the cache is there to save.
    respect_client_no_cache: bool = False
    # Larger responses stream through and are not stored (never buffered whole).
    max_object_bytes: int = 1 * MiB
    # How long concurrent misses for one key wait for the one request in flight (nginx's
    # proxy_cache_lock_timeout is 5 s); then they go upstream themselves.
    coalesce_wait_s: float = 5.0


@final
@dataclass(frozen=True, slots=True)
class RouteConfig:
    upstream: str
    name: str = ""
    prefix: str = "/"  # matched on path segment boundaries: "/api" matches "/api/x", not "/apix"
    host: str | None = None  # exact match on the request Host (port ignored), case-insensitive
    rewrite_prefix: str | None = None  # replaces the matched prefix when set
    max_request_body_bytes: int = 1 * MiB  # nginx's client_max_body_size default
    # Overall deadline for the request, retries and backoff included; None: no overall bound
    # beyond each attempt's timeouts.
    timeout_s: float | None = None
    retry: RetryConfig = field(default_factory=RetryConfig)
    # A breaker of the route's own instead of the upstream's shared one (e.g. for one slow
    # endpoint that should not cut off the rest of the API); None: the upstream's.
    breaker: BreakerConfig | None = None
    # A client header that may shorten (never lengthen) the deadline, e.g. X-Request-Timeout;
    # None: ignored and stripped. Only for trusted clients.
    deadline_header: str | None = None
    rate_limit: RateLimitConfig | None = None  # None: no limit
    cache: RouteCacheConfig = field(default_factory=RouteCacheConfig)


@final
@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Downstream limits; defaults follow Envoy/nginx/HAProxy (see shared HARDENING table)."""

    max_request_line_bytes: int = 8 * KiB
    max_header_bytes: int = 32 * KiB
    max_header_count: int = 100
    header_read_timeout_s: float = 10.0  # slowloris guard -> 408
    body_read_timeout_s: float = 60.0  # whole request body must arrive within this -> 408
    send_timeout_s: float = 60.0  # a client that stops reading is dropped after this
    keepalive_timeout_s: float = 60.0
    max_requests_per_connection: int = 1000  # then `Connection: close`, as nginx does
    max_connections: int = 10_000


@final
@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """TLS terminated on a tcp listener (a local TLS terminator in front of the relay)."""

    cert_file: str
    key_file: str


@final
@dataclass(frozen=True, slots=True)
class RelayConfig:
    """A tcp listener's relay: where its connections go and how they are protected (see
    docs/configuration.md, TCP listeners)."""

    upstreams: tuple[UpstreamURL, ...]  # tcp:// or tls:// addresses
    # "ordered": the first that connects wins (failover); "round_robin": start at the next one.
    balance: Literal["ordered", "round_robin"] = "ordered"
    connect_timeout_s: float = 3.5  # per address, TLS handshake included (see UpstreamTimeouts)
    # No byte either way for this long closes the tunnel (Envoy's tcp_proxy idle_timeout is 1 h).
    idle_timeout_s: float = 3600.0
    tls: TLSConfig = field(default_factory=TLSConfig)  # origination, for tls:// addresses
    max_connections: int = 1000
    # At max_connections: "refuse" closes the new connection at once, "queue" holds it (unread)
    # up to queue_timeout_s for a slot.
    on_limit: Literal["refuse", "queue"] = "refuse"
    queue_timeout_s: float = 5.0
    # New connections per period as (count, per_s), e.g. 100/s; the bucket holds `count`
    # tokens so a burst of that size passes. None: no limit.
    connection_rate: tuple[float, float] | None = None
    # Counts connect and handshake failures (all addresses failed); open: refuse at once.
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@final
@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    protocol: Literal["http", "tcp"] = "http"
    routes: tuple[RouteConfig, ...] = ()
    limits: ClientLimits = field(default_factory=ClientLimits)
    relay: RelayConfig | None = None  # set exactly when protocol is "tcp"
    tls: ListenerTLS | None = None  # tcp listeners only; None: plain TCP


@final
@dataclass(frozen=True, slots=True)
class DrainConfig:
    # Below Kubernetes' default terminationGracePeriodSeconds (30 s) so we exit before SIGKILL.
    grace_period_s: float = 25.0
    # After SIGTERM, keep serving (with /readyz at 503) this long before we stop accepting,
    # so endpoint removal reaches every kube-proxy first. delay + grace_period must stay
    # under terminationGracePeriodSeconds.
    delay_s: float = 0.0


@final
@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener (/healthz, /readyz, /stats, /config). Never on a data port."""

    enabled: bool = True
    # Loopback by default: /stats and /config describe the deployment and must not be
    # reachable from outside the pod unless someone asks for it. 9901 is Envoy's admin port.
    host: str = "127.0.0.1"
    port: int = 9901


@final
@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """One line per request (JSON by default, so log pipelines need no parsing rules)."""

    enabled: bool = True
    format: Literal["json", "text"] = "json"
    path: str = "-"  # "-" is stdout, where Kubernetes collects container logs


@final
@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """OpenTelemetry settings; None means "as the OTEL_* environment variables say"."""

    traces_exporter: Literal["none", "console", "otlp"] | None = None
    metrics_exporter: Literal["none", "otlp"] | None = None
    service_name: str | None = None
    otlp_endpoint: str | None = None  # base URL, e.g. http://collector:4318
    sampler_ratio: float | None = None  # parent-based trace-id ratio, 0..1
    metrics_interval_s: float | None = None  # OTLP push interval; None: OTEL_METRIC_EXPORT_INTERVAL or 60s


@final
@dataclass(frozen=True, slots=True)
class CacheStoreConfig:
    """Where cached responses live: this process (`memory`) or a Redis shared by every pod
    (`redis`, with an in-process near-cache in front)."""

    backend: Literal["memory", "redis"] = "memory"
    max_bytes: int = 64 * MiB  # memory backend: LRU bound on bodies plus headers
    near_cache_bytes: int = 16 * MiB  # redis backend: the in-process copy in front of Redis
    # A near-cache copy is served without asking Redis for at most this long (and never past
    # its freshness), so a purge or an update on another pod shows up within it.
    near_cache_ttl_s: float = 1.0


@final
@dataclass(frozen=True, slots=True)
class DNSConfig:
    """How upstream host names are resolved (docs/configuration.md, `dns`). getaddrinfo gives
    no TTL, so `max_ttl_s` is how long an answer is used, like nginx's `resolver valid=`."""

    # Short enough that a rescheduled pod behind a headless service (or a changed external
    # record) is picked up within half a minute; one lookup per name per 30 s costs nothing.
    max_ttl_s: float = 30.0
    # A failed lookup is remembered this long, so a broken name costs one lookup per period
    # instead of one per request (Envoy retries failed DNS at its 5 s refresh rate).
    negative_ttl_s: float = 2.0
    # Past max_ttl an answer is still served for this long while one background refresh runs
    # (or after it failed: a CoreDNS restart does not take upstreams down with it).
    max_stale_s: float = 60.0
    # Budget of one lookup; below the 3.5 s connect timeout so a hung resolver is reported as
    # a DNS failure (glibc's own per-try timeout is 5 s).
    timeout_s: float = 2.0


@final
@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    upstreams: dict[str, UpstreamConfig]
    drain: DrainConfig = field(default_factory=DrainConfig)
    source: str = "<flags>"  # the file it came from, for messages
    redis: RedisConfig = field(default_factory=RedisConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    # Processes serving the same ports (SO_REUSEPORT); state in memory is per process.
    workers: int = 1
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    cache: CacheStoreConfig = field(default_factory=CacheStoreConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
