"""Command line: `run` (config file or one-liner flags), `check-config`, `--version`.

Exit codes: 0 clean exit (including after a SIGTERM drain), 1 runtime failure, 2 usage or
config error (with the key path and line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial

import trio

from resilient_ambassador import __version__
from resilient_ambassador.config_loader import (
    ConfigError,
    admin_clash,
    config_from_flags,
    load_config,
    parse_listen_address,
    parse_redis_url,
)
from resilient_ambassador.core.config import (
    AdminConfig,
    Config,
    ListenerConfig,
    RateLimitConfig,
    RouteConfig,
    TLSConfig,
)
from resilient_ambassador.core.ratelimit import default_burst
from resilient_ambassador.core.units import parse_duration, parse_rate
from resilient_ambassador.secrets import SecretResolver

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
DEFAULT_LISTEN = "127.0.0.1:8000"

log = logging.getLogger("resilient_ambassador")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilient-ambassador",
        description="An ambassador sidecar that shields apps from flaky, slow, rate-limited APIs.",
    )
    parser.add_argument("--version", action="version", version=f"resilient-ambassador {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", metavar="FILE", help="YAML config file")
    run.add_argument("--listen", metavar="HOST:PORT", help=f"listen address (default {DEFAULT_LISTEN})")
    run.add_argument(
        "--upstream",
        metavar="URL",
        help="forward everything to this http(s):// URL, or relay TCP to tcp://HOST:PORT "
        "(tls://HOST:PORT: originate TLS for a plain-text app)",
    )
    run.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="header set on every upstream request; ${VAR} reads the environment, "
        "${file:/path} a (re-read on change) file such as a mounted Kubernetes Secret",
    )
    run.add_argument(
        "--retries", type=int, metavar="N", help="retries per request on every route (0: off; default 1)"
    )
    run.add_argument(
        "--breaker-failures",
        type=int,
        metavar="N",
        help="consecutive failures that open an upstream's circuit breaker (0: no breaker; default 5)",
    )
    run.add_argument(
        "--breaker-reset", metavar="DURATION", help="how long a breaker stays open (default 30s)"
    )
    run.add_argument(
        "--redis",
        metavar="URL",
        help="share state through this Redis (redis://host:6379/0): open breakers, --rate-limit "
        "and the cache",
    )
    run.add_argument(
        "--rate-limit",
        metavar="RATE",
        help="limit every route to RATE (10/s, 600/m, 10000/h), answering 429 over it; "
        "shared through --redis when given",
    )
    run.add_argument(
        "--burst", type=int, metavar="N", help="requests admitted at once (default: one second's worth)"
    )
    run.add_argument(
        "--cache",
        action="store_true",
        help="cache responses on every route, honouring the upstream's Cache-Control (memory; "
        "Redis with --redis)",
    )
    run.add_argument(
        "--cache-ttl",
        metavar="DURATION",
        help="cache responses without freshness information this long (implies --cache)",
    )
    run.add_argument(
        "--stale-if-error",
        metavar="DURATION",
        help="serve a stale cached copy up to this long when the upstream fails (implies --cache)",
    )
    run.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin listener for /healthz, /readyz, /stats, /config (default 127.0.0.1:9901; "
        "never a data port)",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the listening ports with SO_REUSEPORT (default 1)",
    )
    # Set by the supervisor on the workers it starts; not for people.
    run.add_argument("--worker-id", type=int, help=argparse.SUPPRESS)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="text", choices=["text", "json"])

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("resilient_ambassador")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def config_for_run(args: argparse.Namespace, resolver: SecretResolver) -> Config:
    """The config from --config with the flags laid over it, or from the flags alone."""
    if args.config is None:
        if args.upstream is None:
            raise ConfigError("give --upstream URL (one-liner mode) or --config FILE")
        config = config_from_flags(args.listen or DEFAULT_LISTEN, args.upstream, args.header, resolver)
    else:
        config = _override_file_config(load_config(args.config, resolver), args, resolver)
    config = _apply_policy_flags(config, args)
    config = _apply_cache_flags(config, args)
    if args.admin is not None:
        try:
            host, port = parse_listen_address(args.admin)
        except ValueError as exc:
            raise ConfigError(f"--admin {args.admin!r}: {exc}") from None
        config = dataclasses.replace(config, admin=AdminConfig(enabled=True, host=host, port=port))
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError("--workers: expected a whole number of at least 1")
        config = dataclasses.replace(config, workers=args.workers)
    if config.workers > 1 and args.worker_id is None:
        for listener in config.listeners:
            if listener.port == 0:
                raise ConfigError(f"listener {listener.name}: workers need a fixed port, not port 0")
        if config.admin.enabled and config.admin.port == 0:
            raise ConfigError("admin: workers need a fixed admin port, not port 0")
    if (clash := admin_clash(config)) is not None:
        admin = config.admin
        raise ConfigError(
            f"the admin listener ({admin.host}:{admin.port}) would share listener {clash.name}'s "
            "address; give --admin another HOST:PORT"
        )
    return config


def _apply_policy_flags(config: Config, args: argparse.Namespace) -> Config:
    """--retries applies to every route, --breaker-* and --redis to every upstream."""
    if args.retries is not None and args.retries < 0:
        raise ConfigError("--retries: expected a whole number")
    if args.breaker_failures is not None and args.breaker_failures < 0:
        raise ConfigError("--breaker-failures: expected a whole number")
    reset_s = None
    if args.breaker_reset is not None:
        try:
            reset_s = parse_duration(args.breaker_reset)
            if reset_s <= 0:
                raise ValueError("must be greater than 0")
        except ValueError as exc:
            raise ConfigError(f"--breaker-reset: {exc}") from None
    if args.redis is not None:
        try:
            redis_url = parse_redis_url(args.redis)
        except ValueError as exc:
            raise ConfigError(f"--redis: {exc}") from None
        config = dataclasses.replace(config, redis=dataclasses.replace(config.redis, url=redis_url))
    listeners = _apply_rate_limit_flags(config.listeners, args)
    if args.retries is not None:
        listeners = tuple(
            dataclasses.replace(
                listener,
                routes=tuple(
                    dataclasses.replace(r, retry=dataclasses.replace(r.retry, retries=args.retries))
                    for r in listener.routes
                ),
            )
            for listener in listeners
        )
    listeners = tuple(
        _relay_breaker_flags(listener, args.breaker_failures, reset_s) for listener in listeners
    )
    upstreams = dict(config.upstreams)
    for name, upstream in upstreams.items():
        breaker = upstream.breaker
        if args.breaker_failures is not None:
            breaker = dataclasses.replace(
                breaker,
                enabled=args.breaker_failures > 0,
                failure_threshold=max(1, args.breaker_failures),
            )
        if reset_s is not None:
            breaker = dataclasses.replace(breaker, reset_timeout_s=reset_s)
        if args.redis is not None:
            breaker = dataclasses.replace(breaker, shared="redis")
        upstreams[name] = dataclasses.replace(upstream, breaker=breaker)
    return dataclasses.replace(config, listeners=listeners, upstreams=upstreams)


def _apply_rate_limit_flags(
    listeners: tuple[ListenerConfig, ...], args: argparse.Namespace
) -> tuple[ListenerConfig, ...]:
    """--rate-limit sets (or replaces the rate of) every route's limit; --burst its burst; with
    --redis the flag-made limit lives in Redis, shared by every daemon using it."""
    rate_limit, burst = args.rate_limit, args.burst
    if rate_limit is None and burst is None:
        return listeners
    if burst is not None and burst < 1:
        raise ConfigError("--burst: expected a whole number greater than 0")
    rate: tuple[float, float] | None = None
    if rate_limit is not None:
        try:
            rate = parse_rate(rate_limit)
        except ValueError as exc:
            raise ConfigError(f"--rate-limit: {exc}") from None
    elif not any(r.rate_limit for listener in listeners for r in listener.routes):
        raise ConfigError("--burst: give --rate-limit too (no route has a rate limit)")

    def limited(route: RouteConfig) -> RouteConfig:
        limit = route.rate_limit
        if rate is not None:
            count, period_s = rate
            if limit is None:
                limit = RateLimitConfig(count, period_s, default_burst(count, period_s))
                if args.redis is not None:
                    limit = dataclasses.replace(limit, backend="redis")
            limit = dataclasses.replace(
                limit, count=count, period_s=period_s, burst=default_burst(count, period_s)
            )
        if limit is None:
            return route
        if burst is not None:
            limit = dataclasses.replace(limit, burst=burst)
        return dataclasses.replace(route, rate_limit=limit)

    return tuple(
        dataclasses.replace(listener, routes=tuple(limited(r) for r in listener.routes))
        for listener in listeners
    )


def _relay_breaker_flags(
    listener: ListenerConfig, failures: int | None, reset_s: float | None
) -> ListenerConfig:
    """--breaker-failures/--breaker-reset on a tcp listener's connection breaker."""
    if listener.relay is None or (failures is None and reset_s is None):
        return listener
    breaker = listener.relay.breaker
    if failures is not None:
        breaker = dataclasses.replace(breaker, enabled=failures > 0, failure_threshold=max(1, failures))
    if reset_s is not None:
        breaker = dataclasses.replace(breaker, reset_timeout_s=reset_s)
    return dataclasses.replace(listener, relay=dataclasses.replace(listener.relay, breaker=breaker))


def _apply_cache_flags(config: Config, args: argparse.Namespace) -> Config:
    """--cache, --cache-ttl and --stale-if-error turn the cache on for every route (keeping a
    file's other cache settings); --redis moves the store to Redis."""
    durations: dict[str, float] = {}
    for flag, value in (("--cache-ttl", args.cache_ttl), ("--stale-if-error", args.stale_if_error)):
        if value is None:
            continue
        try:
            durations[flag] = parse_duration(value)
            if durations[flag] <= 0:
                raise ValueError("must be greater than 0")
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    if args.redis is not None:
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, backend="redis"))
    if not (args.cache or durations):
        return config
    changes: dict[str, object] = {"enabled": True}
    if "--cache-ttl" in durations:
        changes["default_ttl_s"] = durations["--cache-ttl"]
    if "--stale-if-error" in durations:
        changes["stale_if_error_s"] = durations["--stale-if-error"]
    listeners = tuple(
        dataclasses.replace(
            listener,
            routes=tuple(
                dataclasses.replace(r, cache=dataclasses.replace(r.cache, **changes))  # type: ignore[arg-type]
                for r in listener.routes
            ),
        )
        for listener in config.listeners
    )
    return dataclasses.replace(config, listeners=listeners)


def _override_file_config(config: Config, args: argparse.Namespace, resolver: SecretResolver) -> Config:
    """--listen, --upstream and --header laid over a config file with one listener/upstream."""
    if args.listen is not None:
        if len(config.listeners) != 1:
            raise ConfigError("--listen can only override a config with exactly one listener")
        try:
            host, port = parse_listen_address(args.listen)
        except ValueError as exc:
            raise ConfigError(f"--listen {args.listen!r}: {exc}") from None
        listener = dataclasses.replace(config.listeners[0], host=host, port=port)
        config = dataclasses.replace(config, listeners=(listener,))
    if args.upstream is not None and args.upstream.startswith(("tcp://", "tls://")):
        raise ConfigError(
            "--upstream tcp:// or tls:// is for one-liner mode; with --config, set relay.upstreams"
        )
    if args.upstream is not None or args.header:
        if len(config.upstreams) != 1:
            raise ConfigError("--upstream/--header can only override a config with exactly one upstream")
        ((name, upstream),) = config.upstreams.items()
        # Parsed exactly as in one-liner mode; a flag header replaces the file's header of that name.
        flags = config_from_flags(
            DEFAULT_LISTEN, args.upstream or str(upstream.url), args.header, resolver
        ).upstreams["default"]
        if not flags.url.uses_tls and upstream.tls != TLSConfig():
            raise ConfigError(f"--upstream: upstreams.{name} has tls settings but the URL is http://")
        replaced = {header.lower() for header, _ in flags.headers}
        kept = tuple(h for h in upstream.headers if h[0].lower() not in replaced)
        merged = dataclasses.replace(upstream, url=flags.url, headers=kept + flags.headers)
        config = dataclasses.replace(config, upstreams={name: merged})
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{args.file}: ok ({len(config.listeners)} listeners, {len(config.upstreams)} upstreams)")
        return EXIT_OK

    setup_logging(args.log_level, args.log_format)
    resolver = SecretResolver()
    try:
        config = config_for_run(args, resolver)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if config.workers > 1 and args.worker_id is None:
        return _supervise(config.workers, list(sys.argv[1:] if argv is None else argv))

    from resilient_ambassador.app import run

    try:
        trio.run(
            partial(
                run,
                config,
                resolver,
                worker=args.worker_id,
                # SIGHUP re-reads the file (and flags) exactly as at start-up, checking secret
                # files with a fresh resolver: the running one keeps the last value it read
                # across a rotation, but a config naming a file that is gone must be refused.
                reload_config=(lambda: config_for_run(args, SecretResolver())) if args.config else None,
            )
        )
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK
    log.info("stopped")
    return EXIT_OK


def _supervise(workers: int, argv: list[str]) -> int:
    from resilient_ambassador.supervisor import Supervisor

    def worker_argv(index: int) -> list[str]:
        return [sys.executable, "-m", "resilient_ambassador", *argv, "--worker-id", str(index)]

    log.info("starting %d workers", workers)
    code = trio.run(Supervisor(worker_argv, workers).run)
    log.info("stopped")
    return EXIT_RUNTIME if code else EXIT_OK
