"""jobservice: jobs that resolve, after a random delay, with a food photo from Unsplash.

One process, no external services. Jobs live in memory and are mirrored to a JSON
file (a snapshot plus an append-only journal) so that they survive restarts; clients
watch them resolve over plain WebSockets or stock Socket.IO clients, and never miss
an event: every change carries a sequence number, and a client that reconnects with
the last one it saw is sent exactly what it missed.

The file reads top to bottom in the order data flows: configuration, the job model,
the store, the image sources, the scheduler, the event hub, the HTTP handlers, the
application factory and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import codecs
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
import weakref
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode, urlsplit

import aiofiles
import aiofiles.os
import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

__version__ = "1.0.0"

log = logging.getLogger("jobservice")

HERE = Path(__file__).resolve().parent
# A checkout (or an editable install) has static/ beside this file; a wheel installs the
# same folder beside it as jobservice_static/, so that site-packages gets no bare `static`.
STATIC_DIR = next((folder for folder in (HERE / "static", HERE / "jobservice_static")
                   if folder.is_dir()), HERE / "static")
CATALOG_FILE = STATIC_DIR / "unsplash_food_photos.json"


# --- Configuration ------------------------------------------------------------------
# Everything tunable comes from the environment (and, for where to listen and what
# file to keep, from flags too). A bad value stops start-up before anything is touched.


class ConfigError(Exception):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 3000
    jobs_file: Path = Path("jobs.json")
    unsplash_access_key: str = field(default="", repr=False)
    unsplash_api_url: str = "https://api.unsplash.com"
    unsplash_timeout: float = 10.0
    unsplash_quota_window: float = 3600.0  # Unsplash counts a key's calls per hour
    photo_reuse: bool = True  # PHOTO_REUSE=fallback; never: a due job waits for a fresh one
    photo_wait: float = 2.0
    job_delay_min: float = 5.0
    job_delay_max: float = 300.0
    job_delay_step: float = 5.0
    retry_base_delay: float = 1.0
    retry_max_delay: float = 60.0
    job_max_attempts: int = 10
    cors_origins: tuple[str, ...] = ()
    job_retention: float = 7 * 86400.0  # 0 keeps finished jobs forever
    events_replay_window: float = 86400.0
    peer_drain_timeout: float = 60.0  # an event client takes what waits for it by then
    peers_max_queued_bytes: int = 256 * 1024 * 1024  # ... of events, all clients together
    response_write_timeout: float = 60.0  # a client takes a streamed response by then
    max_pending_jobs: int = 1_000_000
    max_stored_jobs: int = 1_000_000  # 0: no limit
    api_token: str = field(default="", repr=False)
    api_tokens_file: Path | None = None
    client_rate_limit: tuple[int, float] | None = None  # (requests, per seconds)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # names beyond localhost and IP addresses; or "*"
    redis_url: str = field(default="", repr=False)  # empty: the embedded mode, jobs.json
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # or Redis through Sentinel
    redis_sentinel_master: str = ""
    redis_min_replicas_ack: int = 0
    redis_prefix: str = "jobservice:"
    redis_timeout: float = 2.0
    job_lease: float = 30.0
    workers: int = 0  # --workers N: a supervisor of N processes on one port
    max_connections: int = 1000  # client connections open at once; derived by load_settings
    max_connections_per_address: int = 250  # a quarter of max_connections by default
    polling_sessions_per_address: int = 500  # a share of EIO_MAX_POLLING_SESSIONS
    half_open_sessions_per_address: int = 100  # a share of EIO_MAX_HALF_OPEN
    header_timeout: float = 30.0  # a request's headers, from connecting or from its first byte
    body_timeout: float = 30.0  # its body, from its headers
    keepalive_timeout: float = 75.0  # an idle connection between two requests
    ping_interval: float = 25.0  # Engine.IO's heartbeat, as the reference server's
    ping_timeout: float = 20.0
    supervisor: int = 0  # a worker's: its supervisor's pid, whose port it shares
    loop: str = "auto"  # --loop: the event loop to serve on (EVENT_LOOPS)
    node_url: str = ""  # where the other nodes reach this one's relay door (Redis mode)
    runtime_dir: Path | None = None  # a worker's: the supervisor's dir of relay sockets

    @property
    def unsplash_origin(self) -> str:
        parts = urlsplit(self.unsplash_api_url)  # an origin has no user or password
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins

    def trusts_proxy(self, address: str) -> bool:
        """Whether address is one of TRUSTED_PROXIES."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    @property
    def redis(self) -> bool:
        """The scale-out mode: jobs in Redis, at REDIS_URL or found through Sentinel."""
        return bool(self.redis_url or self.redis_sentinels)


def _number(env, name: str, default: float, *, minimum: float = 0.0, integer=False):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only: str.isdigit() alone also takes superscript and full-width
    digits, which int() refuses or reads differently."""
    return text.isascii() and text.isdigit()


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(env, name: str, default: float) -> float:
    """Seconds, written as plain seconds or with a unit: 90, 30m, 12h, 7d."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    unit = DURATION_UNITS.get(raw[-1].lower())
    number = raw[:-1] if unit else raw
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={raw!r} is not a duration like 604800, 7d, 12h or 30m")
    return value


def describe_duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


RATE_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                "h": 3600, "hour": 3600}


def _rate(env, name: str) -> tuple[int, float] | None:
    """`10/s`, `600/min`, `5000/h`: (requests, per seconds); empty is off."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    count, _, unit = raw.partition("/")
    period = RATE_PERIODS.get(unit.strip().lower())
    if not is_ascii_number(count.strip()) or period is None or int(count) < 1:
        raise ConfigError(f"{name}={raw!r} is not a rate like 10/s or 600/min")
    return int(count), float(period)


def _networks(env, name: str) -> tuple:
    networks = []
    for item in (env.get(name) or "").split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{name} entry {item.strip()!r} is not an address or a "
                                  "network like 10.0.0.0/8") from None
    return tuple(networks)


def _sentinels(env, name: str) -> tuple[tuple[str, int], ...]:
    found = []
    for item in (env.get(name) or "").split(","):
        host, _, port = item.strip().rpartition(":")
        if item.strip():
            if not host.strip("[]") or not is_ascii_number(port) or not 0 < int(port) < 65536:
                raise ConfigError(f"{name} entry {item.strip()!r} is not host:port, like "
                                  "10.0.0.5:26379")
            found.append((host.strip("[]"), int(port)))
    return tuple(found)


# A token is the only thing between the network and every job: one short enough to be
# guessed at the allowed 10 wrong tries a minute per address, from many addresses, is no
# lock. 16 characters of secrets.token_urlsafe are 96 bits.
MIN_TOKEN_LENGTH = 16
MAKE_A_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _short_token(where: str, token: str) -> ConfigError:
    length = f"{len(token)} character{'s' if len(token) != 1 else ''}"
    return ConfigError(f"{where} is {length} long; a token must be at least "
                       f"{MIN_TOKEN_LENGTH}, or it can be guessed: make one with {MAKE_A_TOKEN}")


def read_tokens(settings: Settings) -> tuple[str, ...]:
    """API_TOKEN, then API_TOKENS_FILE (a token a line; blank lines and #comments are
    skipped). ConfigError if the file cannot be read, holds no token, or a token is
    shorter than MIN_TOKEN_LENGTH."""
    if settings.api_token and len(settings.api_token) < MIN_TOKEN_LENGTH:
        raise _short_token("API_TOKEN", settings.api_token)
    tokens = [settings.api_token] if settings.api_token else []
    if settings.api_tokens_file is not None:
        try:
            text = settings.api_tokens_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"API_TOKENS_FILE={settings.api_tokens_file}: cannot be "
                              f"read ({exc.__class__.__name__})") from None
        found = []
        for number, line in enumerate(text.splitlines(), start=1):
            token = line.strip()
            if token and not token.startswith("#"):
                if len(token) < MIN_TOKEN_LENGTH:
                    raise _short_token(
                        f"the token on line {number} of API_TOKENS_FILE="
                        f"{settings.api_tokens_file}", token)
                found.append(token)
        if not found:
            raise ConfigError(f"API_TOKENS_FILE={settings.api_tokens_file} holds no token")
        tokens += found
    return tuple(dict.fromkeys(tokens))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _origin(value: str, name: str) -> str:
    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(f"{name} entry {value!r} is not an origin like https://example.com")
    return f"{parts.scheme}://{parts.netloc}"


def _hosts(env, name: str) -> tuple[str, ...]:
    """Host names, lowercased, without a port (any port is taken: see HostCheck)."""
    names = []
    for item in (env.get(name) or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item != "*" and (not item.replace("-", "").replace(".", "").replace("_", "")
                            .isalnum() or not item.isascii()):
            raise ConfigError(f"{name} entry {item!r} is not a host name like "
                              "jobs.example.com (no scheme, port or path; any port is "
                              "allowed, and IP addresses always are)")
        names.append(item)
    return tuple(dict.fromkeys(names))


# Descriptors kept for what the service opens itself, whatever its clients do: the journal
# and the directory it syncs, a snapshot being written, Redis, Unsplash, DNS lookups.
FD_RESERVE = 64


def open_files_limit() -> int:
    """How many descriptors this process may have open (the soft RLIMIT_NOFILE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _max_connections(env) -> int:
    """MAX_CONNECTIONS, by default half of what the open-files limit leaves after
    FD_RESERVE: a connection may hold a second descriptor, a file it is being sent."""
    room = open_files_limit() - FD_RESERVE
    if not (env.get("MAX_CONNECTIONS") or "").strip():
        return max(1, room // 2)
    value = _number(env, "MAX_CONNECTIONS", 0, minimum=1, integer=True)
    if value > room:
        raise ConfigError(f"MAX_CONNECTIONS={value} is more than the {max(0, room)} that the "
                          f"limit of {open_files_limit()} open files (RLIMIT_NOFILE) leaves "
                          f"room for, after {FD_RESERVE} kept for the journal, Redis and "
                          "Unsplash; raise the limit (ulimit -n) or lower MAX_CONNECTIONS")
    return value


def _max_connections_per_address(env, max_connections: int) -> int:
    """MAX_CONNECTIONS_PER_ADDRESS, by default a quarter of MAX_CONNECTIONS: one host (or
    one NAT) cannot take every place, it takes at least four to fill the service."""
    return _number(env, "MAX_CONNECTIONS_PER_ADDRESS", max(1, max_connections // 4),
                   minimum=1, integer=True)


def _node_url(env, redis, port: int) -> str:
    """NODE_URL, http://HOST:PORT: where the other nodes relay this node's Socket.IO
    requests. The node listens for them on that port (on --host), a door of its own."""
    url = (env.get("NODE_URL") or "").strip().rstrip("/")
    if not url:
        return ""
    if not redis:
        raise ConfigError("NODE_URL is for nodes sharing one Redis (REDIS_URL); one process "
                          "has nobody to relay to")
    parts = urlsplit(url)
    try:
        relay_port = parts.port
    except ValueError:
        relay_port = None
    if parts.scheme != "http" or not parts.hostname or not relay_port or parts.path:
        raise ConfigError(f"NODE_URL={url!r} is not http://HOST:PORT, the address the other "
                          "nodes reach this node's relay port at")
    if relay_port == port:
        raise ConfigError(f"NODE_URL's port {relay_port} is PORT's: the relay door is a "
                          "port of its own, for the other nodes only")
    return url


def _timeout(env, name: str, default: float) -> float:
    value = _duration(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name} must be above 0: a client that outlasts it is cut off")
    return value


# Socket.IO clients time the heartbeat with JavaScript timers, which take at most 2^31-1
# ms: past that one fires at once, and the client drops a healthy connection.
# Below 0.1 s a heartbeat outlasts no scheduling hiccup, and the sweep that keeps it
# runs every quarter of it.
MAX_JS_TIMER = (2**31 - 1) / 1000
MIN_HEARTBEAT = 0.1


def _heartbeat(env) -> tuple[float, float]:
    """PING_INTERVAL and PING_TIMEOUT, in seconds."""
    interval = _timeout(env, "PING_INTERVAL", 25.0)
    timeout = _timeout(env, "PING_TIMEOUT", 20.0)
    for name, value in (("PING_INTERVAL", interval), ("PING_TIMEOUT", timeout)):
        if value < MIN_HEARTBEAT:
            raise ConfigError(f"{name}={value:g} is below {MIN_HEARTBEAT:g} s: a client "
                              "would be dropped at the first hiccup of either side")
    if interval + timeout > MAX_JS_TIMER:
        raise ConfigError(f"PING_INTERVAL + PING_TIMEOUT is {interval + timeout:,.0f} s, "
                          f"over the {MAX_JS_TIMER:,.0f} s (24.8 days) a JavaScript timer "
                          "takes: clients time the heartbeat with one, and past that drop "
                          "the connection at once")
    return interval, timeout


def load_settings(argv: list[str] | None = None, env=None) -> Settings:
    """Settings from flags (which win) and the environment; ConfigError names the bad one."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="jobservice", description="Jobs that resolve with a food photo from Unsplash."
    )
    parser.add_argument("--host", default=env.get("HOST") or "127.0.0.1",
                        help="address to listen on (env HOST, default 127.0.0.1)")
    parser.add_argument("--port", default=env.get("PORT") or "3000",
                        help="port to listen on (env PORT, default 3000)")
    parser.add_argument("--data", default=env.get("JOBS_FILE") or "jobs.json",
                        help="the jobs file (env JOBS_FILE, default ./jobs.json)")
    parser.add_argument("--redis", default=env.get("REDIS_URL") or "",
                        help="keep jobs in Redis, shared by every process pointed at it "
                             "(env REDIS_URL, e.g. redis://127.0.0.1:6379/0)")
    parser.add_argument("--workers", default="0",
                        help="start and supervise N processes on one port (needs --redis)")
    parser.add_argument("--worker", type=int, default=0, metavar="SUPERVISOR_PID",
                        help=argparse.SUPPRESS)
    parser.add_argument("--loop", default=env.get("LOOP") or "auto",
                        help="the event loop: auto (the host's, if it set an event loop "
                             "policy; else uvloop if installed; else asyncio's), asyncio or "
                             "uvloop (env LOOP, default auto)")
    parser.add_argument("--runtime-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"jobservice {__version__}")
    args = parser.parse_args(argv)

    try:
        port = int(args.port)
    except ValueError:
        raise ConfigError(f"PORT={args.port!r} is not a whole number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"PORT={port} is not between 0 and 65535")

    api_url = (env.get("UNSPLASH_API_URL") or "https://api.unsplash.com").rstrip("/")
    api = urlsplit(api_url)
    if api.scheme not in ("http", "https") or not api.netloc:
        raise ConfigError(f"UNSPLASH_API_URL={api_url!r} is not an http(s) URL")

    delay_min = _number(env, "JOB_DELAY_MIN", 5.0)
    delay_max = _number(env, "JOB_DELAY_MAX", 300.0)
    delay_step = _number(env, "JOB_DELAY_STEP", 5.0, minimum=1e-3)
    if delay_max < delay_min:
        raise ConfigError(f"JOB_DELAY_MAX={delay_max:g} is below JOB_DELAY_MIN={delay_min:g}")
    retry_base = _number(env, "RETRY_BASE_DELAY", 1.0, minimum=1e-3)
    retry_max = _number(env, "RETRY_MAX_DELAY", 60.0, minimum=1e-3)
    if retry_max < retry_base:
        raise ConfigError(f"RETRY_MAX_DELAY={retry_max:g} is below RETRY_BASE_DELAY={retry_base:g}")

    reuse = (env.get("PHOTO_REUSE") or "fallback").strip().lower()
    if reuse not in ("fallback", "never"):
        raise ConfigError(f"PHOTO_REUSE={reuse!r} is not fallback (reuse a photo bought "
                          "before when no fresh one can come in time) or never")
    quota_window = _duration(env, "UNSPLASH_QUOTA_WINDOW", 3600.0)
    if quota_window <= 0:
        raise ConfigError("UNSPLASH_QUOTA_WINDOW must be above 0: it is how long Unsplash "
                          "counts a key's calls (an hour)")

    redis_url = args.redis.strip()
    if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL={_without_password(redis_url)!r} is not a redis://, "
                          "rediss:// or unix:// URL")
    sentinels = _sentinels(env, "REDIS_SENTINELS")
    master = (env.get("REDIS_SENTINEL_MASTER") or "").strip()
    if sentinels and redis_url:
        raise ConfigError("REDIS_SENTINELS and REDIS_URL both name a Redis; set one of them")
    if bool(sentinels) != bool(master):
        raise ConfigError("REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: the "
                          "sentinels, and the name they know the primary by")
    if not is_ascii_number(args.workers):
        raise ConfigError(f"--workers {args.workers!r} is not a whole number")
    workers = int(args.workers)
    loop = args.loop.strip().lower()
    if loop not in EVENT_LOOPS:
        raise ConfigError(f"--loop {args.loop!r} is not one of {', '.join(EVENT_LOOPS)} (LOOP)")
    if workers and not (redis_url or sentinels):
        raise ConfigError("--workers needs REDIS_URL (or --redis): processes share jobs "
                          "through Redis, never through one jobs.json")

    cors = tuple(
        _origin(item.strip(), "CORS_ORIGINS")
        for item in (env.get("CORS_ORIGINS") or "").split(",")
        if item.strip()
    )
    queued_max = _number(env, "PEERS_MAX_QUEUED_BYTES", 256 * 1024 * 1024, integer=True)
    if queued_max < PEER_BACKLOG_BYTES:  # below it a peer could be shed within its own bound
        raise ConfigError(f"PEERS_MAX_QUEUED_BYTES must be at least {PEER_BACKLOG_BYTES} "
                          "(8 MiB), what one event client may have queued")
    max_connections = _max_connections(env)
    node_url = _node_url(env, redis_url or sentinels, port)
    ping_interval, ping_timeout = _heartbeat(env)
    if (env.get("JOB_LEASE") or "").strip() and _duration(env, "JOB_LEASE", 30.0) < 1:
        raise ConfigError("JOB_LEASE must be at least 1 s: a node renews its claims every "
                          "third of it")
    settings = Settings(
        host=args.host,
        port=port,
        jobs_file=Path(args.data),
        unsplash_access_key=(env.get("UNSPLASH_ACCESS_KEY") or "").strip(),
        unsplash_api_url=api_url,
        unsplash_timeout=_number(env, "UNSPLASH_TIMEOUT", 10.0, minimum=1e-3),
        unsplash_quota_window=quota_window,
        photo_reuse=reuse == "fallback",
        photo_wait=_number(env, "PHOTO_WAIT", 2.0),
        job_delay_min=delay_min,
        job_delay_max=delay_max,
        job_delay_step=delay_step,
        retry_base_delay=retry_base,
        retry_max_delay=retry_max,
        job_max_attempts=_number(env, "JOB_MAX_ATTEMPTS", 10, minimum=1, integer=True),
        cors_origins=cors,
        job_retention=_duration(env, "JOB_RETENTION", 7 * 86400.0),
        events_replay_window=_duration(env, "EVENTS_REPLAY_WINDOW", 86400.0),
        peer_drain_timeout=_timeout(env, "PEER_DRAIN_TIMEOUT", 60.0),
        peers_max_queued_bytes=queued_max,
        response_write_timeout=_timeout(env, "RESPONSE_WRITE_TIMEOUT", 60.0),
        max_pending_jobs=_number(env, "MAX_PENDING_JOBS", 1_000_000, minimum=1, integer=True),
        max_stored_jobs=_number(env, "MAX_STORED_JOBS", 1_000_000, integer=True),
        api_token=(env.get("API_TOKEN") or "").strip(),
        api_tokens_file=Path(env["API_TOKENS_FILE"]) if env.get("API_TOKENS_FILE") else None,
        client_rate_limit=_rate(env, "CLIENT_RATE_LIMIT"),
        trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
        allowed_hosts=_hosts(env, "ALLOWED_HOSTS"),
        redis_url=redis_url,
        redis_sentinels=sentinels,
        redis_sentinel_master=master,
        redis_min_replicas_ack=_number(env, "REDIS_MIN_REPLICAS_ACK", 0, integer=True),
        redis_prefix=env.get("REDIS_PREFIX") or "jobservice:",
        redis_timeout=_number(env, "REDIS_TIMEOUT", 2.0, minimum=1e-3),
        job_lease=_duration(env, "JOB_LEASE", 30.0),
        workers=workers,
        supervisor=args.worker,
        loop=loop,
        max_connections=max_connections,
        max_connections_per_address=_max_connections_per_address(env, max_connections),
        polling_sessions_per_address=_number(env, "POLLING_SESSIONS_PER_ADDRESS", 500,
                                             minimum=1, integer=True),
        half_open_sessions_per_address=_number(env, "HALF_OPEN_SESSIONS_PER_ADDRESS", 100,
                                               minimum=1, integer=True),
        header_timeout=_timeout(env, "HEADER_TIMEOUT", 30.0),
        body_timeout=_timeout(env, "BODY_TIMEOUT", 30.0),
        keepalive_timeout=_timeout(env, "KEEPALIVE_TIMEOUT", 75.0),
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        node_url=node_url,
        runtime_dir=Path(args.runtime_dir) if args.runtime_dir else None,
    )
    read_tokens(settings)  # a tokens file that is unreadable or empty stops start-up
    return settings


# --- Metrics ------------------------------------------------------------------------
# Prometheus metrics, one registry per application (so that tests can run many). Each
# part below counts what it does; gauges of current state are read at scrape time.

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60)


class Metrics:
    def __init__(self):
        registry = self.registry = CollectorRegistry()

        def counter(name, text, labels=()):
            return Counter(name, text, labels, registry=registry)

        def gauge(name, text, labels=()):
            return Gauge(name, text, labels, registry=registry)

        def histogram(name, text, labels=(), buckets=LATENCY_BUCKETS):
            return Histogram(name, text, labels, registry=registry, buckets=buckets)

        self.jobs_created = PlainCounter("jobservice_jobs_created",
                                         "Jobs created by POST /jobs.", registry)
        self.jobs_resolved = counter("jobservice_jobs_resolved", "Jobs resolved with a photo.")
        self.jobs_failed = counter("jobservice_jobs_failed", "Jobs that failed.")
        self.jobs_deleted = counter("jobservice_jobs_deleted",
                                    "Jobs deleted (by DELETE) or expired (JOB_RETENTION).",
                                    ["reason"])
        self.jobs = gauge("jobservice_jobs", "Jobs kept, by status.", ["status"])
        self.lateness = histogram("jobservice_resolution_lateness_seconds",
                                  "How long after its dueAt a job resolved.")
        self.unsplash_requests = counter("jobservice_unsplash_requests",
                                         "Calls to the Unsplash API, by outcome.", ["outcome"])
        self.unsplash_rate_limited = counter("jobservice_unsplash_rate_limited_seconds",
                                             "Seconds that Unsplash calls were paused by a "
                                             "rate limit.")
        self.photo_pool = gauge("jobservice_photo_pool_size",
                                "Photos bought from Unsplash and not yet used.")
        self.photos = counter("jobservice_photos", "Photos jobs resolved with: bought for "
                              "them (fresh), bought before (reused), or the built-in "
                              "catalog's.", ["source"])
        self.quota_limit = gauge("jobservice_unsplash_quota_limit",
                                 "Calls the access key is allowed per window "
                                 "(X-Ratelimit-Limit; 0 until Unsplash has said).")
        self.quota_remaining = gauge("jobservice_unsplash_quota_remaining",
                                     "Calls left in the key's current window.")
        self.fsync = histogram("jobservice_journal_fsync_seconds",
                               "Time to write and fsync one batch of changes.")
        self.batch_size = histogram("jobservice_journal_batch_size",
                                    "Changes written by one fsync (group commit).",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
        self.snapshot = histogram("jobservice_snapshot_seconds",
                                  "Time to write one snapshot (jobs.json).")
        self.peers = gauge("jobservice_peers", "Connected event clients, by protocol.",
                           ["protocol"])
        self.peers_dropped = counter("jobservice_peers_dropped",
                                     "Event clients the server closed, by reason.", ["reason"])
        self.connections = gauge("jobservice_connections",
                                 "Client connections open now (at most MAX_CONNECTIONS).")
        self.connections_refused = counter("jobservice_connections_refused",
                                           "Connections closed as soon as they were accepted, "
                                           "by reason.", ["reason"])
        self.connections_timed_out = counter("jobservice_connections_timed_out",
                                             "Connections closed because a request did not "
                                             "arrive in time, by the part that was late.",
                                             ["part"])
        self.http = HttpTally()
        registry.register(self.http)
        self.storage_ok = gauge("jobservice_storage_ok",
                                "1 while the jobs file takes writes, 0 while it refuses them.")

    def on_commit(self, record) -> None:
        if record.status == "resolved":
            self.jobs_resolved.inc()
            self.lateness.observe(max(0.0, record.resolved_at - record.due_at))
            self.photos.labels(photo_source(record.image)).inc()
        elif record.status == "failed":
            self.jobs_failed.inc()
        elif record.status == "deleted":
            self.jobs_deleted.labels(record.reason).inc()


class PlainCounter:
    """A counter without labels, kept as a plain number and turned into a Prometheus
    family at scrape time, for what is counted on every request: prometheus_client's
    inc() takes a lock each time (0.5 us)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name, self.documentation, self.value = name, documentation, 0
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric((), self.value)
        yield family


class HttpTally:
    """Requests by route template, method and status, and their durations by route, as
    plain numbers turned into Prometheus families at scrape time. Every request counts
    here, and prometheus_client's inc() and observe() take a lock each and walk the
    buckets in Python: 1.16 us a request against 0.37 us."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.durations: dict[str, list] = {}  # route -> [count per bucket..., total seconds]

    def __call__(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        tally = self.durations.get(route)
        if tally is None:
            tally = self.durations[route] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        tally[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        tally[-1] += seconds

    def collect(self):
        requests = CounterMetricFamily("jobservice_http_requests",
                                       "HTTP requests, by route template, method and status.",
                                       labels=("route", "method", "status"))
        for (route, method, status), count in self.requests.items():
            requests.add_metric((route, method, str(status)), count)
        yield requests
        durations = HistogramMetricFamily("jobservice_http_request_duration_seconds",
                                          "HTTP request duration, by route template.",
                                          labels=("route",))
        bounds = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
        for route, tally in self.durations.items():
            cumulative = itertools.accumulate(tally[:-1])
            durations.add_metric((route,), list(zip(bounds, cumulative, strict=True)), tally[-1])
        yield durations


# --- Job model ----------------------------------------------------------------------
# A Job is never changed once committed: a change is a new Job with a higher seq, so
# a snapshot or a replay can hold on to Job objects without copying them. The one
# exception is `attempts`, a progress counter that is not an event of its own.

STATUSES = ("pending", "resolved", "failed")


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds, as JavaScript's toISOString()."""
    if ts is None:
        return None
    second = math.floor(ts)
    micros = round((ts - second) * 1_000_000)  # as datetime rounds, carry included
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_iso_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8192)
def _iso_second(second: int) -> str:
    # Jobs are made in bursts, so their times share seconds: format each second once.
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _json_time(ts: float | None) -> str:
    return "null" if ts is None else f'"{iso(ts)}"'


def _json_value(value) -> str:
    """A field as json.dumps(ensure_ascii=False) writes it; strings and nulls, the
    common cases, without its per-call set-up."""
    if value is None:
        return "null"
    if type(value) is str:
        return json.encoder.encode_basestring(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_MILLISECONDS = {f"{n:03d}": n for n in range(1000)}


def parse_time(value, what: str) -> float | None:
    """ISO 8601 text, or epoch milliseconds as the old service's clients sent them."""
    # Our own `2026-11-28T23:17:42.624Z`, by far the most common, first: each second is
    # parsed once, and the milliseconds are looked up (checked and converted at once).
    # 0.40 us a time against 0.66 us; a million jobs at start-up hold two million.
    if type(value) is str and len(value) == 24 and value[23] == "Z" and value[19] == ".":
        second = _epoch_second(value[:19])
        milliseconds = _MILLISECONDS.get(value[20:23])
        if second is not None and milliseconds is not None:
            return (second * 1000 + milliseconds) / 1000
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) / 1000.0
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    raise ValueError(f"{what} is not a time: {value!r}")


@functools.lru_cache(maxsize=8192)
def _epoch_second(text: str) -> int | None:
    # A store's jobs span days, and mostly different seconds: each day is parsed once.
    hour, minute, second = text[11:13], text[14:16], text[17:19]
    if len(text) == 19 and text[10] == "T" and text[13] == text[16] == ":" \
            and (hour + minute + second).isdecimal() and (hour + minute + second).isascii() \
            and hour < "24" and minute < "60" and second < "60":
        day = _epoch_day(text[:10])
        return None if day is None else day + int(hour) * 3600 + int(minute) * 60 + int(second)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(moment.replace(tzinfo=UTC).timestamp())


@functools.lru_cache(maxsize=4096)
def _epoch_day(text: str) -> int | None:
    try:
        return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


# Job ids are UUID4s from the OS's CSPRNG, drawn 4,096 at a time: uuid.uuid4() makes a
# getrandom() system call per id, which was a tenth of a POST. A forked child drops the
# ids it inherited, or two workers would hand out the same ones.
ID_BATCH = 4096
_job_ids: list[str] = []


def new_job_id() -> str:
    if not _job_ids:
        raw = bytearray(os.urandom(16 * ID_BATCH))
        raw[6::16] = bytes(byte & 0x0F | 0x40 for byte in raw[6::16])  # version 4
        raw[8::16] = bytes(byte & 0x3F | 0x80 for byte in raw[8::16])  # RFC 4122 variant
        text = raw.hex()
        _job_ids.extend(f"{text[i:i + 8]}-{text[i + 8:i + 12]}-{text[i + 12:i + 16]}-"
                        f"{text[i + 16:i + 20]}-{text[i + 20:i + 32]}"
                        for i in range(0, len(text), 32))
    return _job_ids.pop()


os.register_at_fork(after_in_child=_job_ids.clear)


class Image(dict):
    """A job's `image` object, one for every job that resolved with the same photo (a
    hundred thousand jobs resolved from the catalog's 40 photos hold 40), with its JSON
    text and the `result` URL that goes with it, both made once. Read-only, since jobs
    share it: another photo, or the same one marked reused, is another Image."""

    __slots__ = ("__weakref__", "json", "result", "result_json")

    def _shared(self, *args, **kwargs):
        raise TypeError("an Image is shared by every job that resolved with its photo; "
                        "make a new one (dict(image)) to change it")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _shared


# Every Image in use, by its result and contents: an entry goes with the last job that
# holds it. The values' types are part of the key, so that `"reused": 1` is not taken
# for `"reused": true`; an image holding lists or objects is keyed by its JSON instead.
_images: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_image(result: str | None, image: dict) -> Image:
    values = tuple(image.values())
    try:
        key = (result, tuple(image), values, tuple(map(type, values)))
        held = _images.get(key)
    except TypeError:
        key = (result, _json_value(image))
        held = _images.get(key)
    if held is None:
        held = Image(image)
        held.json, held.result, held.result_json = _json_value(held), result, \
            _json_value(result)
        _images[key] = held
    return held


# Errors that many jobs share ("gave up after 5 attempts: ..."), one string each; at
# most this many are kept, so odd ones cannot make it grow without bound.
COMMON_ERRORS = 1000
_errors: dict[str, str] = {}
_STATUS = {status: status for status in STATUSES}


def _common_error(error):
    if type(error) is not str:
        return error
    held = _errors.get(error)
    if held is None:
        if len(_errors) >= COMMON_ERRORS:
            return error
        held = _errors[error] = error
    return held


def _plain(text: str) -> bool:
    """Whether JSON writes this string as it is, between quotes."""
    return text.isprintable() and '"' not in text and "\\" not in text


class Job:
    # A million of these are the registry, so a job holds as little as it can (about
    # 700 bytes with its share of the indexes, tests/bench.py): its image is shared
    # (Image), and of its JSON it keeps only what is its own. That is the whole text for
    # a job without a photo (what GET /jobs sends most often and fastest), and for one
    # with a photo the part between the URL and the image: from `,"createdAt"` to
    # `"image":`; the rest is put around it when the text is asked for.
    __slots__ = (
        "_ord",  # where the store's order holds it (see JobStore.order)
        "_text",  # what it keeps of its JSON (see json)
        "attempts",
        "created_at",
        "due_at",
        "error",
        "id",
        "image",
        "resolved_at",
        "result",
        "seq",
        "status",
    )

    def __init__(self, id, status, result, created_at, due_at, resolved_at=None,
                 attempts=0, error=None, image=None, seq=0):
        if image is not None:
            if type(image) is not Image or image.result != result:
                image = shared_image(result, image)
            result = image.result
        self.id = id
        self.status = _STATUS.get(status, status)
        self.result = result
        self.created_at = created_at
        self.due_at = due_at
        self.resolved_at = resolved_at
        self.attempts = attempts
        self.error = _common_error(error)
        self.image = image
        self.seq = seq
        self._text = None
        self._ord = 0

    def __getattr__(self, name: str):
        """The times of a job read from its text (job_from_text) are read from it when
        first asked for: till then a finished job holds no float of when it was created
        or due, which nothing asks for in most of them."""
        start = _TIMES_IN_TEXT.get(name)
        if start is None or self._text is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        text = self._text
        if text[0] == "{":
            start += text.index(',"createdAt":"')
        if text[start] == "n":
            moment = None
        else:
            moment = _time_at(text, start + (text[start] == '"'))
        setattr(self, name, moment)
        return moment

    @property
    def _json(self) -> str | None:
        return self._text

    @_json.setter
    def _json(self, text: str | None) -> None:
        # Forgetting the text (a change, say) must not forget the times kept only in it.
        if text is None and self._text is not None:
            for name in _TIMES_IN_TEXT:
                getattr(self, name)
        self._text = text

    @classmethod
    def new(cls, settings: Settings, now: float) -> Job:
        steps = math.floor((settings.job_delay_max - settings.job_delay_min)
                           / settings.job_delay_step + 1e-9)
        delay = settings.job_delay_min + settings.job_delay_step * random.randint(0, steps)
        return cls(new_job_id(), "pending", None, now, now + delay)

    def resolved(self, result: str, image: dict, now: float) -> Job:
        return Job(self.id, "resolved", result, self.created_at, self.due_at, now,
                   self.attempts + 1, None, image)

    def failed(self, error: str, now: float) -> Job:
        return Job(self.id, "failed", None, self.created_at, self.due_at, now,
                   self.attempts, error, None)

    def retried(self, due_at: float) -> Job:
        return Job(self.id, "pending", None, self.created_at, due_at)

    def count_attempt(self) -> None:
        self.attempts += 1
        self._json = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "result": self.result,
            "createdAt": iso(self.created_at),
            "dueAt": iso(self.due_at),
            "resolvedAt": iso(self.resolved_at),
            "attempts": self.attempts,
            "error": self.error,
            "image": self.image,
            "seq": self.seq,
        }

    @property
    def json(self) -> str:
        """The job as JSON text, shared by the journal, responses and events: the same
        text as json.dumps(self.to_dict()) compact, formatted directly (1.4 us a job,
        against 4.2). What is kept of it is made once; GET /jobs sends it every time."""
        text = self._text
        if text is None:
            text = self._text = self._own_text()
        if text[0] == "{":
            return text
        image = self.image
        return (f'{{"id":"{self.id}","status":"{self.status}","result":{image.result_json}'
                f'{text}{image.json},"seq":{self.seq}}}')

    def _own_text(self) -> str:
        image = self.image
        middle = (f',"createdAt":"{iso(self.created_at)}","dueAt":"{iso(self.due_at)}",'
                  f'"resolvedAt":{_json_time(self.resolved_at)},"attempts":{self.attempts},'
                  f'"error":{_json_value(self.error)},"image":')
        if self.status != "pending":
            # Kept in the text now (to the millisecond, as the API gives them), these two
            # are read from it if asked for (__getattr__): 64 bytes a finished job.
            del self.created_at, self.due_at
        if type(image) is Image and image.result == self.result and _plain(self.id):
            return middle
        return (f'{{"id":{_json_value(self.id)},"status":"{self.status}",'
                f'"result":{_json_value(self.result)}{middle}{_json_value(image)},'
                f'"seq":{self.seq}}}')

    @classmethod
    def from_dict(cls, data) -> Job:
        """A job as stored by this service; ValueError says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("a job is not a JSON object")
        job_id, status = data.get("id"), data.get("status")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job id {job_id!r} is not a non-empty string")
        if status not in STATUSES:
            raise ValueError(f"job {job_id}: status {status!r} is not one of {', '.join(STATUSES)}")
        try:
            created_at = parse_time(data.get("createdAt"), "createdAt")
            due_at = parse_time(data.get("dueAt"), "dueAt")
            resolved_at = parse_time(data.get("resolvedAt"), "resolvedAt")
        except ValueError as exc:
            raise ValueError(f"job {job_id}: {exc}") from None
        if created_at is None or due_at is None:
            raise ValueError(f"job {job_id}: createdAt and dueAt are required")
        attempts, seq = data.get("attempts", 0), data.get("seq", 0)
        if type(attempts) is not int or type(seq) is not int or attempts < 0 or seq < 0:
            raise ValueError(f"job {job_id}: attempts and seq must be whole numbers")
        image = data.get("image")
        if image is not None and not isinstance(image, dict):
            raise ValueError(f"job {job_id}: image is not an object")
        return cls(job_id, status, data.get("result"), created_at, due_at, resolved_at,
                   attempts, data.get("error"), image, seq)

    @classmethod
    def from_old_service(cls, data, now: float) -> Job:
        """A job from the NestJS service's file: {id, status, result, createdAt}.

        Its delay was never stored, so a job it left pending is due at once; nor was when
        a job finished, so one it left finished is taken as finished now, at the carry-over.
        JOB_RETENTION counts from there: the old service kept every job forever, and its
        users' history must not expire the moment they switch over."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), (str, int)):
            raise ValueError("an entry is not an object with an id")
        job_id = str(data["id"])
        status = OLD_STATUSES.get(data.get("status"), data.get("status"))
        if status not in STATUSES:
            raise ValueError(f"job {job_id}: status {data.get('status')!r} is unknown")
        try:
            created_at = parse_time(data.get("createdAt"), "createdAt") or now
        except ValueError as exc:
            raise ValueError(f"job {job_id}: {exc}") from None
        result = data.get("result") if isinstance(data.get("result"), str) else None
        if status == "resolved" and result is None:
            status = "pending"
        if status == "pending":
            return cls(job_id, status, None, created_at, now)
        if status == "failed":
            return cls(job_id, status, None, created_at, created_at, now, 0,
                       "failed in the old service")
        image = _old_service_image(result) if result else None
        return cls(job_id, status, result, created_at, created_at, now, 0, None, image)


OLD_STATUSES = {"completed": "resolved", "waiting": "pending", "delayed": "pending",
                "active": "pending"}


@functools.lru_cache(maxsize=1024)
def _old_service_image(result: str) -> Image:
    # The old service kept only the URL: most of its jobs share a few photos.
    return shared_image(result, {"id": None, "thumb": result, "small": result,
                                 "alt": "Food photo", "author": None, "authorUrl": None,
                                 "pageUrl": None, "color": None, "source": "unsplash"})


# A job's JSON exactly as Job.json writes it (no escapes in its own strings, an image
# with no `}` in it): what this service's own files and Redis hold. Read here faster
# than by json and Job.from_dict (a regular expression's character sets and ranges are
# slow to repeat, so they are few, and the image is found by str.find), and its text is
# what the job keeps; anything else, or a value out of range, is read by json instead.
_TEXT = r'"([^"]*)"'  # and no backslash, as job_from_text checks
_TIME = (r'"(?!0000)[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])'
         r'|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31|02-29)T'
         r'(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{3}Z"')
_JOB_TEXT = re.compile(
    r'\{"id":"([^"]+)","status":"(pending|resolved|failed)","result":(?:null|' + _TEXT + ')'
    rf'(,"createdAt":{_TIME},"dueAt":{_TIME},"resolvedAt":(?:null|{_TIME}),'
    rf'"attempts":(0|[1-9][0-9]{{0,8}}),"error":(?:null|{_TEXT}),"image":)'
    r'(?:null,"seq":(0|[1-9][0-9]{0,17})\})?')
_JOB_END = re.compile(r',"seq":(0|[1-9][0-9]{0,17})\}')
# Where each time is in the text from `,"createdAt"` on (resolvedAt may be null).
_TIMES_IN_TEXT = {"created_at": 14, "due_at": 49, "resolved_at": 88}


def _time_at(text: str, start: int) -> float:
    return (_epoch_second(text[start:start + 19]) * 1000
            + _MILLISECONDS[text[start + 20:start + 23]]) / 1000


def job_from_text(text: str, pos: int = 0, images: dict | None = None):
    """(the job, where its text ends) if text[pos:] starts with a job as Job.json writes
    it, else None. `images` keeps the Images met so far, by URL, with their text, for a
    load: a job's image is then known by comparing its text in place."""
    match = _JOB_TEXT.match(text, pos)
    if match is None:
        return None
    job_id, status, result, own, attempts, error, seq = match.groups()
    if not job_id.isprintable() or "\\" in job_id or (
            error is not None and (not error.isprintable() or "\\" in error)):
        return None  # an escape, or a control character json would have refused
    if "-02-29T" in own:  # not every year has one
        for start in (14, 49, 89):
            if own[start - 1] == '"' and _epoch_second(own[start:start + 19]) is None:
                return None
    held = None
    if seq is None:  # an image, flat (up to the first `}`), found by find()
        start = match.end()
        for known, image in (images or {}).get(result, ()):
            if text.startswith(known, start):
                held, end = image, start + len(known)
                break
        else:
            if text[start:start + 1] != "{" or (result is not None and (
                    not result.isprintable() or "\\" in result)):
                return None
            end = text.find("}", start) + 1
            known = text[start:end]
            try:  # the first `}` may have been in a string: then this is no image
                held = shared_image(result, json.loads(known))
            except ValueError:
                return None
            if images is not None:
                images.setdefault(result, []).append((known, held))
        last = _JOB_END.match(text, end)
        if last is None:
            return None
        seq, end = last.group(1), last.end()
    elif result is not None and (not result.isprintable() or "\\" in result):
        return None
    else:
        end = match.end()
    job = Job.__new__(Job)
    job.id, job.status, job.attempts, job.seq, job._ord = \
        job_id, _STATUS[status], 0 if attempts == "0" else int(attempts), int(seq), 0
    job.error = None if error is None else _common_error(error)
    # The time the scheduler asks every job for at start is read now; the others later.
    if status == "pending":
        job.due_at = (_epoch_second(own[49:68]) * 1000 + _MILLISECONDS[own[69:72]]) / 1000
    elif own[88] == '"':
        job.resolved_at = (_epoch_second(own[89:108]) * 1000
                           + _MILLISECONDS[own[109:112]]) / 1000
    if held is None:
        job.result, job.image, job._text = result, None, text[pos:end]
    else:  # it keeps the middle, as Job.json keeps it (the id needs no escaping)
        job.result, job.image, job._text = held.result, held, own
    return job, end


DELETE_REASONS = ("deleted", "expired")


class Tombstone:
    """A job that was deleted or expired. It is a change like any other (it takes the
    next seq and goes out as ON_DELETED_JOB), and it is kept for the replay window, so
    a client that comes back with `since` hears that the job is gone."""

    __slots__ = ("_json", "_ord", "at", "id", "reason", "seq")
    status = "deleted"

    def __init__(self, id: str, reason: str, at: float, seq: int = 0):
        self.id, self.reason, self.at, self.seq = id, reason, at, seq
        self._json = None
        self._ord = 0

    @property
    def json(self) -> str:
        if self._json is None:
            self._json = json.dumps({"id": self.id, "reason": self.reason,
                                     "deletedAt": iso(self.at), "seq": self.seq},
                                    separators=(",", ":"))
        return self._json

    @classmethod
    def from_dict(cls, data: dict) -> Tombstone:
        job_id, reason, seq = data.get("id"), data.get("reason"), data.get("seq")
        if not isinstance(job_id, str) or reason not in DELETE_REASONS \
                or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"deletion record {str(data)[:100]} is malformed")
        return cls(job_id, reason, parse_time(data.get("deletedAt"), "deletedAt") or 0.0, seq)


def json_before_seq(record: Job | Tombstone) -> str:
    """A record's JSON up to its seq, which comes last: a store that numbers changes
    itself (Redis, in a script) appends the number and the closing brace."""
    text = record.json
    return text[:text.rindex(":") + 1]


def record_from_dict(data) -> Job | Tombstone:
    """One journal line: a job's new state, or its deletion."""
    if isinstance(data, dict) and "reason" in data and "status" not in data:
        return Tombstone.from_dict(data)
    return Job.from_dict(data)


# --- Store --------------------------------------------------------------------------
# The registry is a dict in memory; the disk holds a snapshot (jobs.json) and a journal
# beside it (jobs.json.journal, one job state per line). A change is appended to the
# journal by one writer that fsyncs many changes at once (group commit), and becomes
# visible, and is announced, only after that fsync: nothing a client is told can be
# undone by a crash. When the journal has grown as large as the registry it is folded
# into a new snapshot in the background (write a temp file, fsync, rename).
# Every record carries the job's seq, and a record only ever replaces an older one, so
# the order in which the snapshot and journals are read back does not matter.


class StoreCorrupt(Exception):
    """The jobs file cannot be read; the service refuses to start rather than lose it."""


class StorageError(Exception):
    """A change could not be written to disk; nothing about it was acknowledged."""


class Conflict(Exception):
    """The job changed first elsewhere (another process of the service): this change
    was not made. The file mode, with one writer, never raises it."""


COMPACT_MIN_RECORDS = 10_000
SNAPSHOT_SLICE = 500
SNAPSHOT_VERSION = 1
SNAPSHOT_SHAPE = ('expected {"version": 1, "seq": N, "jobs": [...]} or the old service\'s '
                  "array of jobs")


def _check_version(version) -> None:
    if version != SNAPSHOT_VERSION:
        raise ValueError(f"version {version!r} is not one this service knows "
                         f"({SNAPSHOT_VERSION})")


READ_CHUNK = 1 << 20
READ_AHEAD = 1 << 16  # longer than any job
LONGEST_VALUE = 1 << 22
_SPACE = re.compile(r"[ \t\n\r]*")
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JsonStream:
    """A JSON document read from a file a megabyte at a time and taken apart a value at
    a time: an object's members and an array's items as they come, each item parsed
    whole with the json module. A million jobs are never one text nor one parsed tree,
    which at start-up took as much memory again as the registry they become."""

    def __init__(self, file):
        self.file = file
        self.decode = codecs.getincrementaldecoder("utf-8")().decode
        self.text, self.pos, self.at_end = "", 0, False

    def _more(self) -> bool:
        if self.at_end:
            return False
        chunk = self.file.read(READ_CHUNK)
        self.at_end = not chunk
        self.text = self.text[self.pos:] + self.decode(chunk, final=self.at_end)
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ('' at the end)."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos:self.pos + 1]

    def _take(self, expected: str) -> str:
        char = self.peek()
        if char not in expected:
            raise json.JSONDecodeError(f"expected one of {expected!r}", self.text, self.pos)
        self.pos += 1
        return char

    def value(self, fast=None):
        """The next value, read by `fast(text, pos)` ((value, end) or None) if it can."""
        self.peek()
        while True:
            if fast is not None:
                found = fast(self.text, self.pos)
                if found is not None and found[1] < len(self.text):
                    self.pos = found[1]
                    return found[0]
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                # Cut off by the chunk's end, or wrong: no job is anywhere near this long.
                if len(self.text) - self.pos < LONGEST_VALUE and self._more():
                    continue
                raise
            if end < len(self.text) or not self._more():  # a number may go on
                self.pos = end
                return value

    def items(self, fast=None):
        """The items of the array that comes next, each read by `fast` if it can."""
        self._take("[")
        if self.peek() == "]":
            self.pos += 1
            return
        decode, separator = _DECODER.raw_decode, _SEPARATOR.match
        while True:
            # Most often the item, its separator and the start of the next one are all
            # in this chunk: read them with no more ado (read on well before the end).
            if len(self.text) - self.pos < READ_AHEAD and not self.at_end:
                self._more()
            text, pos = self.text, self.pos
            found = fast(text, pos) if fast is not None else None
            if found is None:
                try:
                    found = decode(text, pos)
                except json.JSONDecodeError:
                    pass
            if found is not None and found[1] < len(text):
                self.pos = found[1]
                yield found[0]
            else:
                yield self.value(fast)  # across the chunk's end, or wrong: value() says how
            after = separator(self.text, self.pos)
            if after is not None and after.end() < len(self.text):
                self.pos = after.end()
                if after.group(1) == "]":
                    return
            elif self._take(",]") == "]":
                return

    def members(self):
        """The names of the object that comes next; the caller reads each one's value."""
        self._take("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            name = self.value()
            if type(name) is not str:
                raise json.JSONDecodeError("expected a name", self.text, self.pos)
            self._take(":")
            yield name
            if self._take(",}") == "}":
                return

    def end(self) -> None:
        if self.peek():
            raise json.JSONDecodeError("extra data", self.text, self.pos)


ORDER_TRIM = 1024


class JobStore:
    # Whole before the first request: load() reads everything. A Redis-mode node loads
    # in the background instead, and its job routes answer 503 until it is ready.
    ready = True

    def __init__(self, path: Path, replay_window: float = 86400.0,
                 metrics: Metrics | None = None):
        self.path = path
        self.replay_window = replay_window
        self.metrics = metrics or Metrics()
        self.journal_path = path.with_name(path.name + ".journal")
        self.rotated_path = path.with_name(path.name + ".journal.old")
        self.jobs: dict[str, Job] = {}  # in seq order: a change moves its job to the end
        # The jobs in creation order, for listings and paging: a change takes its job's
        # place, and each record knows its place (_ord, the index plus order_base). A
        # deleted job's Tombstone holds the place (so a cursor naming it still works)
        # until the dead ones at the front are cut off, which expiry, oldest first, makes
        # the usual case; `dead` finds those by id meanwhile.
        self.order: list[Job | Tombstone] = []
        self.dead: dict[str, Tombstone] = {}
        self.order_base = 0
        self._order_live_from = 0  # order[:this] are known to be deleted
        self._order_dead = 0
        self.tombstones: deque[Tombstone] = deque()  # in seq order, within the window
        self.forgotten = 0  # the seq of the latest tombstone dropped: replays start above
        self.counts = dict.fromkeys(STATUSES, 0)
        self.seq = 0  # the highest seq that is on disk and visible
        self.in_flight: set[str] = set()  # jobs with a change written but not yet applied
        self.listeners: list = []  # called with each Job once it is committed
        self.authored: list = []  # ... and with those this process made (for metrics)
        self.replaced: list = []  # called if the registry is replaced whole (Redis mode)
        self.fault: OSError | None = None
        self._last_seq = 0  # the highest seq handed out; a failed write burns its seqs
        self._staged: list[Job | Tombstone] = []
        self._promises: list[asyncio.Future] = []  # one per staged change
        # Kept, not asked for per change: asyncio.get_running_loop() makes a getpid()
        # system call each time, which took 8 % of the event loop under POST load.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._journal = None
        self._journal_size = 0
        self._journal_records = 0
        self._journal_torn = False
        self._compaction: asyncio.Task | None = None
        self._compact_at = COMPACT_MIN_RECORDS
        self._writer: asyncio.Task | None = None
        self._closing = False
        self._migrated = False  # loaded from the old service's file
        self.carried_over = 0  # ... and how many finished jobs it held

    # Loading

    async def load(self) -> int:
        """Read the snapshot and journals; returns how many journal records were replayed."""
        loop = asyncio.get_running_loop()
        # A million jobs are a few million new objects that all live on: collecting
        # while they are made only walks them again and again (a quarter of the time).
        gc.disable()
        try:
            order, deleted, seq, forgotten, replayed, migrated = await loop.run_in_executor(
                None, self._read)
        finally:
            gc.enable()
        self.install(order)
        del order
        self.tombstones = deque(sorted(deleted.values(), key=lambda tomb: tomb.seq))
        self.forgotten = forgotten
        self.forget_old_tombstones()
        self.seq = self._last_seq = seq
        if migrated:
            backup = self.path.with_name(self.path.name + ".old-service")
            await loop.run_in_executor(None, _copy_and_sync, self.path, backup)
            self._migrated = True
            self.carried_over = len(self.jobs) - self.counts["pending"]
            log.warning("carried over %d jobs (%d finished) from the old service's file; its "
                        "original is kept as %s", len(self.jobs), self.carried_over, backup)
        # Long-lived job objects would otherwise be rescanned by every full collection.
        # No collection first: what loading threw away had no cycles and is gone already,
        # and walking a million jobs to learn that took 0.3 s.
        gc.freeze()
        return replayed

    def install(self, order: list[Job]) -> None:
        """Make these jobs, in creation order, the registry (of an id listed twice, the
        latest change counts)."""
        self.jobs = {job.id: job for job in sorted(order, key=operator.attrgetter("seq"))}
        if len(self.jobs) < len(order):
            order = [job for job in order if self.jobs[job.id] is job]
        counts = self.counts = dict.fromkeys(STATUSES, 0)
        for place, job in enumerate(order):
            job._ord = place
            counts[job.status] += 1
        self.order, self.dead = order, {}
        self.order_base = self._order_live_from = self._order_dead = 0

    def _read_files(self):
        """(the jobs by id, in creation order, the deletions by id, the seq, forgotten,
        how many journal records were replayed, whether it was the old service's file)."""
        order, *rest = self._read()
        return {job.id: job for job in order}, *rest

    def _read(self):
        # Into a list: a dict of a million jobs costs half a second to build, and the
        # registry is built in seq order anyway. Only a journal to replay needs one.
        jobs: list[Job] = []
        deleted: dict[str, Tombstone] = {}
        seq = forgotten = 0
        migrated = False
        try:
            snapshot = open(self.path, "rb", opener=no_follow)
        except FileNotFoundError:
            snapshot = None
        except OSError as exc:
            raise StoreCorrupt(f"{self.path}: cannot be read: {exc.strerror}") from None
        if snapshot is not None:
            # Read a job at a time, never whole: the text and the parsed tree of a
            # million jobs took as much memory again as the registry they become.
            with snapshot:
                document = JsonStream(snapshot)
                try:
                    if document.peek() == "[":
                        migrated = True
                        now = time.time()
                        for seq, entry in enumerate(document.items(), start=1):
                            job = Job.from_old_service(entry, now)
                            job.seq = seq
                            jobs.append(job)
                    elif document.peek() == "{":
                        version, listed = None, False
                        for name in document.members():
                            if name == "jobs":
                                listed = True
                                images: dict = {}
                                for entry in document.items(functools.partial(
                                        job_from_text, images=images)):
                                    job = entry if type(entry) is Job else Job.from_dict(entry)
                                    jobs.append(job)
                                    if job.seq > seq:
                                        seq = job.seq
                            elif name == "deleted" and document.peek() != "n":
                                for entry in document.items():
                                    tomb = Tombstone.from_dict(entry)
                                    deleted[tomb.id] = tomb
                                    seq = max(seq, tomb.seq)
                            else:
                                value = document.value()
                                if name == "version":
                                    version = value
                                    _check_version(version)
                                elif name == "seq" and type(value) is int:
                                    seq = max(seq, value)
                                elif name == "forgotten" and type(value) is int:
                                    forgotten = value
                        if not listed:
                            raise ValueError(SNAPSHOT_SHAPE)
                        _check_version(version)
                    else:
                        raise ValueError(SNAPSHOT_SHAPE)
                    document.end()
                except json.JSONDecodeError as exc:
                    raise StoreCorrupt(f"{self.path}: not valid JSON: {exc}") from None
                except UnicodeDecodeError as exc:
                    raise StoreCorrupt(f"{self.path}: not valid JSON: {exc}") from None
                except ValueError as exc:
                    raise StoreCorrupt(f"{self.path}: {exc}") from None
                except OSError as exc:
                    raise StoreCorrupt(f"{self.path}: cannot be read: {exc.strerror}") from None
        replayed = 0
        journals = [path for path in (self.rotated_path, self.journal_path) if path.exists()]
        if not journals:
            return jobs, deleted, seq, forgotten, replayed, migrated
        jobs = {job.id: job for job in jobs}
        journaled: dict[str, Job] = {}
        for journal in journals:
            for record in self._read_journal(journal):
                replayed += 1
                seq = max(seq, record.seq)
                held = jobs.get(record.id) or journaled.get(record.id) or deleted.get(record.id)
                if held is not None and held.seq >= record.seq:
                    continue
                if isinstance(record, Tombstone):
                    jobs.pop(record.id, None)
                    journaled.pop(record.id, None)
                    deleted[record.id] = record
                elif record.id in jobs:
                    jobs[record.id] = record
                elif record.id not in deleted:  # a deletion is final
                    journaled[record.id] = record
        # Jobs only the journal knows come after the snapshot's.
        for job in sorted(journaled.values(), key=lambda job: (job.created_at, job.seq)):
            jobs[job.id] = job
        return list(jobs.values()), deleted, seq, forgotten, replayed, migrated

    @staticmethod
    def _read_journal(path: Path):
        try:
            journal = open(path, "rb", opener=no_follow)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreCorrupt(f"{path}: cannot be read: {exc.strerror}") from None
        with journal:  # a line at a time: a journal may hold as many changes as the registry
            try:
                for number, line in enumerate(journal, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield record_from_dict(json.loads(line))
                    except ValueError as exc:
                        # A torn last line is a write that was never acknowledged (it has
                        # no newline); anything else is damage worth a warning, but not
                        # worth refusing to start over.
                        if line.endswith(b"\n"):
                            log.warning("%s line %d skipped: %s", path, number, exc)
            except OSError as exc:
                raise StoreCorrupt(f"{path}: cannot be read: {exc.strerror}") from None

    # Writing

    async def open(self, replayed: int) -> None:
        """Start the writer; fold what the journals hold into a fresh snapshot."""
        self._loop = asyncio.get_running_loop()
        if replayed or self.rotated_path.exists():
            if self.rotated_path.exists():
                # A compaction was cut short: the new snapshot covers both journals, but
                # only the rotated one can go, so the live one counts towards the next.
                self._journal_records = replayed
            else:
                await aiofiles.os.replace(self.journal_path, self.rotated_path)
            self._compaction = asyncio.create_task(self._compact())
        elif self._migrated:
            # Written in our format in the background: until then the old file (kept
            # aside too) and the journal are a complete record, read the same way.
            self._compaction = asyncio.create_task(self._compact())
        self._compact_at = self._journal_records + self._compact_threshold()
        self._writer = asyncio.create_task(self._write_batches(), name="journal writer")

    def commit(self, job: Job | Tombstone) -> asyncio.Future:
        """Stage a new state of a job, or its deletion; the future resolves once it is on
        disk and applied. Each change has its own future, so a caller that gives up
        (cancels it) takes nothing from the others in its batch; one future per change
        is also half the event-loop work of one shared future that each awaits shielded."""
        if self._closing:
            raise StorageError("the service is shutting down")
        self._last_seq += 1
        job.seq = self._last_seq
        job._json = None
        if not self._staged:
            self._wakeup.set()
        self._staged.append(job)
        self.in_flight.add(job.id)
        promise = self._loop.create_future()
        self._promises.append(promise)
        return promise

    def commit_unless_changed(self, record: Job | Tombstone, seq: int) -> asyncio.Future:
        """commit(record) if its job is still the change numbered `seq`, with no other on
        its way; Conflict if not. One writer: what is checked here holds until written."""
        held = self.jobs.get(record.id)
        if held is None or held.seq != seq or record.id in self.in_flight:
            raise Conflict("the job changed first")
        return self.commit(record)

    async def _write_batches(self) -> None:
        while True:
            if not self._staged:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            staged, promises = self._staged, self._promises
            self._staged, self._promises = [], []
            data = ("\n".join(job.json for job in staged) + "\n").encode()
            started = time.perf_counter()
            try:
                await self._append(data)
            except OSError as exc:
                self._note_fault(exc)
                await self._cut_failed_write()
                for job in staged:
                    self.in_flight.discard(job.id)
                refusal = StorageError(f"jobs cannot be stored right now: {exc}")
                for promise in promises:
                    settle(promise, refusal)
                continue
            self.metrics.fsync.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(staged))
            if self.fault is not None:
                log.warning("storage works again: %s", self.path)
                self.fault = None
            self._journal_records += len(staged)
            self._apply(staged)
            for promise in promises:  # settle(), inline: one call less per change
                if not promise.done():
                    promise.set_result(None)
            if self._journal_records >= self._compact_at and self._compaction is None:
                await self._rotate_and_compact()

    async def _append(self, data: bytes) -> None:
        if self._journal is None:
            self._journal = await aiofiles.open(self.journal_path, "ab", buffering=0,
                                                opener=no_follow)
            # A crash may have left a torn line: appending onto it would spoil the next
            # record too, so start right after the last complete one.
            self._journal_size = await aiofiles.os.wrap(_complete_length)(self.journal_path)
            self._journal_torn = True
            await self._sync_directory()
        if self._journal_torn:
            # An earlier write failed half-way; cut its remains off before appending.
            await self._journal.truncate(self._journal_size)
            self._journal_torn = False
        self._journal_torn = True
        await aiofiles.os.wrap(_write_and_sync)(self._journal.fileno(), data)
        self._journal_torn = False
        self._journal_size += len(data)

    async def _cut_failed_write(self) -> None:
        """Take back what a failed write left behind (the bytes may have landed even if
        the fsync failed), so that a restart cannot revive jobs that were refused."""
        if self._journal is None or not self._journal_torn:
            return
        try:
            await self._journal.truncate(self._journal_size)
            self._journal_torn = False
        except OSError:
            pass  # the next append cuts it before writing

    async def _sync_directory(self) -> None:
        def sync(directory):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        await aiofiles.os.wrap(sync)(self.path.parent)

    def _note_fault(self, exc: OSError) -> None:
        if self.fault is None or self.fault.errno != exc.errno:
            log.error("cannot write %s: %s; new jobs are refused (503) and resolutions "
                      "wait until writing works again", self.journal_path, exc)
        self.fault = exc

    def _apply(self, staged: list[Job | Tombstone]) -> None:
        deletions = 0
        for record in staged:
            held = self.jobs.pop(record.id, None)
            self.in_flight.discard(record.id)
            self.seq = record.seq
            if isinstance(record, Tombstone):
                if held is None:
                    continue  # deleted twice at once: the first one told everybody
                self.counts[held.status] -= 1
                self.tombstones.append(record)
                record._ord = held._ord
                self.order[held._ord - self.order_base] = self.dead[record.id] = record
                deletions += 1
            else:
                if held is None:
                    record._ord = self.order_base + len(self.order)
                    self.order.append(record)
                else:
                    record._ord = held._ord
                    self.order[held._ord - self.order_base] = record
                    self.counts[held.status] -= 1
                self.jobs[record.id] = record
                self.counts[record.status] += 1
            self._announce(record, True)
        if deletions:
            self._order_dead += deletions
            self._trim_order()
            self.forget_old_tombstones()

    def _announce(self, record: Job | Tombstone, authored: bool) -> None:
        for listener in (self.authored + self.listeners) if authored else self.listeners:
            try:
                listener(record)
            except Exception:
                log.exception("a listener failed on job %s", record.id)

    def _trim_order(self) -> None:
        """Cut the deleted jobs at the front of the order off (each is looked at once on
        its way out); rebuild it only when most of what is left is dead."""
        order, dead = self.order, self.dead
        live_from = self._order_live_from
        while live_from < len(order) and order[live_from].status == "deleted":
            live_from += 1
        if live_from >= ORDER_TRIM or live_from == len(order):
            for tomb in order[:live_from]:
                del dead[tomb.id]
            del order[:live_from]
            self.order_base += live_from
            self._order_dead -= live_from
            live_from = 0
        self._order_live_from = live_from
        if self._order_dead > ORDER_TRIM and self._order_dead * 2 > len(order):
            self.order = [job for job in order if job.status != "deleted"]
            for place, job in enumerate(self.order):
                job._ord = place
            dead.clear()
            self.order_base, self._order_dead, self._order_live_from = 0, 0, 0

    def forget_old_tombstones(self) -> None:
        cutoff = time.time() - self.replay_window
        while self.tombstones and self.tombstones[0].at <= cutoff:
            self.forgotten = self.tombstones.popleft().seq

    # Compaction

    async def _rotate_and_compact(self) -> None:
        """Start a new journal (between batches, so no write is in flight) and fold the
        old one into a snapshot in the background."""
        rotate = not self.rotated_path.exists()
        if rotate:
            try:
                await self._journal.close()
                self._journal = None
                await aiofiles.os.replace(self.journal_path, self.rotated_path)
            except OSError as exc:
                log.error("cannot rotate %s: %s", self.journal_path, exc)
                self._compact_at = self._journal_records + self._compact_threshold()
                return
            self._journal_records = 0
        self._compaction = asyncio.create_task(self._compact())

    def _compact_threshold(self) -> int:
        return max(COMPACT_MIN_RECORDS, len(self.jobs))

    async def _compact(self) -> None:
        try:
            await self.write_snapshot()
            await aiofiles.os.remove(self.rotated_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot write the snapshot %s: %s; the journal keeps every change",
                      self.path, exc)
        finally:
            self._compact_at = self._journal_records + self._compact_threshold()
            self._compaction = None
            # Jobs made since the last freeze are long-lived too: keep them out of the
            # full collections that otherwise set the latency tail.
            gc.freeze()

    async def write_snapshot(self) -> None:
        # Taken in one step, so it is the registry at one seq; Job objects never change.
        started = time.perf_counter()
        jobs = [job for job in self.order if job.status != "deleted"]
        seq, forgotten, deleted = self.seq, self.forgotten, list(self.tombstones)
        temp = self.path.with_name(self.path.name + ".tmp")
        async with aiofiles.open(temp, "wb", opener=no_follow) as out:
            await out.write(
                f'{{"version":{SNAPSHOT_VERSION},"seq":{seq},"forgotten":{forgotten},'
                f'"deleted":[{",".join(tomb.json for tomb in deleted)}],"jobs":['.encode())
            # In slices, so a large registry never holds the event loop for long. A job
            # written is let go: one changed meanwhile would otherwise be held twice till
            # the end (a burst of resolutions during a compaction left RSS at 1.5 times
            # the jobs' size, in pools no longer used but in arenas still in use).
            for start in range(0, len(jobs), SNAPSHOT_SLICE):
                stop = min(len(jobs), start + SNAPSHOT_SLICE)
                text = ",\n".join(job.json for job in jobs[start:stop])
                jobs[start:stop] = itertools.repeat(None, stop - start)
                await out.write((("\n" if start == 0 else ",\n") + text).encode())
            await out.write(b"\n]}\n")
            await out.flush()
            await aiofiles.os.wrap(os.fsync)(out.fileno())
        await aiofiles.os.replace(temp, self.path)
        await self._sync_directory()
        self.metrics.snapshot.observe(time.perf_counter() - started)

    async def close(self) -> None:
        """Write what is staged, fold the journal into the snapshot, close the files."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        if self._compaction is not None:
            await self._compaction
        await self._cut_failed_write()
        if self._journal_records or self.rotated_path.exists():
            try:
                await self.write_snapshot()
                if self._journal is not None:
                    await self._journal.close()
                    self._journal = None
                for path in (self.journal_path, self.rotated_path):
                    await aiofiles.os.wrap(_remove_if_exists)(path)
            except OSError as exc:
                log.error("cannot write the snapshot %s at shutdown: %s; the journal "
                          "keeps every change", self.path, exc)
        if self._journal is not None:
            await self._journal.close()
            self._journal = None

    # Reading

    def describe(self) -> str:
        return str(self.path)

    async def until_ready(self) -> None:
        """Return once the registry is whole (here, at once)."""

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def changed_between(self, after: int, until: int, limit: int) -> list[Job | Tombstone]:
        """The first `limit` jobs and deletions whose latest change is above `after` and
        at most `until`, in seq order; O(what changed since `after`). Only exact from
        `forgotten` on: below that, deletions were let go."""
        lowest = []
        for records in (self.jobs.values(), self.tombstones):
            kept: deque[Job | Tombstone] = deque(maxlen=limit)  # walked down: the lowest stay
            for record in reversed(records):
                if record.seq <= after:
                    break
                if record.seq <= until:
                    kept.append(record)
            lowest.extend(kept)
        return sorted(lowest, key=lambda record: record.seq)[:limit]

    def listing(self, status: str | None = None, limit: int | None = None,
                cursor: str | None = None, newest_first: bool = False):
        """(the jobs, the id to go on from or None): in creation order, or newest first,
        starting past the cursor. KeyError if the cursor names no job. The jobs, not
        their texts: a text made whole for the asking (a job with a photo) is made as
        it is sent, so the list costs no more than a slice of it at a time."""
        order, base = self.order, self.order_base
        wanted = STATUSES if status is None else (status,)
        step = -1 if newest_first else 1
        if cursor is None:
            index = len(order) - 1 if newest_first else 0
        else:
            held = self.jobs.get(cursor) or self.dead.get(cursor)
            if held is None:
                raise KeyError(cursor)
            index = held._ord - base + step
        if limit is None and not newest_first:
            # The whole list, as the old frontend asks for after every job it creates:
            # one comprehension, about three times the loop's speed.
            rest = order[index:] if index else order
            return [job for job in rest if job.status in wanted], None
        page, last = [], None
        while 0 <= index < len(order):
            job = order[index]
            if job.status in wanted:
                if len(page) == limit:
                    return page, last
                page.append(job)
                last = job.id
            index += step
        return page, None

    def walk(self, cursor: tuple | None, count: int) -> tuple[list[Job], tuple | None]:
        """(the jobs among the next `count` places of the creation order from `cursor`,
        None to start, and the cursor to go on from, None at the end): a walk over the
        whole registry in steps, between which it may change. A job that lives throughout
        is met once; one made or deleted meanwhile may be met or not. KeyError if the
        order was rebuilt since the cursor was handed out: the walk starts over."""
        order = self.order
        if cursor is None:
            index = 0
        elif cursor[0] is not order:
            raise KeyError("the order was rebuilt")
        else:
            # Deleted ids cut off the front shift what is left, not the places counted.
            index = max(0, cursor[1] - self.order_base)
        stop = min(len(order), index + count)
        found = [job for job in order[index:stop] if job.status != "deleted"]
        return found, ((order, self.order_base + stop) if stop < len(order) else None)


def settle(promise: asyncio.Future, error: Exception | None = None) -> None:
    """Keep a commit's promise, unless its caller gave up on it (cancelled it). An error
    is marked as retrieved, so that a caller who no longer listens is not warned about."""
    if promise.done():
        return
    if error is None:
        promise.set_result(None)
    else:
        promise.set_exception(error)
        promise.exception()


def _write_and_sync(fd: int, data: bytes) -> None:
    """Append a batch and fsync it, in one trip to a worker thread: each trip costs the
    event loop a wake-up, and a batch used to take two."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _complete_length(path: Path) -> int:
    """How many bytes of a journal end with its last complete line."""
    with open(path, "rb", opener=no_follow) as journal:
        end = journal.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            journal.seek(start)
            newline = journal.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
        return 0


def no_follow(path, flags: int) -> int:
    """os.open for the store's own files (the journal, the snapshot's temp file): a
    symbolic link in their place is refused, never followed, so that whoever can make one
    in the data directory cannot have the service write over the file it points at."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, "a symbolic link, which the service does not follow for "
                      "its own files; remove it", str(path)) from None


def _copy_and_sync(source: Path, target: Path) -> None:
    with open(source, "rb", opener=no_follow) as original, \
            open(target, "wb", opener=no_follow) as copy:
        shutil.copyfileobj(original, copy, READ_CHUNK)
        copy.flush()
        os.fsync(copy.fileno())


def _remove_if_exists(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- Image sources ------------------------------------------------------------------
# A source hands out one photo per job: (the URL that becomes the job's result, the
# `image` object a page needs to show and credit it). The Unsplash source buys photos
# in batches of 30 so a burst of jobs costs one API call per 30 jobs; without an access
# key a built-in catalog of real Unsplash food photos stands in.
# Unsplash allows a key 50 calls an hour (a demo key) or 5,000 (production): under load
# fresh photos run out long before jobs do. So the source spends the key's budget at an
# even pace over its window, a little ahead of the jobs about to fall due, and a job
# that falls due when no fresh photo can reach it within PHOTO_WAIT resolves on time
# with one that jobs resolved with before, marked `"reused": true`.


class ImageUnavailable(Exception):
    """A transient failure: the jobs waiting for this call count an attempt."""


class RateLimited(Exception):
    """Unsplash asks us to wait (or the shared photo pool is out of reach); it costs
    jobs no attempts."""

    def __init__(self, retry_after: float, why: str = "Unsplash rate limit reached"):
        super().__init__(f"{why}; next call in {retry_after:.0f} s")
        self.retry_after = retry_after


class KeyRejected(Exception):
    """Unsplash refused the access key: with PHOTO_REUSE=never, waiting jobs fail at once."""


UNSPLASH_BATCH = 30
POOL_MAX_AGE = 3600.0
# How far ahead of the jobs about to fall due photos are bought, and how much sooner
# than the even pace a call may come: a call takes a moment, and a job is on time.
BUY_AHEAD = 5.0
BUYER_TICK = 0.5
REUSE_SET_SIZE = 10_000
REUSE_SEED_SCAN = 100_000  # jobs looked at, newest first, to fill the set at start


class Photo(NamedTuple):
    result: str  # the URL a job resolves with (urls.regular)
    image: dict  # what a page needs to show and credit it
    fetched_at: float = 0.0  # time.monotonic() when bought; the pool drops stale ones


def photo_source(image: dict | None) -> str:
    """How a job's photo came to it, as jobservice_photos_total counts: bought for it
    (fresh), bought before (reused), or the built-in catalog's."""
    if not image or image.get("source") == "catalog":
        return "catalog"
    return "reused" if image.get("reused") else "fresh"


class CatalogImages:
    batch_size = 1

    def __init__(self, path: Path = CATALOG_FILE):
        self.photos = [self._photo(entry) for entry in json.loads(path.read_text("utf-8"))]

    @staticmethod
    def _photo(entry: dict) -> Photo:
        url = entry["url"]
        result = f"{url}?w=1080&q=80&auto=format&fit=crop"
        return Photo(result, shared_image(result, {
            "id": entry["id"],
            "thumb": f"{url}?w=200&q=80&auto=format&fit=crop",
            "small": f"{url}?w=400&q=80&auto=format&fit=crop",
            "alt": entry["description"],
            "author": None,
            "authorUrl": None,
            "pageUrl": None,
            "color": None,
            "source": "catalog",
            "reused": True,
        }))

    def describe(self) -> str:
        return f"built-in catalog of {len(self.photos)} Unsplash food photos"

    def status(self) -> dict:
        return {"source": "catalog", "state": "ok"}

    def start(self, store, demand) -> None:
        pass

    async def stop(self) -> None:
        pass

    def draw(self) -> Photo:
        return random.choice(self.photos)

    async def take(self, deadline: float | None = None) -> Photo:
        return self.draw()

    def put_back(self, photo: Photo) -> None:
        pass


def _bought(job: Job) -> bool:
    image = job.image
    return image is not None and image.get("source") == "unsplash" and not image.get("reused")


class RecentPhotos:
    """The last photos that jobs resolved with fresh, for a job that falls due when no
    fresh one can reach it in time: one is drawn at random and marked reused. It hears
    every resolution the store commits (in Redis mode every node's, so the set is the
    cluster's), and starts from the newest among the jobs kept; until a photo was ever
    bought, the catalog is the set. It holds the jobs' own objects: it costs a list."""

    def __init__(self, fallback: CatalogImages, size: int = REUSE_SET_SIZE):
        self.fallback = fallback
        self.size = size
        self._photos: list[tuple[str, dict]] = []
        self._oldest = 0  # the entry the next one replaces, once the list is full

    def watch(self, store: JobStore) -> None:
        self.seed(store)
        store.listeners.append(self.remember)
        store.replaced.append(functools.partial(self.seed, store))  # loaded, or reloaded

    def seed(self, store: JobStore) -> None:
        newest = []
        for job in itertools.islice(reversed(store.jobs.values()), REUSE_SEED_SCAN):
            if job.status == "resolved" and _bought(job):
                newest.append((job.result, job.image))
                if len(newest) == self.size:
                    break
        self._photos, self._oldest = newest[::-1], 0

    def remember(self, record: Job | Tombstone) -> None:
        if record.status != "resolved" or not _bought(record):
            return
        if len(self._photos) < self.size:
            self._photos.append((record.result, record.image))
        else:
            self._photos[self._oldest] = (record.result, record.image)
            self._oldest = (self._oldest + 1) % self.size

    def __len__(self) -> int:
        return len(self._photos)

    def draw(self) -> Photo:
        if not self._photos:
            return self.fallback.draw()
        result, image = random.choice(self._photos)
        return Photo(result, {**image, "reused": True})


def _header_count(headers, name: str) -> int | None:
    value = headers.get(name, "").strip()
    return int(value) if is_ascii_number(value) and len(value) < 12 else None


def _retry_after(headers) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), if the answer has one."""
    raw = headers.get("Retry-After", "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Quota:
    """The access key's budget, as X-Ratelimit-Limit and X-Ratelimit-Remaining give it on
    every answer. Unsplash never says when its window turns, so a window is taken to
    start when its first answer came back: it turns no later than that plus
    UNSPLASH_QUOTA_WINDOW, whether Unsplash counts fixed hours or a rolling one, so a call
    made then is never refused for the old window. A refusal (403 "Rate Limit Exceeded",
    429) means spent until the window turns, or a whole window from now if that is not
    known: one probe per pause, never a storm of refused calls.

    Calls are paced: one may be made while more remain than the even share of the
    window's time left (a lead of BUY_AHEAD aside). So when jobs keep coming, the budget
    lasts the window and is spent by its end; what went unused while nobody asked is
    there for the next burst."""

    FIELDS = ("limit", "remaining", "turns_at", "probe_until")

    def __init__(self, window: float):
        self.window = window
        self.limit = 0  # 0 until Unsplash has said
        self.remaining = 0
        self.turns_at = 0.0  # wall clock; until then, `remaining` holds
        self.probe_until = 0.0  # a call is finding out about a window not known yet

    def wait(self, now: float, paced: bool = True) -> float:
        """Seconds until a call may be made: 0 for now."""
        if now < self.probe_until:
            return self.probe_until - now
        if now >= self.turns_at:
            return 0.0  # a new window, or nothing known yet: the call finds out
        if self.remaining <= 0:
            return self.turns_at - now
        if not paced or not self.limit:
            return 0.0
        # Allowed once remaining > limit * (turns_at - now - BUY_AHEAD) / window.
        share = self.remaining * self.window / self.limit
        return max(0.0, self.turns_at - BUY_AHEAD - share - now)

    def reserve(self, now: float, paced: bool, timeout: float) -> float:
        """Count a call if one may be made now: 0. Else the seconds until one may. A
        call into a window not known yet is its probe, the only one until it is answered
        (or `timeout` has passed)."""
        wait = self.wait(now, paced)
        if wait:
            return wait
        if now < self.turns_at:
            self.remaining -= 1
        else:
            self.probe_until = now + timeout
        return 0.0

    def settle(self, now: float, headers, refused: bool) -> None:
        """What a call's outcome says of the budget: an answer's headers (or a refusal),
        or None when no answer came, which ends a probe without telling anything."""
        if headers is None:
            self.probe_until = 0.0
        elif refused:
            self.refused(now, headers)
        else:
            self.answered(now, headers)

    def answered(self, now: float, headers) -> None:
        """An answer came back (`now`, once it did) with these headers."""
        limit = _header_count(headers, "X-Ratelimit-Limit")
        remaining = _header_count(headers, "X-Ratelimit-Remaining")
        if limit is not None:
            self.limit = limit
        if remaining is None:
            return
        self.probe_until = 0.0
        if now >= self.turns_at:
            self.turns_at, self.remaining = now + self.window, remaining
        else:
            # Calls made meanwhile may not be counted in it yet: the lower figure holds.
            self.remaining = min(self.remaining, remaining)
        if self.remaining <= 0:
            self.refused(now, headers)

    def refused(self, now: float, headers) -> None:
        """The budget is spent (a refusal, or the answer to the last call allowed)."""
        limit = _header_count(headers, "X-Ratelimit-Limit")
        if limit is not None:
            self.limit = limit
        self.remaining, self.probe_until = 0, 0.0
        retry_after = _retry_after(headers)
        if retry_after is not None:
            self.turns_at = now + retry_after
        elif now >= self.turns_at:
            self.turns_at = now + self.window

    def fields(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in self.FIELDS}

    def load(self, fields: dict) -> None:
        """The state `fields()` gave, as another process of the service left it."""
        for name in self.FIELDS:
            kind = type(getattr(self, name))
            try:
                setattr(self, name, kind(fields.get(name) or 0))
            except ValueError:
                setattr(self, name, kind(0))

    def describe(self, now: float) -> dict:
        known = now < self.turns_at
        return {"limit": self.limit or None,
                "remaining": self.remaining if known else self.limit or None,
                "windowTurnsAt": iso(self.turns_at) if known else None}


def backoff(settings: Settings, failures: int) -> float:
    """Exponential, with full jitter: how long to wait after `failures` in a row."""
    cap = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** min(failures - 1, 30))
    return random.uniform(0, cap)


class UnsplashImages:
    """Photos bought from Unsplash, 30 a call, into a pool. The Redis mode's subclass
    keeps the pool and the key's budget in Redis, through the methods marked as its
    seams."""

    batch_size = UNSPLASH_BATCH

    def __init__(self, session: aiohttp.ClientSession, settings: Settings,
                 metrics: Metrics | None = None):
        self._session = session
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._pool: deque[Photo] = deque()
        self.quota = Quota(settings.unsplash_quota_window)
        self.reuse = RecentPhotos(CatalogImages())
        self.problem: str | None = None  # why no fresh photo can be bought now
        self._key_rejected = False
        self._purchase: asyncio.Task | None = None  # the call under way
        self._reserving = asyncio.Lock()
        self._calls_from = 0.0  # after a failed call (its backoff) or a rejected key
        self._failures = 0
        self._buyer: asyncio.Task | None = None

    def describe(self) -> str:
        settings = self._settings
        path = urlsplit(settings.unsplash_api_url).path
        return f"Unsplash API at {settings.unsplash_origin}{path}"

    def status(self) -> dict:
        """For /healthz: whether fresh photos come, and the key's budget."""
        now = time.time()
        if self.problem is not None:
            state = "key_rejected" if self._key_rejected else "unavailable"
        elif self.quota.remaining <= 0 < self.quota.wait(now, paced=False):
            state = "spent"
        elif self.quota.wait(now) > 0:
            state = "paced"
        else:
            state = "ok"
        return {"source": "unsplash", "state": state, "error": self.problem,
                "reuse": "fallback" if self._settings.photo_reuse else "never",
                "pool": self.pool_size, **self.quota.describe(now)}

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    def start(self, store: JobStore, demand) -> None:
        """Hear what jobs resolve with, for reuse, and (unless PHOTO_REUSE=never) buy
        ahead of the jobs that `demand(by, enough)` counts as falling due by then."""
        self.reuse.watch(store)
        if self._settings.photo_reuse:
            self._buyer = asyncio.create_task(self._buy_ahead(demand), name="photo buyer")

    async def stop(self) -> None:
        tasks = [task for task in (self._buyer, self._purchase) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a Redis client can swallow a cancellation (RedisJobStore.close)
            await asyncio.wait(tasks, timeout=self._settings.unsplash_timeout)

    def put_back(self, photo: Photo) -> None:
        if not photo.image.get("reused"):
            self._pool.appendleft(photo)  # keeps its age: an hour is an hour since bought

    async def take(self, deadline: float | None = None) -> Photo:
        """A photo for a job that is due: a fresh one if one is at hand or can be bought
        by `deadline` (wall clock), else one bought before, reused. Without a deadline
        (PHOTO_REUSE=never), only a fresh one, however long it takes: a call that fails
        raises, for the scheduler to count against the job or to wait out."""
        while (photo := await self._pooled()) is None:
            purchase = await self._start_purchase(None, urgent=deadline is None)
            if purchase is None:
                return await self._bought_elsewhere(deadline) or self.reuse.draw()
            if deadline is None:
                await purchase
                continue
            await asyncio.wait((purchase,), timeout=max(0.0, deadline - time.time()))
            if not purchase.done():
                return self.reuse.draw()
        return photo

    async def _start_purchase(self, wanted: int | None, urgent: bool) -> asyncio.Task | None:
        """The call under way, or a new one if the budget allows one now (for `wanted`
        more photos than are at hand, or None: for a job due now); else None. A job that
        must have a fresh photo (urgent) waits out a spent budget (RateLimited) but not
        the pace, and fails over at the scheduler's pace rather than at the backoff's."""
        async with self._reserving:
            if self._purchase is None:
                if not urgent and time.time() < self._calls_from:
                    return None
                wait = await self._reserve(wanted, urgent)
                if wait > 0 and urgent:
                    raise RateLimited(wait, "the access key's calls are used up for now")
                if wait > 0:
                    return None
                self._purchase = asyncio.create_task(self._purchase_batch(),
                                                     name="photo purchase")
                self._purchase.add_done_callback(_retrieve)
            return self._purchase

    async def _purchase_batch(self) -> None:
        try:
            photos = await self._buy()
        except ImageUnavailable as exc:
            self._failures += 1
            self._calls_from = time.time() + backoff(self._settings, self._failures)
            self._trouble(str(exc))
            raise
        except KeyRejected as exc:
            self._calls_from = time.time() + self._settings.retry_max_delay
            self._trouble(str(exc), key_rejected=True)
            raise
        finally:
            self._purchase = None
        self._failures = 0
        self._trouble(None)
        await self._stock(photos)

    def _trouble(self, problem: str | None, key_rejected: bool = False) -> None:
        """Note why fresh photos cannot be had (None: they can again), logged once per
        change rather than once per call."""
        changed = ((problem is None) != (self.problem is None)
                   or key_rejected != self._key_rejected)
        self.problem, self._key_rejected = problem, key_rejected
        if not changed:
            return
        if problem is None:
            log.info("Unsplash answers again: fresh photos resume")
            return
        meanwhile = ("due jobs resolve with photos bought before" if self._settings.photo_reuse
                     else "due jobs fail" if key_rejected else "due jobs wait")
        (log.error if key_rejected else log.warning)(
            "no fresh photos for now: %s; meanwhile %s", problem, meanwhile)

    async def _buy_ahead(self, demand) -> None:
        """Keep the pool ahead of the jobs due within BUY_AHEAD, as the budget allows."""
        while True:
            pooled = self.pool_size
            wanted = demand(time.time() + BUY_AHEAD, pooled + 1) - pooled
            if wanted > 0 and self._purchase is None:
                purchase = await self._start_purchase(wanted, urgent=False)
                if purchase is not None:
                    await asyncio.wait((purchase,))
                    continue
            await asyncio.sleep(BUYER_TICK)

    # The seams: where photos are pooled, and where the key's budget is kept.

    async def _pooled(self) -> Photo | None:
        """A fresh photo from the pool, if it holds one not older than POOL_MAX_AGE."""
        now = time.monotonic()
        while self._pool and now - self._pool[0].fetched_at > POOL_MAX_AGE:
            self._pool.popleft()
        return self._pool.popleft() if self._pool else None

    async def _stock(self, photos: list[Photo]) -> None:
        self._pool.extend(photos)

    async def _bought_elsewhere(self, deadline: float) -> Photo | None:
        """A photo that another process's call brings by `deadline`; here there is none."""
        return None

    async def _reserve(self, wanted: int | None, urgent: bool) -> float:
        """Count a call against the budget if one may be made now: 0; else the seconds
        until one may. (Here the buyer has compared `wanted` with the pool already.)"""
        return self.quota.reserve(time.time(), not urgent, self._settings.unsplash_timeout)

    async def _settle_quota(self, headers, refused: bool) -> None:
        """What an answer, a refusal or no answer (headers None) says of the budget."""
        self.quota.settle(time.time(), headers, refused)

    # One call

    async def _buy(self) -> list[Photo]:
        """One call for a batch of photos, counted by outcome."""
        outcome = "error"
        try:
            photos = await self._fetch()
            outcome = "ok"
            return photos
        except RateLimited:
            outcome = "rate_limited"
            raise
        except KeyRejected:
            outcome = "key_rejected"
            raise
        except ImageUnavailable:
            raise
        except Exception as exc:  # a bug must not stop photos from being bought
            log.exception("buying photos failed")
            raise ImageUnavailable(f"internal error: {exc}") from None
        finally:
            self._metrics.unsplash_requests.labels(outcome).inc()

    async def _fetch(self) -> list[Photo]:
        settings = self._settings
        try:
            async with self._session.get(
                f"{settings.unsplash_api_url}/photos/random",
                params={"query": "food", "count": str(self.batch_size)},
                headers={"Authorization": f"Client-ID {settings.unsplash_access_key}",
                         "Accept-Version": "v1"},
                timeout=aiohttp.ClientTimeout(total=settings.unsplash_timeout),
            ) as response:
                body = await response.read()
                status, headers = response.status, response.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            await self._settle_quota(None, refused=False)
            if isinstance(exc, TimeoutError):
                raise ImageUnavailable(
                    f"Unsplash did not answer within {settings.unsplash_timeout:g} s") from None
            raise ImageUnavailable(f"cannot reach Unsplash: {self._scrub(str(exc))}") from None

        refused = status == 429 or (status == 403 and b"rate limit" in body.lower())
        await self._settle_quota(headers, refused)
        quota, now = self.quota, time.time()
        if refused:
            log.warning("Unsplash refused a call: the access key's calls are used up until "
                        "%s", iso(quota.turns_at))
            raise RateLimited(quota.turns_at - now)
        if status == 401:
            raise KeyRejected("Unsplash rejected the access key (HTTP 401); set a valid "
                              "UNSPLASH_ACCESS_KEY and retry the job")
        if status != 200:
            detail = self._scrub(body.decode("utf-8", "replace"))[:200].strip()
            raise ImageUnavailable(f"Unsplash answered HTTP {status}"
                                   + (f": {detail}" if detail else ""))
        if quota.remaining <= 0 < quota.wait(now, paced=False):
            log.warning("the access key's Unsplash calls are used up until %s; then fresh "
                        "photos resume", iso(quota.turns_at))
        try:
            data = json.loads(body)
            fetched_at = time.monotonic()
            photos = [self._photo(item, fetched_at)
                      for item in (data if isinstance(data, list) else [data])]
        except (ValueError, TypeError, KeyError, AttributeError):
            photos = []
        if not photos:
            raise ImageUnavailable("Unsplash sent a response that is not photo JSON")
        return photos

    def _scrub(self, text: str) -> str:
        key = self._settings.unsplash_access_key
        return text.replace(key, "[key]") if key else text

    @staticmethod
    def _photo(item: dict, fetched_at: float) -> Photo:
        urls, user = item["urls"], item.get("user") or {}
        result = urls["regular"]
        if not isinstance(result, str) or not result.startswith(("https://", "http://")):
            raise ValueError("urls.regular is not a URL")
        return Photo(result, shared_image(result, {
            "id": item.get("id"),
            "thumb": urls.get("thumb") or urls.get("small") or result,
            "small": urls.get("small") or result,
            "alt": item.get("alt_description") or item.get("description") or "Food photo",
            "author": user.get("name"),
            "authorUrl": (user.get("links") or {}).get("html"),
            "pageUrl": (item.get("links") or {}).get("html"),
            "color": item.get("color"),
            "source": "unsplash",
            "reused": False,
        }), fetched_at)


def _retrieve(task: asyncio.Task) -> None:
    """A purchase's failure is in the source's state already; nobody need await it."""
    if not task.cancelled():
        task.exception()


# --- Scheduler ----------------------------------------------------------------------
# One heap of (dueAt, job id) and one timer for the earliest; due jobs move to a ready
# queue that one resolver drains, so 100,000 pending jobs cost no tasks. Transient
# failures back off with full jitter and count an attempt against the jobs the failed
# call was for; rate limits only pause. Finished jobs wait in a second heap, by when
# they resolved, for the same timer to expire them after JOB_RETENTION: no scans, and
# each expiry costs O(log n).

EXPIRE_BATCH = 5000  # expiries per timer tick, so a backlog never holds the loop long


class Scheduler:
    def __init__(self, store: JobStore, images, settings: Settings):
        self.store = store
        self.images = images
        self.settings = settings
        # (dueAt, id) and (resolvedAt, seq, id): tuples of the jobs' own objects, so an
        # entry costs its tuple alone (64 bytes a job).
        self._heap: list[tuple[float, str]] = []
        self._expiries: list[tuple[float, int, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._ready: deque[str] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._started_at = math.inf
        store.listeners.append(self._on_commit)

    def start(self) -> None:
        self._started_at = time.time()
        self.index()
        self.store.replaced.append(self.index)
        self.images.start(self.store, self.due_within)
        self._task = asyncio.create_task(self._resolve_ready(), name="resolver")

    def index(self) -> None:
        """Both heaps, from the registry as it is."""
        jobs = self.store.jobs.values()
        self._heap = [(job.due_at, job.id) for job in jobs if job.status == "pending"]
        heapq.heapify(self._heap)
        if self.settings.job_retention:
            self._expiries = [(job.resolved_at or job.created_at, job.seq, job.id)
                              for job in jobs if job.status != "pending"]
            heapq.heapify(self._expiries)
        self._wake_at(self._next_wake())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.images.stop()

    def _on_commit(self, record: Job | Tombstone) -> None:
        if record.status == "pending":
            self.schedule(record.id, record.due_at)
        elif record.status != "deleted" and self.settings.job_retention:
            heapq.heappush(self._expiries, (record.resolved_at, record.seq, record.id))
            self._wake_at(record.resolved_at + self.settings.job_retention)

    def schedule(self, job_id: str, due_at: float) -> None:
        heapq.heappush(self._heap, (due_at, job_id))
        self._wake_at(due_at)

    def next_due(self) -> float:
        """When the earliest pending job is due (inf if none is)."""
        return self._heap[0][0] if self._heap else math.inf

    def next_expiry(self) -> float:
        """When the earliest finished job expires (inf if none will)."""
        if not self._expiries:
            return math.inf
        return self._expiries[0][0] + self.settings.job_retention

    def due_within(self, by: float, enough: int) -> int:
        """How many jobs are ready or fall due by `by`, counted up to `enough`: only the
        heap's entries that early are looked at, so it costs what it counts."""
        heap, count, stack = self._heap, len(self._ready), [0]
        while stack and count < enough:
            index = stack.pop()
            if index < len(heap) and heap[index][0] <= by:
                count += 1
                stack += (2 * index + 1, 2 * index + 2)
        return count

    def _next_wake(self) -> float:
        wake = self.next_due()
        if self._expiries:
            wake = min(wake, self._expiries[0][0] + self.settings.job_retention)
        return wake

    def _wake_at(self, when: float) -> None:
        if when < self._timer_due:
            self._arm(when)

    def _arm(self, due_at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due_at
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due_at - time.time()), self._release_due)

    def _release_due(self) -> None:
        self._timer, self._timer_due = None, math.inf
        now = time.time()
        wake = self._release(now)
        self._expire(now)
        self._wake_at(self._next_wake())
        if wake:
            self._wakeup.set()

    def _release(self, now: float) -> bool:
        """Move the jobs now due to the ready queue; whether the resolver has work."""
        while self._heap and self._heap[0][0] <= now:
            self._ready.append(heapq.heappop(self._heap)[1])
        return bool(self._ready)

    def _expire(self, now: float) -> None:
        """Delete the finished jobs whose retention is over (a job changed since its
        entry was made, retried say, has a newer entry: the old one is let go)."""
        store, cutoff = self.store, now - self.settings.job_retention
        for _ in range(EXPIRE_BATCH):
            if not self._expiries or self._expiries[0][0] > cutoff:
                return
            entry = heapq.heappop(self._expiries)
            job = store.get(entry[2])
            if job is None or job.seq != entry[1] or job.id in store.in_flight:
                continue
            try:
                done = store.commit(Tombstone(job.id, "expired", now))
            except StorageError:
                return  # shutting down: it expires at the next start
            done.add_done_callback(functools.partial(self._after_expire, entry))

    def _after_expire(self, entry: tuple, done: asyncio.Future) -> None:
        if isinstance(done.exception(), StorageError):  # not on disk: try again later
            retention, later = self.settings.job_retention, self.settings.retry_max_delay
            heapq.heappush(self._expiries, (time.time() - retention + later, *entry[1:]))
            self._wake_at(time.time() + later)

    def _next_ready(self) -> Job | None:
        while self._ready:
            job = self.store.get(self._ready[0])
            if job is not None and job.status == "pending" and job.id not in self.store.in_flight:
                return job
            self._ready.popleft()
        return None

    async def _resolve_ready(self) -> None:
        failures = 0
        served = 0
        while True:
            job = self._next_ready()
            if job is None:
                self._wakeup.clear()
                if not await self._refill():
                    await self._wakeup.wait()
                continue
            try:
                photo = await self.images.take(self._deadline(job))
            except RateLimited as exc:
                log.warning("%s", exc)
                self.store.metrics.unsplash_rate_limited.inc(exc.retry_after)
                await asyncio.sleep(exc.retry_after)
                continue
            except KeyRejected as exc:
                while (job := self._next_ready()) is not None:
                    self._ready.popleft()
                    self._fail(job, str(exc))
                continue
            except ImageUnavailable as exc:
                failures += 1
                self._count_attempt(str(exc))
                await asyncio.sleep(backoff(self.settings, failures))
                continue
            except Exception as exc:  # a bug must not stop every job from resolving
                log.exception("image source failed")
                failures += 1
                self._count_attempt(f"internal error: {exc}")
                await asyncio.sleep(backoff(self.settings, failures))
                continue
            failures = 0
            if self._next_ready() is not job:
                self.images.put_back(photo)  # the job changed while we waited for a photo
                continue
            self._ready.popleft()
            done = self.store.commit(job.resolved(photo.result, photo.image, time.time()))
            done.add_done_callback(functools.partial(self._after_resolve, job.id, photo))
            served += 1
            if served % 64 == 0:
                await asyncio.sleep(0)  # a pool or catalog answers at once; let others run

    async def _refill(self) -> bool:
        """Find more ready jobs when the queue runs dry; the heap alone feeds it here."""
        return False

    def _deadline(self, job: Job) -> float | None:
        """Until when a due job waits for a fresh photo before it takes one bought before;
        with PHOTO_REUSE=never, for as long as it takes. A job that fell due while the
        service was down gets the same grace from the start as one due then: else every
        such job would take a reused photo, however well Unsplash answers."""
        if not self.settings.photo_reuse:
            return None
        return max(job.due_at, self._started_at) + self.settings.photo_wait

    def _count_attempt(self, reason: str) -> None:
        """The failed call was for the next batch of ready jobs: they count an attempt."""
        limit = self.settings.job_max_attempts
        for job_id in list(itertools.islice(self._ready, self.images.batch_size)):
            job = self.store.get(job_id)
            if job is None or job.status != "pending" or job_id in self.store.in_flight:
                continue
            job.count_attempt()
            if job.attempts >= limit:
                self._ready.remove(job_id)
                tries = f"{job.attempts} attempt{'s' if job.attempts != 1 else ''}"
                self._fail(job, f"gave up after {tries}: {reason}")

    def _fail(self, job: Job, reason: str) -> None:
        done = self.store.commit(job.failed(reason, time.time()))
        done.add_done_callback(functools.partial(self._after_resolve, job.id, None))

    def _after_resolve(self, job_id: str, photo, done: asyncio.Future) -> None:
        if done.exception() is None:
            return
        # Not stored, so not resolved: keep the photo, and try the job again later
        # unless it changed first elsewhere (deleted, say).
        if photo is not None:
            self.images.put_back(photo)
        if not isinstance(done.exception(), Conflict):
            self._retry_later(job_id)

    def _retry_later(self, job_id: str) -> None:
        self.schedule(job_id, time.time() + self.settings.retry_base_delay)


# --- Event hub ----------------------------------------------------------------------
# Every committed change is broadcast to every connected peer. A peer has its own
# bounded queue and a writer task, so a slow reader delays nobody: past the bound it
# is closed with 1013 and comes back with `since`. A peer that reconnects is first sent
# the jobs that changed since the seq it names, up to the seq it attached at, then
# SYNCED, then live events. That replay is read from the registry a batch at a time as
# the peer drains (the registry is the log), so what waits for a peer is never more
# than a batch and its live events, whatever it asked for. One sweep a second drops
# the peers that took nothing of what was queued for them within PEER_DRAIN_TIMEOUT
# (sending frames does not count), and, while all peers together hold more than
# PEERS_MAX_QUEUED_BYTES, the one furthest behind.

PEER_BACKLOG_BYTES = 8 * 1024 * 1024
REPLAY_BATCH = 100  # jobs made into frames at a time: about 70 KB
# Finding where a replay goes on walks what changed since (the registry is ordered by
# seq but has no index into it), so each walk keeps the next sixteenth of what is left,
# as references to the immutable records, at most this many (128 KB): a replay of
# 100,000 jobs costs about 20 walks, not 1,000.
REPLAY_READ_MAX = 16_384
# Close codes that mean the server dropped a peer, as jobservice_peers_dropped_total counts.
DROP_REASONS = {1013: "too_far_behind", 1011: "send_failed", 1002: "protocol_error",
                1003: "protocol_error", 1008: "too_many_sessions", 1009: "too_large"}


EVENT_NAMES = {"pending": "ON_CREATED_JOB", "resolved": "ON_RESOLVED_JOB",
               "failed": "ON_RESOLVED_JOB", "deleted": "ON_DELETED_JOB"}


def event_name(record: Job | Tombstone) -> str:
    return EVENT_NAMES[record.status]


class NativeFrames:
    """`["EVENT", payload]` text frames for plain WebSocket clients."""

    @staticmethod
    def event(job: Job) -> str:
        return f'["{event_name(job)}",{job.json}]'

    @staticmethod
    def control(name: str, seq: int) -> str:
        return f'["{name}",{{"seq":{seq}}}]'


class SocketIOFrames:
    """Socket.IO EVENT packets in Engine.IO messages, `42["EVENT",payload,"offset"]`: the
    trailing offset (our seq, as a string) is how Socket.IO's connection state recovery
    knows where a client stopped, exactly as the reference server appends it."""

    @staticmethod
    def event(job: Job) -> str:
        return f'42["{event_name(job)}",{job.json},"{job.seq}"]'

    @staticmethod
    def control(name: str, seq: int) -> str:
        return f'42["{name}",{{"seq":{seq}}},"{seq}"]'


class Peer:
    """One subscriber: the replay it asked for, then live events from a backlog, within
    one bound. A WebSocket peer has a writer task that sends them; a long-polling peer
    hands them out to its next poll."""

    def __init__(self, frames):
        self.frames = frames
        self.replay: deque[str] = deque()  # the batch of the replay read so far
        self.backlog: deque[str] = deque()
        self.queued_bytes = 0  # of both
        # The replay still to read from the store: (seq, up to seq]; then `replay_end`.
        self.replay_store: JobStore | None = None
        self.replay_from = self.replay_until = 0
        self.replay_records: deque[Job | Tombstone] = deque()  # read, not yet made frames
        self.replay_end: list[str] = []
        self.taken = 0  # frames handed to the transport, for the drain deadline
        self.drain_by: float | None = None  # ... by when
        self.drain_target = 0  # ... `taken` must reach
        self.wakeup = asyncio.Event()
        self.ws: web.WebSocketResponse | None = None
        self.transport = None
        self.writer: asyncio.Task | None = None
        self.closing = False
        self.last_words = ""  # a packet that goes out just before the close
        self.drop_reason: str | None = None
        self.token: str | None = None  # the access token it came in with, if one is needed
        self.closer: asyncio.Task | None = None  # the close handshake under way

    def push(self, text: str) -> None:
        if self.closing:
            return
        self.backlog.append(text)
        self.queued_bytes += len(text)
        if self.queued_bytes > PEER_BACKLOG_BYTES:
            self.close(1013, "too far behind; reconnect with since")
        else:
            self.wakeup.set()

    def start(self, first: list[str]) -> None:
        self._queue_replay(first)
        self.wakeup.set()

    def start_replay(self, store: JobStore, since: int, end: list[str]) -> None:
        """Replay what changed from `since` to now, read as it drains, then `end`."""
        self.replay_store = store
        self.replay_from, self.replay_until = since, store.seq
        self.replay_end = end
        self.wakeup.set()

    @property
    def waiting(self) -> bool:
        """Whether anything is left to send."""
        return bool(self.replay or self.backlog) or self.replay_store is not None

    def next_frame(self) -> str | None:
        if not self.replay and self.replay_store is not None:
            self._read_replay()
        queue = self.replay or self.backlog
        if not queue:
            return None
        text = queue.popleft()
        self.queued_bytes -= len(text)
        self.taken += 1
        return text

    def _read_replay(self) -> None:
        records = self.replay_records
        if not records:
            store = self.replay_store
            if store.forgotten > self.replay_from:
                # Deletions still to replay aged out of the window: this replay cannot
                # be exact any more; from where the peer got to, it is told to RESET.
                self.close(1013, "the replay fell out of the window; reconnect with since")
                return
            left = self.replay_until - self.replay_from
            records.extend(store.changed_between(
                self.replay_from, self.replay_until,
                min(max(REPLAY_BATCH, left // 16), REPLAY_READ_MAX)))
            if not records:
                self.replay_store = None
                self._queue_replay(self.replay_end)
                return
            self.replay_from = records[-1].seq
        texts, room = [], PEER_BACKLOG_BYTES - self.queued_bytes
        # As many as fit beside its live events, and at least one.
        while records and len(texts) < REPLAY_BATCH:
            text = self.frames.event(records[0])
            room -= len(text)
            if room < 0 and texts:
                break
            texts.append(text)
            records.popleft()
        self._queue_replay(texts)

    def _queue_replay(self, texts: list[str]) -> None:
        self.replay.extend(texts)
        self.queued_bytes += sum(map(len, texts))
        if self.queued_bytes > PEER_BACKLOG_BYTES:
            self.close(1013, "too far behind; reconnect with since")

    def take(self, limit: int) -> list[str]:
        """The next frames: at least one if there is any, and no more once `limit`
        characters are reached."""
        texts, size = [], 0
        while size < limit and (text := self.next_frame()) is not None:
            texts.append(text)
            size += len(text) + 1
        return texts

    def use_websocket(self, ws: web.WebSocketResponse, transport) -> None:
        self.ws, self.transport = ws, transport
        self.writer = asyncio.get_running_loop().create_task(self._send_over_websocket())

    async def _send_over_websocket(self) -> None:
        try:
            while True:
                while (text := self.next_frame()) is not None:
                    await self.ws.send_str(text)
                self.wakeup.clear()
                await self.wakeup.wait()
        except (ConnectionError, RuntimeError):
            self.close(1011, "send failed")

    def close(self, code: int, reason: str, last_words: str = "",
              drop_reason: str | None = None) -> asyncio.Task | None:
        if self.closing:
            return None
        self.closing = True
        self.last_words = last_words
        self.drop_reason = drop_reason or DROP_REASONS.get(code)
        self.replay.clear()
        self.backlog.clear()
        self.queued_bytes = 0
        self.replay_store = None
        self.replay_records.clear()
        self.wakeup.set()  # a waiting poll answers with the close
        if self.writer is not None:
            self.writer.cancel()
        if self.ws is None:
            return None
        self.closer = asyncio.get_running_loop().create_task(self._close(code, reason))
        return self.closer

    async def _close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(2.0):
                if self.last_words:
                    await self.ws.send_str(self.last_words)
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError, RuntimeError, asyncio.CancelledError):
            # A peer that does not read cannot take a close frame either, and a graceful
            # transport close would wait for it forever. (A CancelledError here may be
            # the writer's: aiohttp's senders share one drain waiter.)
            if self.transport is not None:
                self.transport.abort()
            if asyncio.current_task().cancelling():
                raise


class EventHub:
    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.peers: set[Peer] = set()
        self.sweeper: asyncio.Task | None = None
        store.listeners.append(self.publish)
        store.replaced.append(self.start_over)

    def publish(self, job: Job) -> None:
        if not self.peers:
            return
        texts = {}
        for peer in tuple(self.peers):  # a peer too far behind leaves the set as it goes
            text = texts.get(peer.frames)
            if text is None:
                text = texts[peer.frames] = peer.frames.event(job)
            peer.push(text)

    def join(self, peer: Peer) -> None:
        self.peers.add(peer)
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def attach(self, peer: Peer, since: int | None, handshake: str = "") -> None:
        """Register a peer and queue what it missed, atomically: every change up to now
        is in the replay, every later one arrives in its backlog. The handshake (Socket.IO's
        CONNECT reply) comes first: until it, a client has no namespace for an event."""
        first = [handshake] if handshake else []
        self.join(peer)
        if since is None:
            peer.start(first)
            return
        self.store.forget_old_tombstones()
        if since > self.store.seq or since < self.store.forgotten:
            peer.start([*first, peer.frames.control("RESET", self.store.seq)])
        else:
            peer.start(first)
            peer.start_replay(self.store, since, [peer.frames.control("SYNCED", self.store.seq)])

    async def _sweep(self) -> None:
        timeout = self.settings.peer_drain_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = loop.time()
            for peer in tuple(self.peers):
                if not peer.waiting:
                    peer.drain_by = None
                elif peer.drain_by is None or peer.taken >= peer.drain_target:
                    # What is queued now must be taken by then: a replay not yet read
                    # counts as one frame, so a peer that takes nothing cannot sit on it.
                    peer.drain_by = now + timeout
                    peer.drain_target = (peer.taken + len(peer.replay) + len(peer.backlog)
                                         + (peer.replay_store is not None))
                elif now >= peer.drain_by:
                    peer.close(1013, "events not read in time; reconnect with since",
                               drop_reason="drain_timeout")
            self._shed(self.settings.peers_max_queued_bytes)

    def _shed(self, limit: int) -> None:
        """Close the peers furthest behind while all of them together hold over `limit`."""
        total = sum(peer.queued_bytes for peer in self.peers)
        if total <= limit:
            return
        for peer in sorted(self.peers, key=lambda peer: peer.queued_bytes, reverse=True):
            if total <= limit:
                break
            total -= peer.queued_bytes
            peer.close(1013, "the server holds too many queued events; reconnect with since")

    def revoke(self, tokens: tuple[str, ...]) -> None:
        """After a rotation: close the peers that came in with a token no longer valid
        (1008, policy violation); they are refused when they come back."""
        for peer in tuple(self.peers):
            if peer.token is not None and peer.token not in tokens:
                peer.close(1008, "access token revoked")

    def start_over(self) -> None:
        """The registry was replaced: what each peer was sent may not lead up to it, so
        each comes back with `since` and gets a replay, or a RESET, from the new one."""
        for peer in tuple(self.peers):
            peer.close(1012, "events were lost; reconnect with since")

    def detach(self, peer: Peer) -> None:
        if peer in self.peers:
            self.peers.discard(peer)
            if peer.drop_reason is not None:
                self.store.metrics.peers_dropped.labels(peer.drop_reason).inc()
        if peer.writer is not None:
            peer.writer.cancel()

    async def close_all(self, code: int, reason: str) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            try:
                await self.sweeper
            except asyncio.CancelledError:
                pass
        closing = [peer.close(code, reason) for peer in list(self.peers)]
        await asyncio.gather(*(task for task in closing if task is not None))


# Engine.IO v4 sessions, under Socket.IO v5 on the main namespace. A session starts on
# long-polling (and may upgrade to a WebSocket) or on a WebSocket; either way it is one
# Peer. One sweep pings every session (every PING_INTERVAL), drops those that stop
# answering (PING_TIMEOUT), and enforces the connect timeout, so an idle session costs no
# task and no timer; a request that comes for a session already overdue is refused as it
# arrives, as the reference server's timers would have ended it. The recovery id (pid)
# is random and the public sid is derived from it, so a client that comes back with
# {pid, offset} is recovered with no session kept on the server, across restarts too.

EIO_UPGRADE_TIMEOUT = 10.0
EIO_MAX_PAYLOAD = 1_000_000
SIO_CONNECT_TIMEOUT = 45.0
SIO_PLAIN_NAMESPACE = re.compile(r"/[A-Za-z0-9_-]{1,63}")
# An idle polling session costs about 3 KB, and 17 KB with its long-poll held open
# (tests/bench.py), so 10,000 of them stay under 200 MB. Sessions that have not sent
# their Socket.IO CONNECT are the cheap ones to flood: once 1,000 wait, the oldest goes
# (the flooding address's own first). One address may hold only its share of each
# (POLLING_SESSIONS_PER_ADDRESS, HALF_OPEN_SESSIONS_PER_ADDRESS).
EIO_MAX_POLLING_SESSIONS = 10_000
EIO_MAX_HALF_OPEN = 1_000
# A session that has not connected needs no more than its pings queued: a client that
# makes it queue more (as refusals once did, 42 times the bytes it sent) is cut off.
SIO_HALF_OPEN_BACKLOG_BYTES = 4096
# Packets in one POST: a stock client sends a handful. Past this the POST is refused
# before any packet is looked at, so one body cannot keep the loop busy for long.
EIO_MAX_POST_PACKETS = 1000


def socketio_sid(pid: str) -> str:
    digest = hashlib.sha256(b"socket.io sid:" + pid.encode()).digest()
    return base64.urlsafe_b64encode(digest[:15]).decode()


def socketio_resume(store: JobStore, auth: dict) -> tuple[str, int]:
    """(pid, since) for a CONNECT: the same pid and its offset when the client recovers,
    else a new pid from now on (or, if its offset is out of the store's replay, from a
    RESET)."""
    pid, offset = auth.get("pid"), auth.get("offset")
    recovering = (isinstance(pid, str) and 16 <= len(pid) <= 64 and isinstance(offset, str)
                  and is_ascii_number(offset) and len(offset) <= 18)
    store.forget_old_tombstones()
    if recovering and store.forgotten <= int(offset) <= store.seq:
        return pid, int(offset)
    if recovering:  # the store was replaced, or the window passed: a fresh session, RESET
        return secrets.token_urlsafe(15), int(offset)
    return secrets.token_urlsafe(15), store.seq


# Names a client may not emit: the reference parser refuses an EVENT named after one of
# its sockets' own events.
SIO_RESERVED_EVENTS = frozenset(("connect", "connect_error", "disconnect", "disconnecting",
                                 "newListener", "removeListener"))
SIO_MESSAGE = re.compile(r"[23](?:/[^,]*,)?[0-9]*(.*)", re.DOTALL)


def socketio_message_is_valid(packet: str) -> bool:
    """Whether an EVENT (`2[ns,][id][name, ...]`) or ACK (`3[ns,]id[...]`) from a client
    is one the reference parser reads. Nothing here listens to either, so a good one is
    ignored, as the reference server ignores an event nobody listens to; a bad one ends
    the session, as the parser's error does there."""
    match = SIO_MESSAGE.fullmatch(packet)
    if match is None:
        return False
    try:
        data = json.loads(match.group(1))
    except (ValueError, RecursionError):
        return False
    if type(data) is not list:
        return False
    if packet[0] == "3":
        return True
    name = data[0] if data else None
    if type(name) is str:
        return name not in SIO_RESERVED_EVENTS
    return type(name) in (int, float)


class EngineIOSession(Peer):
    def __init__(self, engine: EngineIO, polling: bool, client: str, token: str | None):
        super().__init__(SocketIOFrames)
        self.engine = engine
        self.client = client  # the address, for the limit on wrong tokens
        self.token = token  # from a Bearer header or the page's cookie, or CONNECT's auth
        self.sid = engine.tag + secrets.token_urlsafe(15)  # the tag names this process
        self.polling = polling  # false once the session is on a WebSocket
        self.upgrading = False  # a WebSocket is taking over
        self.probed = False  # ... and has sent its probe: a waiting poll gets a noop
        self.closed_by_client = False
        self.polled = self.posting = False  # a GET / a POST is under way
        self.connected = False  # Socket.IO CONNECT received
        now = asyncio.get_running_loop().time()
        self.opened_at = now
        self.polled_at = now  # when a long-poll last ended, or the session opened
        self.closed_at = now  # set when it closes with last words still to be polled for
        self.ping_at = now + engine.ping_interval
        self.pong_by: float | None = None

    def open_packet(self) -> str:
        return "0" + _json_value({
            "sid": self.sid, "upgrades": ["websocket"] if self.polling else [],
            "pingInterval": round(self.engine.ping_interval * 1000),
            "pingTimeout": round(self.engine.ping_timeout * 1000),
            "maxPayload": EIO_MAX_PAYLOAD})

    def receive(self, packet: str) -> bool:
        """Take one packet from the client; False if it is not one this server takes,
        and the session is closed."""
        if self.pong_by is not None and self.engine.expire(self):
            return True  # too late, a pong too: the session has ended
        if packet == "3":
            self.pong_by = None
            self.ping_at = asyncio.get_running_loop().time() + self.engine.ping_interval
        elif packet == "1":
            self.closed_by_client = True
            self.close(1000, "closed by the client")
        elif packet.startswith("4"):
            return self._socketio(packet[1:])
        elif packet not in ("2", "5", "6"):  # a client ping, a stray upgrade, a noop
            self.close(1002, "unsupported packet")
            return False
        return True

    def _socketio(self, packet: str) -> bool:
        if packet.startswith("0/"):
            return self._other_namespace(packet[1:].split(",", 1)[0])
        if self.connected:
            if packet == "1":
                self.closed_by_client = True
                self.close(1000, "disconnected by the client")
            elif packet.startswith("1/") and not packet.partition(",")[2]:
                pass  # leaving a namespace it was refused: nothing to do, as the reference
            elif not (packet.startswith(("2", "3")) and socketio_message_is_valid(packet)):
                self.close(1002, "unsupported packet")
                return False
            return True
        if not packet.startswith("0"):
            self.close(1002, "expected a CONNECT packet for /")
            return False
        try:
            auth = json.loads(packet[1:]) if len(packet) > 1 else {}
        except (ValueError, RecursionError):
            auth = None
        if not isinstance(auth, dict):
            self.close(1002, "bad CONNECT payload",
                       '44{"message":"the CONNECT payload must be a JSON object"}')
            return False
        refusal = self._refusal(auth.get("token"))
        if refusal:
            self.refuse(refusal)
            return True
        self.connected = True
        self.engine.settle(self)
        pid, since = socketio_resume(self.engine.hub.store, auth)
        handshake = "40" + _json_value({"sid": socketio_sid(pid), "pid": pid})
        self.engine.hub.attach(self, since, handshake)
        return True

    def _other_namespace(self, namespace: str) -> bool:
        """Only / is served. A stock client hears of a refusal only in the namespace it
        asked for, so a plain name is sent back, as the reference server does; any other
        bytes are not. Before / is connected the refusal ends the session (to / if the
        name was not plain); after, / goes on, as a client's Manager multiplexes all its
        namespaces over one connection."""
        plain = SIO_PLAIN_NAMESPACE.fullmatch(namespace) is not None
        if not self.connected:
            self.refuse("Invalid namespace", namespace if plain else "")
        elif plain:
            self.push(f"44{namespace}," + _json_value({"message": "Invalid namespace"}))
        else:
            self.close(1002, "unsupported packet")
            return False
        return True

    def refuse(self, message: str, namespace: str = "") -> None:
        """Refuse the CONNECT and end the session, as the reference server does: the
        CONNECT_ERROR (a client's connect_error) is its last packet. The message is always
        the server's own words."""
        addressed = f"{namespace}," if namespace else ""
        self.close(1008, "connect refused",
                   f"44{addressed}" + _json_value({"message": message}))

    def _refusal(self, token) -> str | None:
        """Why a CONNECT may not go on (the token is missing or wrong), or None. The
        handshake's token counts only while it is still valid: one revoked since does not.
        A missing token is a guess like a wrong one, as a session costs no token to open."""
        access = self.engine.access
        if not access.required or self.token in access.tokens:
            return None
        now = time.time()
        if access.failures.peek(self.client, now) < 1:
            return "too many wrong tokens; wait a minute"
        if not isinstance(token, str) or not token:
            access.failures.take(self.client, now)
            return "unauthorized: pass the token as auth: {token}"
        self.token = access.match(token)
        if self.token is None:
            access.failures.take(self.client, now)
            return "unauthorized: the token is wrong"
        return None

    async def poll(self) -> str:
        """Wait until there is something to send (or the session ends, or is upgrading),
        then the body of the answer to a long-polling GET."""
        while not (self.waiting or self.closing or self.probed or not self.polling):
            self.wakeup.clear()
            await self.wakeup.wait()
        if self.closed_by_client:
            return "6"
        if self.closing:
            # The last words alone, and the close to the poll after: a stock client takes
            # in a CONNECT_ERROR on its next tick, so a close in the same body would reach
            # it first, as a disconnect of a socket that never connected.
            words, self.last_words = self.last_words, ""
            return words or "1"
        texts = self.take(EIO_MAX_PAYLOAD) if self.polling else []
        return "\x1e".join(texts) or "6"

    def push(self, text: str) -> None:
        if not self.connected and self.queued_bytes + len(text) > SIO_HALF_OPEN_BACKLOG_BYTES:
            self.close(1008, "too much queued before CONNECT")
        else:
            super().push(text)

    def ping(self, pong_by: float) -> None:
        """A ping, ahead of any events waiting: a replay that takes longer than the
        pong may does not end the session of a client that reads it (the events keep
        their order; a ping belongs to no namespace)."""
        if not self.closing:
            self.pong_by = pong_by
            self.replay.appendleft("2")
            self.queued_bytes += 1
            self.wakeup.set()

    def silent(self, now: float) -> bool:
        """The client stopped answering pings, or, on polling, stopped collecting them:
        pongs sent blind, without polling, do not keep a session."""
        if self.pong_by is not None and now >= self.pong_by:
            return True
        return (self.polling and not self.polled and not self.upgrading
                and now >= self.polled_at + self.engine.heartbeat)

    def upgrade(self, ws: web.WebSocketResponse, transport) -> None:
        self.engine.count_polling(self, -1)
        self.polling = self.upgrading = self.probed = False
        self.wakeup.set()  # a poll still waiting is answered with a noop
        self.use_websocket(ws, transport)

    def close(self, code: int, reason: str, last_words: str = "",
              drop_reason: str | None = None) -> asyncio.Task | None:
        # Last words for a polling client go out with a poll, and the close with the one
        # after: its sid must still be known then, or the client hears "Session ID unknown"
        # instead of why. Until then (or the sweep, after a ping timeout) it still counts as
        # waiting for its CONNECT, under the same caps, and closing it again forgets it.
        lingers = bool(last_words) and self.polling and not self.closing
        task = super().close(code, reason, last_words, drop_reason)
        if lingers:
            self.closed_at = asyncio.get_running_loop().time()
        else:
            self.engine.forget(self)
        return task


class EngineIO:
    """The Engine.IO sessions by sid, and the one sweep that keeps their heartbeats."""

    def __init__(self, hub: EventHub, access: Access):
        self.hub = hub
        self.access = access
        self.ping_interval = access.settings.ping_interval
        self.ping_timeout = access.settings.ping_timeout
        # A polling client that has not polled for this long has missed a ping's pong.
        self.heartbeat = self.ping_interval + self.ping_timeout
        self.sessions: dict[str, EngineIOSession] = {}
        self.half_open: dict[str, EngineIOSession] = {}  # no CONNECT yet, oldest first
        self.half_open_by_address: dict[str, dict[str, EngineIOSession]] = {}  # the same
        self.polling_count = 0
        self.polling_by_address: dict[str, int] = {}
        self.sweeper: asyncio.Task | None = None
        # In Redis mode, the process's tag starts each sid it makes, and the relay takes
        # a request for another process's sid there (jobservice_redis.Relay).
        self.tag = ""
        self.relay = None

    def open(self, polling: bool, client: str = "", token: str | None = None
             ) -> EngineIOSession | None:
        """A new session, or None if the polling sessions are at their cap, for all or
        for the client's address, with none of them waiting for its CONNECT to give way."""
        settings = self.access.settings
        own = self.half_open_by_address.get(client, {})
        if (len(own) >= settings.half_open_sessions_per_address
                or len(self.half_open) >= EIO_MAX_HALF_OPEN):
            # The address's own oldest first: a flood from one address pushes out only its own.
            next(iter((own or self.half_open).values())).close(1008, "too many sessions waiting")
            own = self.half_open_by_address.get(client, {})
        if polling and self.polling_by_address.get(client, 0) >= \
                settings.polling_sessions_per_address and not self._give_way(own):
            return None
        if polling and self.polling_count >= EIO_MAX_POLLING_SESSIONS and not (
                self._give_way(self.half_open_by_address.get(client, {}))
                or self._give_way(self.half_open)):
            return None
        session = EngineIOSession(self, polling, client, token)
        self._register(session)
        return session

    def _register(self, session: EngineIOSession) -> None:
        self.sessions[session.sid] = session
        if not session.connected:
            self.half_open[session.sid] = session
            self.half_open_by_address.setdefault(session.client, {})[session.sid] = session
        self.count_polling(session, +1)
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    # A session moves to the process that holds its WebSocket (every process reads the
    # same events): its owner hands over what the client has not been sent yet, and the
    # seq up to which that covers; the new owner goes on from there in its own registry.

    def hand_over(self, session: EngineIOSession) -> dict:
        """The session's state for the process its WebSocket reached; here it ends, and
        its client is told nothing (it is moving, not closing)."""
        now = asyncio.get_running_loop().time()
        frames, since, end = list(session.replay), None, []
        if session.replay_store is not None:
            # Mid-replay: the replay goes on from where it got to, up to the new owner's
            # now, so it holds the live events queued meanwhile too; only pings stay.
            records = session.replay_records
            since = records[0].seq - 1 if records else session.replay_from
            end = session.replay_end
            frames += [text for text in session.backlog if text == "2"]
        else:
            frames += session.backlog
            if session.connected:
                since = self.hub.store.seq
        state = {"sid": session.sid, "client": session.client, "token": session.token,
                 "connected": session.connected, "age": now - session.opened_at,
                 "ping_in": session.ping_at - now,
                 "pong_in": None if session.pong_by is None else session.pong_by - now,
                 "frames": frames, "since": since, "end": end, "seq": self.hub.store.seq}
        session.close(1000, "moved to the process of its WebSocket")
        return state

    def adopt(self, state: dict, ws: web.WebSocketResponse, transport) -> EngineIOSession:
        """The session another process handed over, on this process's WebSocket; the
        store has applied every change up to state["seq"]."""
        session = EngineIOSession(self, False, state["client"], state["token"])
        session.sid, session.connected = state["sid"], state["connected"]
        now = asyncio.get_running_loop().time()
        session.opened_at = now - state["age"]
        session.ping_at = now + state["ping_in"]
        if state["pong_in"] is not None:
            session.pong_by = now + state["pong_in"]
        self._register(session)
        session.start(state["frames"])
        if session.connected:
            self.hub.join(session)
            session.start_replay(self.hub.store, state["since"], state["end"])
        session.use_websocket(ws, transport)
        return session

    @staticmethod
    def _give_way(waiting: dict[str, EngineIOSession]) -> bool:
        """Close the oldest polling session of those waiting for their CONNECT, if any."""
        oldest = next((session for session in waiting.values() if session.polling), None)
        if oldest is not None:
            oldest.close(1008, "too many sessions waiting")
        return oldest is not None

    def count_polling(self, session: EngineIOSession, change: int) -> None:
        if not session.polling:
            return
        self.polling_count += change
        held = self.polling_by_address.get(session.client, 0) + change
        if held:
            self.polling_by_address[session.client] = held
        else:
            self.polling_by_address.pop(session.client, None)

    def settle(self, session: EngineIOSession) -> None:
        """The session is no longer waiting for its CONNECT."""
        if self.half_open.pop(session.sid, None) is not None:
            waiting = self.half_open_by_address[session.client]
            del waiting[session.sid]
            if not waiting:
                del self.half_open_by_address[session.client]

    def forget(self, session: EngineIOSession) -> None:
        if self.sessions.pop(session.sid, None) is not None:
            self.count_polling(session, -1)
        self.settle(session)
        self.hub.detach(session)

    def revoke(self, tokens: tuple[str, ...]) -> None:
        """After a rotation: refuse the sessions still waiting for their CONNECT that came
        in with a token no longer valid (the connected ones are the hub's to close)."""
        for session in tuple(self.half_open.values()):
            if session.token is not None and session.token not in tokens:
                session.refuse("unauthorized: the access token was revoked")

    def session(self, sid: str) -> EngineIOSession | None:
        """The session of that sid, if it is still alive now."""
        session = self.sessions.get(sid)
        if session is not None and self.expire(session):
            return None
        return session

    def expire(self, session: EngineIOSession, now: float | None = None) -> bool:
        """End the session if its heartbeat is overdue, or forget it if its last words
        were never polled for; whether it has ended."""
        now = asyncio.get_running_loop().time() if now is None else now
        if session.closing:
            if now < session.closed_at + self.ping_timeout:
                return False
            self.forget(session)
        elif session.silent(now):
            session.close(1000, "ping timeout")
            self.hub.store.metrics.peers_dropped.labels("ping_timeout").inc()
        else:
            return False
        return True

    async def _sweep(self) -> None:
        period = min(1.0, self.ping_interval / 4, self.ping_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for session in list(self.sessions.values()):
                if self.expire(session, now) or session.closing:
                    continue
                if not session.connected and now >= session.opened_at + SIO_CONNECT_TIMEOUT:
                    session.close(1002, "no Socket.IO CONNECT packet")
                elif session.pong_by is None and now >= session.ping_at:
                    session.ping(now + self.ping_timeout)

    async def close_all(self, code: int, reason: str) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()  # and awaited: a sweep left pending holds its sessions
            try:
                await self.sweeper
            except asyncio.CancelledError:
                pass
        closing = [session.close(code, reason) for session in list(self.sessions.values())]
        await asyncio.gather(*(task for task in closing if task is not None))


# --- HTTP handlers ------------------------------------------------------------------
# JSON in, JSON out; every error is {"error": {"code", "message"}} with the status that
# fits. One guard, wrapped around every route's handler (add_route, below), does errors,
# CORS and security headers, since each layer costs every request.

MAX_BODY = 64 * 1024
MAX_PAGE = 1000
JSON_TYPE = "application/json"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def json_response(text: str, status: int = 200, headers=None) -> web.Response:
    return web.Response(text=text, status=status, headers=headers,
                        content_type=JSON_TYPE, charset="utf-8")


def error_response(status: int, code: str, message: str, headers=None) -> web.Response:
    return json_response(json.dumps({"error": {"code": code, "message": message}}),
                         status, headers)


HTTP_ERROR_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found",
                    405: "method_not_allowed", 413: "payload_too_large",
                    431: "headers_too_large"}


# Request bodies are decoded here, not by aiohttp: the server runs with SERVER_OPTIONS.
# aiohttp's own decoding answers a coding it cannot decode (br and zstd, without their
# libraries) with a plain-text 400 from its parser, raises on a corrupt body wherever it
# is read (even after the response), and decodes the whole rest of a body nobody reads.
# Here a coding not decoded is a 415, a body that does not decode is a 400, and no more
# than `limit` bytes are ever decoded: a few KB of gzip can hold gigabytes.
SERVER_OPTIONS = {"auto_decompress": False}
BODY_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                "deflate": zlib.MAX_WBITS}


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The request's body, decoded if it came gzip- or deflate-coded; ApiError if it is
    over `limit` bytes (as sent or once decoded), in a coding not decoded, or corrupt."""
    length = request.content_length
    if (length or 0) > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    coding = request.headers.get("Content-Encoding")  # the one lookup a plain body costs
    if coding is not None and coding.strip().lower() != "identity":
        return await _decoded_body(request, coding, limit)
    body = bytearray()
    try:
        if length is not None:
            # One that came whole with its headers (most do) is taken without waiting.
            content = request.content
            return content.read_nowait() if content.is_eof() else \
                await content.readexactly(length)
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    except (web.RequestPayloadError, asyncio.IncompleteReadError) as exc:
        raise ApiError(400, "invalid_body", f"the body cannot be read: {exc}") from None
    return bytes(body)


async def _decoded_body(request: web.Request, coding: str, limit: int) -> bytes:
    name = coding.strip().lower()
    wbits = BODY_CODINGS.get(name)
    if wbits is None:
        raise ApiError(415, "unsupported_content_encoding",
                       f"Content-Encoding {coding[:40]!r} is not one this service decodes; "
                       "send the body as it is, or coded with gzip or deflate")
    decoder = zlib.decompressobj(wbits)
    body, received = bytearray(), False
    try:
        while chunk := await request.content.readany():
            received = True
            # At most one byte over the limit is decoded: enough to know it is over.
            body += decoder.decompress(chunk, limit + 1 - len(body))
            if len(body) > limit:
                raise ApiError(413, "payload_too_large",
                               f"the body is over {limit} bytes once decoded")
        if received and (not decoder.eof or decoder.unused_data):
            raise zlib.error("the data is cut short or goes on past its end")
    except zlib.error:
        raise ApiError(400, "invalid_content_encoding",
                       f"the body is not valid {name} data (Content-Encoding)") from None
    except web.RequestPayloadError as exc:
        raise ApiError(400, "invalid_body", f"the body cannot be read: {exc}") from None
    return bytes(body)


async def json_body(request: web.Request, shape: str = "a JSON object") -> dict:
    """The body as a JSON object ({} for none); ApiError 400 if it is not one."""
    raw = await read_body(request)
    # No body and "{}", what clients send for "nothing to say", need no parsing (1 us).
    if raw.strip() in (b"", b"{}"):
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", f"the body must be {shape}")
    return body


# Access: with API_TOKEN or API_TOKENS_FILE set, every door wants a token, by an
# `Authorization: Bearer` header or by the page's session cookie. The cookie is signed
# with the token it was traded for, so nothing about sessions is stored, and a token
# rotated out of the file ends its sessions. Wrong tokens are limited per address, and
# CLIENT_RATE_LIMIT limits job creation per client, with token buckets kept in memory.

SESSION_COOKIE = "jobservice_session"
SESSION_LIFETIME = 30 * 86400
FAILED_ATTEMPTS = (10, 60.0)  # wrong tokens allowed per address: 10 a minute
MUTATING = frozenset(("POST", "PUT", "PATCH", "DELETE"))


class RateLimiter:
    """Token buckets by client key, in memory. A bucket that has filled up again is the
    same as no bucket, so idle ones are dropped (least recently used first), and at most
    `max_clients` are kept whatever happens: a flood of addresses costs a bounded dict."""

    def __init__(self, limit: int, period: float, max_clients: int = 100_000):
        self.limit, self.period = limit, period
        self.limit_text = str(limit)
        self.rate = limit / period
        self.max_clients = max_clients
        # key -> (tokens, at), least recently used first. An OrderedDict, because a dict
        # that is emptied from the front makes finding its first item ever slower.
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> tuple[bool, float]:
        """(allowed, tokens left); the request is counted only if it is allowed."""
        buckets = self.buckets
        held = buckets.get(key)
        if held is None:
            tokens = self.limit
        else:
            tokens = min(self.limit, held[0] + (now - held[1]) * self.rate)
            buckets.move_to_end(key)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        buckets[key] = (tokens, now)
        self._drop_idle(now)
        return allowed, tokens

    def peek(self, key: str, now: float) -> float:
        held = self.buckets.get(key)
        if held is None:
            return self.limit
        return min(self.limit, held[0] + (now - held[1]) * self.rate)

    def _drop_idle(self, now: float) -> None:
        buckets = self.buckets
        while buckets:
            key = next(iter(buckets))
            tokens, at = buckets[key]
            if len(buckets) <= self.max_clients and tokens + (now - at) * self.rate < self.limit:
                return
            buckets.popitem(last=False)

    def wait(self, tokens: float) -> int:
        """Whole seconds until one request is allowed again."""
        return max(1, math.ceil((1 - tokens) / self.rate))

    def headers(self, tokens: float) -> dict:
        """IETF draft RateLimit-* fields: the limit, what is left, and seconds until full."""
        return {"RateLimit-Limit": self.limit_text, "RateLimit-Remaining": str(int(tokens)),
                "RateLimit-Reset": str(math.ceil((self.limit - tokens) / self.rate))}


def _bucket_key(token: str) -> str:
    return f"token {hashlib.sha256(token.encode()).hexdigest()[:32]}"


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer` header, or None without one."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def _peer_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if isinstance(peer, tuple) else "local"


class Access:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.tokens = read_tokens(settings)
        self.failures = RateLimiter(*FAILED_ATTEMPTS)
        self.creations = RateLimiter(*settings.client_rate_limit) \
            if settings.client_rate_limit else None

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: tuple[str, ...]) -> None:
        # Each token's key in the creation limiter is a digest, so the limiter never
        # holds a token itself; made here, once, as hashing it per request cost 1.2 us.
        self._tokens = tokens
        self._buckets = {token: _bucket_key(token) for token in tokens}

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def reload(self) -> None:
        """SIGHUP: read API_TOKENS_FILE again; on any problem keep the tokens in force."""
        try:
            self.tokens = read_tokens(self.settings)
        except ConfigError as exc:
            log.error("tokens not reloaded, the old ones stay in force: %s", exc)
        else:
            log.info("reloaded %d access tokens", len(self.tokens))

    def match(self, candidate: str) -> str | None:
        """The configured token equal to candidate, compared in constant time with each."""
        try:
            given = candidate.encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8, kept by aiohttp as surrogates
            return None
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.encode(), given):
                found = token
        return found

    def cookie(self, token: str, now: float) -> str:
        expires = int(now) + SESSION_LIFETIME
        return f"{expires}.{self._sign(token, expires)}"

    def cookie_token(self, value: str, now: float) -> str | None:
        expires, _, signature = value.partition(".")
        if not is_ascii_number(expires) or len(expires) > 12 or int(expires) < now:
            return None
        if not signature.isascii():  # compare_digest raises on a str that is not ASCII
            return None
        found = None
        for token in self.tokens:
            if hmac.compare_digest(self._sign(token, int(expires)), signature):
                found = token
        return found

    @staticmethod
    def _sign(token: str, expires: int) -> str:
        return hmac.new(token.encode(), f"jobservice session until {expires}".encode(),
                        hashlib.sha256).hexdigest()

    def credential(self, request: web.Request, cookie_counts: bool = True
                   ) -> tuple[str | None, bool, bool]:
        """(the token, came by cookie, something was presented) for a request; the
        session cookie is not looked at unless cookie_counts."""
        given = bearer(request)
        if given is not None:
            return self.match(given), False, True
        cookie = request.cookies.get(SESSION_COOKIE) if cookie_counts else None
        if cookie:
            return self.cookie_token(cookie, time.time()), True, True
        return None, False, False

    def client(self, request: web.Request) -> str:
        """The client's address: the socket's peer, unless that is a trusted proxy, in
        which case the nearest untrusted hop of X-Forwarded-For."""
        address = _peer_address(request)
        if not self.settings.trusted_proxies or not self.settings.trusts_proxy(address):
            return address
        hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ())
                for hop in value.split(",")]
        for hop in reversed(hops):
            if not self.settings.trusts_proxy(hop):
                return hop[:64]
        return address

    def scheme(self, request: web.Request) -> str:
        """http or https as the client sees it: a trusted proxy's X-Forwarded-Proto."""
        proto = request.headers.get("X-Forwarded-Proto", "").lower()
        if proto in ("http", "https") and self.settings.trusts_proxy(_peer_address(request)):
            return proto
        return request.scheme

    def refuse(self, request: web.Request, presented: bool) -> None:
        """A missing or wrong token: 401, or 429 once an address has guessed too often."""
        if presented:
            allowed, tokens = self.failures.take(self.client(request), time.time())
            if not allowed:
                raise ApiError(429, "too_many_attempts", "too many wrong tokens; wait",
                               {"Retry-After": str(self.failures.wait(tokens))})
        raise ApiError(401, "unauthorized",
                       "a token is needed: send Authorization: Bearer <token>",
                       {"WWW-Authenticate": 'Bearer realm="jobservice"'})

    def guessing(self, request: web.Request) -> bool:
        # Nobody has guessed wrong lately (the usual case): no address to look up.
        if not self.failures.buckets:
            return False
        return self.failures.peek(self.client(request), time.time()) < 1

    def bucket(self, token: str) -> str:
        """The key a token's requests are limited under (a token rotated out since its
        request was let in is still limited under its own)."""
        return self._buckets.get(token) or _bucket_key(token)


async def create_job(request: web.Request) -> web.Response:
    await json_body(request)  # optional, and ignored; but bad input is refused
    app = request.app
    store, settings = app[STORE], app[SETTINGS]
    _make_room(app, store, settings)
    _admit(app, store, settings)
    headers = app[CREATED_HEADERS].copy()  # its security headers, as the guard adds them
    if app[ACCESS].creations is not None:
        headers.update(_rate_limit(request))
    job = Job.new(settings, time.time())
    await _committed(store, job)
    store.metrics.jobs_created.inc()
    headers["Location"] = f"/jobs/{job.id}"
    # An id is hex and hyphens: nothing to escape, so no json.dumps (2 us a request).
    return web.Response(body=f'{{"id": "{job.id}"}}'.encode(), status=201, headers=headers)


def _rate_limit(request: web.Request) -> dict:
    """CLIENT_RATE_LIMIT for creations and retries, per token (or address); the
    RateLimit-* headers to send either way."""
    access = request.app[ACCESS]
    limiter = access.creations
    if limiter is None:
        return {}
    token = request.get(TOKEN)
    key = access.bucket(token) if token else access.client(request)
    allowed, tokens = limiter.take(key, time.time())
    headers = limiter.headers(tokens)
    if not allowed:
        raise ApiError(429, "rate_limited",
                       f"over {limiter.limit} new jobs per {limiter.period:g} s "
                       f"(CLIENT_RATE_LIMIT); try again later",
                       {**headers, "Retry-After": str(limiter.wait(tokens))})
    return headers


STORE_FULL_RETRY = 3600.0  # Retry-After when no job is due to expire sooner


def _make_room(app: web.Application, store: JobStore, settings: Settings) -> None:
    """MAX_STORED_JOBS: past it, a new job is refused until some expire or are deleted (a
    retry takes no room: its job is stored already)."""
    limit = settings.max_stored_jobs
    # The registry as applied: creations being written may pass the bound by as many as
    # are in flight at once (one per connection); in_flight would count changes too.
    if limit and len(store.jobs) >= limit:
        wait = app[SCHEDULER].next_expiry() - time.time()
        raise ApiError(503, "too_many_stored_jobs",
                       f"{limit} jobs are stored, the most this service keeps "
                       "(MAX_STORED_JOBS); try again when some have expired (JOB_RETENTION) "
                       "or been deleted",
                       {"Retry-After": str(max(1, math.ceil(min(wait, STORE_FULL_RETRY))))})


def _admit(app: web.Application, store: JobStore, settings: Settings) -> None:
    """MAX_PENDING_JOBS: past it, a new pending job is refused until some resolve."""
    if store.counts["pending"] + len(store.in_flight) < settings.max_pending_jobs:
        return
    wait = app[SCHEDULER].next_due() - time.time()
    retry_after = str(max(1, math.ceil(min(wait, settings.job_delay_max))))
    raise ApiError(429, "too_many_pending_jobs",
                   f"{settings.max_pending_jobs} jobs are pending, the most this service "
                   f"takes (MAX_PENDING_JOBS); try again when some have resolved",
                   {"Retry-After": retry_after})


async def _committed(store: JobStore, job: Job | Tombstone) -> None:
    try:
        await store.commit(job)
    except StorageError as exc:
        raise ApiError(503, "storage_unavailable", str(exc), {"Retry-After": "5"}) from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None


async def list_jobs(request: web.Request) -> web.Response:
    store = request.app[STORE]
    query = request.query
    unknown = set(query) - {"status", "limit", "after", "before", "order"}
    if unknown:
        raise ApiError(400, "invalid_parameter",
                       f"unknown query parameter {sorted(unknown)[0]!r}")
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_parameter",
                       f"status must be one of {', '.join(STATUSES)}")
    order = query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "invalid_parameter", "order must be asc or desc")
    limit = _query_limit(query, MAX_PAGE)
    cursor_name = "before" if order == "desc" else "after"
    wrong = "after" if order == "desc" else "before"
    if wrong in query:
        raise ApiError(400, "invalid_parameter",
                       f"{wrong} goes with order={'asc' if order == 'desc' else 'desc'}; "
                       f"use {cursor_name}")
    try:
        page, last = store.listing(status, limit, query.get(cursor_name), order == "desc")
    except KeyError:
        raise ApiError(400, "invalid_parameter", f"{cursor_name} names no job") from None
    headers = {"X-Jobs-Seq": str(store.seq)}
    if last is not None:
        params = {"limit": limit, cursor_name: last}
        if order == "desc":
            params["order"] = order
        if status:
            params["status"] = status
        headers["Link"] = f'</jobs?{urlencode(params)}>; rel="next"'
    if limit is not None:
        return json_response("[" + ",".join(map(JOB_JSON, page)) + "]", headers=headers)
    # Every job: sent in slices as it is joined, rather than joined whole and then
    # copied: about half the time and 50 MB less at 100,000 jobs (tests/bench.py).
    response = web.StreamResponse(headers=headers)
    response.content_type, response.charset = JSON_TYPE, "utf-8"
    add_headers(request, response)
    await response.prepare(request)
    # A client that stops reading would hold the list (and the slice in flight) for as
    # long as it likes: each slice has to be taken within RESPONSE_WRITE_TIMEOUT.
    timeout = request.app[SETTINGS].response_write_timeout
    try:
        if not page:
            async with asyncio.timeout(timeout):
                await response.write(b"[]")
        for start in range(0, len(page), LIST_SLICE):
            # The brackets and commas go on the first and last texts, not round the
            # joined slice, which would copy it once more: 46 ms against 51 ms to make
            # the text of 100,000 resolved jobs.
            texts = list(map(JOB_JSON, page[start:start + LIST_SLICE]))
            texts[0] = ("[" if start == 0 else ",") + texts[0]
            if start + LIST_SLICE >= len(page):
                texts[-1] += "]"
            async with asyncio.timeout(timeout):
                await response.write(",".join(texts).encode())
        async with asyncio.timeout(timeout):
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    return response


LIST_SLICE = 2000
# Job.json's function itself, mapped over a list: the property's lookup for each job was
# a sixth of the time to make 100,000 texts of jobs with photos (80 ms against 67 ms).
JOB_JSON = Job.json.fget


def _query_limit(query, maximum: int) -> int | None:
    """The `limit` parameter (None without one); ApiError 400 unless it is 1 to maximum."""
    if "limit" not in query:
        return None
    raw = query["limit"]
    if not is_ascii_number(raw) or not 1 <= int(raw) <= maximum:
        raise ApiError(400, "invalid_parameter",
                       f"limit must be a whole number from 1 to {maximum}")
    return int(raw)


async def get_job(request: web.Request) -> web.Response:
    job = request.app[STORE].get(request.match_info["id"])
    if job is None:
        raise ApiError(404, "not_found", "no job with that id")
    return json_response(job.json)


async def retry_job(request: web.Request) -> web.Response:
    app = request.app
    store, settings = app[STORE], app[SETTINGS]
    _failed_job(store, request.match_info["id"])
    await json_body(request)  # as for POST /jobs: optional, ignored, and checked
    job = _failed_job(store, request.match_info["id"])  # again: it may have changed since
    _admit(app, store, settings)
    headers = _rate_limit(request)
    retried = job.retried(time.time() + settings.retry_base_delay)
    await _committed(store, retried)
    headers["Location"] = f"/jobs/{job.id}"
    return json_response(retried.json, 202, headers)


def _failed_job(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", "no job with that id")
    if job.status != "failed" or job.id in store.in_flight:
        raise ApiError(409, "not_failed", f"only a failed job can be retried; this one is "
                                          f"{job.status}")
    return job


async def delete_job(request: web.Request) -> web.Response:
    """Cancel a pending job (it never resolves and costs no photo) or remove a finished
    one; 204 once the deletion is on disk."""
    store = request.app[STORE]
    job = store.get(request.match_info["id"])
    if job is None:
        raise ApiError(404, "not_found", "no job with that id")
    await _committed(store, Tombstone(job.id, "deleted", time.time()))
    return web.Response(status=204)


# Bulk changes: retry the failed jobs, delete the finished ones, all of them or those a
# filter picks. One request may take a million jobs, so the registry is walked
# WALK_STEP places at a time, and the jobs found are changed BULK_STEP at a time, each
# through commit() like a single change (journaled, announced, replayed), the next step
# once the last is stored: no step holds the event loop long, nor fills a peer's queue
# at once. The answer (202, how many it took) comes once the walk is done; the changes
# follow. A request takes the jobs that match when it comes: a job anyone changes after
# that (retries, deletes, or a node resolves), before its turn, is left as that change
# made it, in Redis mode too, where the script checks it again; one that fails later is
# not retried. One runs at a time per process: the next waits its turn (so it sees what
# the last one did), and past BULK_QUEUE waiting, another gets 409.

WALK_STEP = 5000  # places of the order looked at per step: 3-7 ms of CPU at a million jobs
BULK_STEP = 500  # changes staged at once
# The jobs a bulk change makes (and its list of those it took) live on: every this many
# they are moved out of the garbage collector's way, as after a compaction. Its passes
# over them took 20-50 ms at 100,000 jobs, 250 ms at 500,000.
FREEZE_EVERY = 5000
BULK_QUEUE = 4
FIND_LIMIT = 100
MAX_ID_LENGTH = 200


class BulkChange:
    def __init__(self, store: JobStore):
        self.store = store
        self.waiting = 0
        self._turn = asyncio.Lock()  # held from the walk to the last change stored
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._turn.locked()

    async def begin(self, matches, statuses: tuple[str, ...] | None, change, room=None
                    ) -> tuple[int, int]:
        """Take the jobs that match when its turn comes (at most room(), if given) and
        change each into change(job) in the background; (how many it took, the seq they
        were taken at). `statuses`: the filter picks every job of these, and no other."""
        if self.waiting >= BULK_QUEUE:
            raise ApiError(409, "bulk_in_progress", f"{BULK_QUEUE} bulk changes wait for "
                           "the one under way on this node; try again when it is done",
                           {"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        try:
            jobs, seq = await self._select(matches, statuses)
        except BaseException:
            self._turn.release()
            raise
        if room is not None:
            del jobs[max(0, room()):]
        self._task = asyncio.create_task(self._change(jobs, change), name="bulk change")
        return len(jobs), seq

    async def _select(self, matches, statuses) -> tuple[list[Job], int]:
        store = self.store
        while True:
            # Every job of these statuses found: the walk can end.
            wanted = None if statuses is None else sum(store.counts[s] for s in statuses)
            seq, found, cursor = store.seq, [], None
            try:
                while True:
                    jobs, cursor = store.walk(cursor, WALK_STEP)
                    found += [job for job in jobs if job.seq <= seq and matches(job)]
                    if cursor is None or len(found) == wanted:
                        return found, seq
                    await asyncio.sleep(0)
            except KeyError:
                continue  # the order was rebuilt meanwhile: a job could be met twice

    async def _change(self, jobs: list[Job], change) -> None:
        store, changed, skipped = self.store, 0, 0
        try:
            for start in range(0, len(jobs), BULK_STEP):
                if start % FREEZE_EVERY == 0:
                    gc.freeze()
                promises, full = [], False
                step = jobs[start:start + BULK_STEP]
                jobs[start:start + BULK_STEP] = [None] * len(step)  # let them go as done
                for job in step:
                    record = change(job)
                    if record is None:  # no room left (MAX_PENDING_JOBS)
                        full = True
                        break
                    try:
                        promises.append(store.commit_unless_changed(record, job.seq))
                    except Conflict:
                        skipped += 1
                results = await asyncio.gather(*promises, return_exceptions=True)
                changed += sum(result is None for result in results)
                skipped += sum(isinstance(result, Conflict) for result in results)
                failure = next((result for result in results
                                if isinstance(result, StorageError)), None)
                if failure is not None:
                    log.warning("a bulk change stopped after %d jobs: %s", changed, failure)
                    return
                if full:
                    return
        except StorageError:
            pass  # shutting down: what is left stays as it is
        finally:
            self._turn.release()
            log.info("a bulk change changed %d jobs (%d changed first elsewhere)", changed,
                     skipped)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _bulk_filter(body: dict, statuses: tuple[str, ...]):
    """(matches(job), the statuses it takes if it picks by status alone, else None) from
    a bulk request's body: `status`, `finishedBefore`, `finishedAfter`, `error`."""
    unknown = set(body) - {"status", "finishedBefore", "finishedAfter", "error"}
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field {sorted(unknown)[0]!r}")
    status = body.get("status")
    if status is not None:
        if status not in statuses:
            raise ApiError(400, "invalid_body", f"status must be {' or '.join(statuses)}")
        statuses = (status,)
    bounds = []
    for name in ("finishedBefore", "finishedAfter"):
        value = body.get(name)
        try:
            bounds.append(None if value is None else parse_time(value, name))
            if value is not None and not math.isfinite(bounds[-1]):  # JSON's Infinity, NaN
                raise ValueError(name)
        except (ValueError, TypeError, OverflowError):
            raise ApiError(400, "invalid_body", f"{name} must be a time (ISO 8601, or epoch "
                           "milliseconds)") from None
    before, after = bounds
    error = body.get("error")
    if error is not None and (not isinstance(error, str) or not 0 < len(error) <= 200):
        raise ApiError(400, "invalid_body", "error must be text of 1 to 200 characters")
    needle = error.casefold() if error else None

    def matches(job: Job) -> bool:
        if job.status not in statuses:
            return False
        finished = job.resolved_at or job.created_at
        return ((before is None or finished < before) and (after is None or finished >= after)
                and (needle is None or needle in (job.error or "").casefold()))

    return matches, statuses if before is None and after is None and needle is None else None


async def retry_jobs(request: web.Request) -> web.Response:
    """Retry the failed jobs (all, or those the body's filter picks); 202 with how many."""
    matches, statuses = _bulk_filter(await json_body(request), ("failed",))
    store, settings = request.app[STORE], request.app[SETTINGS]
    _admit(request.app, store, settings)
    headers = _rate_limit(request)
    delay = settings.retry_base_delay

    def room() -> int:
        return settings.max_pending_jobs - store.counts["pending"] - len(store.in_flight)

    def retried(job: Job) -> Job | None:
        return job.retried(time.time() + delay) if room() > 0 else None

    taken, seq = await request.app[BULK].begin(matches, statuses, retried, room)
    return json_response(json.dumps({"taken": taken, "seq": seq}), 202, headers)


async def delete_jobs(request: web.Request) -> web.Response:
    """Delete the finished jobs (all, or those the body's filter picks); 202 with how many."""
    matches, statuses = _bulk_filter(await json_body(request), ("resolved", "failed"))
    taken, seq = await request.app[BULK].begin(
        matches, statuses, lambda job: Tombstone(job.id, "deleted", time.time()))
    return json_response(json.dumps({"taken": taken, "seq": seq}), 202)


async def find_jobs(request: web.Request) -> web.Response:
    """The jobs whose id starts with `id` (the whole id, or the short one a card shows),
    oldest first, at most `limit`: the registry is walked in steps, a job found by its
    whole id is looked up at once."""
    query = request.query
    unknown = set(query) - {"id", "limit"}
    if unknown:
        raise ApiError(400, "invalid_parameter",
                       f"unknown query parameter {sorted(unknown)[0]!r}")
    prefix = query.get("id", "")
    if not 0 < len(prefix) <= MAX_ID_LENGTH:
        raise ApiError(400, "invalid_parameter",
                       f"id must be 1 to {MAX_ID_LENGTH} characters of a job's id")
    limit = _query_limit(query, FIND_LIMIT) or 10
    store = request.app[STORE]
    exact = store.get(prefix)
    found, cursor = [], None
    while True:
        try:
            jobs, cursor = store.walk(cursor, WALK_STEP)
        except KeyError:  # the order was rebuilt: start over
            found, cursor = [], None
            continue
        found += [job for job in jobs if job.id.startswith(prefix) and job.id != prefix]
        if cursor is None or len(found) + (exact is not None) >= limit:
            break
        await asyncio.sleep(0)
    if exact is not None:
        found.insert(0, exact)
    return json_response("[" + ",".join(job.json for job in found[:limit]) + "]",
                         headers={"X-Jobs-Seq": str(store.seq)})


async def job_stats(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return json_response(json.dumps({"total": len(store.jobs), **store.counts,
                                     "seq": store.seq}),
                         headers={"X-Jobs-Seq": str(store.seq)})


async def health(request: web.Request) -> web.Response:
    store, settings, access = request.app[STORE], request.app[SETTINGS], request.app[ACCESS]
    hidden = access.required and access.credential(request)[0] is None
    if not store.ready:  # a Redis-mode node loading its jobs: up, not yet in service
        return json_response(json.dumps({"status": "loading"} if hidden else {
            "status": "loading", "version": __version__, "node": request.app[NODE],
            "storage": "failing" if store.fault else "ok"}), 503, {"Retry-After": "1"})
    if hidden:
        return json_response('{"status": "ok"}')  # up, and nothing more without a token
    return json_response(json.dumps({
        "status": "ok",
        "version": __version__,
        "node": request.app[NODE],
        "jobs": len(store.jobs),
        **store.counts,
        "seq": store.seq,
        "maxPendingJobs": settings.max_pending_jobs,
        "pendingFill": round(store.counts["pending"] / settings.max_pending_jobs, 4),
        "storage": "failing" if store.fault else "ok",
        "images": request.app[IMAGES].describe(),
        "photos": request.app[IMAGES].status(),
    }))


async def session_status(request: web.Request) -> web.Response:
    access = request.app[ACCESS]
    authenticated = not access.required or access.credential(request)[0] is not None
    return json_response(json.dumps({"required": access.required,
                                     "authenticated": authenticated}))


async def open_session(request: web.Request) -> web.Response:
    """Trade a token (JSON {"token"} or a Bearer header) for an HttpOnly, SameSite=Strict
    session cookie, so that the page never keeps the token where scripts can read it."""
    access = request.app[ACCESS]
    body = await json_body(request, '{"token": "<token>"}')
    if not isinstance(body.get("token", ""), str):
        raise ApiError(400, "invalid_body", 'the body must be {"token": "<token>"}')
    if not access.required:
        return json_response('{"required": false}')
    given = bearer(request)
    if given is None:
        given = body.get("token", "").strip()
    if access.guessing(request):
        access.refuse(request, True)
    token = access.match(given) if given else None
    if token is None:
        access.refuse(request, bool(given))
    response = web.Response(status=204)
    response.set_cookie(SESSION_COOKIE, access.cookie(token, time.time()),
                        max_age=SESSION_LIFETIME, path="/", httponly=True, samesite="Strict",
                        secure=access.scheme(request) == "https")
    return response


async def close_session(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict")
    return response


def _since(request: web.Request) -> int | None:
    raw = request.query.get("since")
    if raw is None:
        return None
    if not is_ascii_number(raw) or len(raw) > 18:
        raise ApiError(400, "invalid_parameter", "since must be a whole number (a seq)")
    return int(raw)


def _check_origin(request: web.Request) -> None:
    """Browsers send Origin on a WebSocket handshake and never enforce CORS on one, and
    a long-poll's POST is a "simple request" that they send before any CORS check."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if origin == own_origin(request):
        return
    if request.app[SETTINGS].allows_origin(origin):
        return
    raise ApiError(403, "origin_not_allowed", _refused_origin(request.app, origin))


def _refused_origin(app: web.Application, origin: str) -> str:
    """What to tell a refused origin; the log hears of each one once (of the first 1,000)."""
    message = f"origin {origin[:200]} is not allowed; add it to CORS_ORIGINS"
    refused = app[REFUSED_ORIGINS]
    if origin not in refused and len(refused) < 1000:
        refused.add(origin)
        log.warning("refused a request from origin %r: it is not in CORS_ORIGINS",
                    origin[:200])
    return message


WS_HEARTBEAT = 20.0
WS_MAX_MESSAGE = 64 * 1024


async def events_socket(request: web.Request) -> web.WebSocketResponse:
    since = _since(request)
    _check_origin(request)
    ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT, max_msg_size=WS_MAX_MESSAGE)
    await ws.prepare(request)
    hub = request.app[HUB]
    peer = Peer(NativeFrames)
    peer.token = request.get(TOKEN)
    peer.use_websocket(ws, request.transport)
    hub.attach(peer, since)
    try:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                peer.close(1003, "binary frames are not supported")  # the loop ends on close
    finally:
        hub.detach(peer)
    if peer.closer is not None:
        await peer.closer  # returning first would cut the close handshake short (1006)
    return ws


# Socket.IO's endpoint: Engine.IO's checks in the reference server's order, then the
# handshake, a long-poll, a POST of packets, a WebSocket, or the upgrade of a polling
# session to a WebSocket.

TEXT_TYPE = "text/plain"


def _engineio_refusal(status: int, code: int, message: str, headers=None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status,
                             headers=headers, dumps=_json_value)


def _engineio_text(body: str) -> web.Response:
    return web.Response(text=body, content_type=TEXT_TYPE, charset="UTF-8",
                        headers={"Cache-Control": "no-store"})


async def socketio_endpoint(request: web.Request) -> web.StreamResponse:
    query = request.query
    transport = query.get("transport")
    if transport not in ("polling", "websocket"):
        return _engineio_refusal(400, 0, "Transport unknown")
    engine = request.app[ENGINE]
    session = relayed = None
    if "sid" in query:
        session = engine.session(query["sid"])
        if session is None:
            relayed = engine.relay and engine.relay.owner(query["sid"])
            if not relayed:
                return _engineio_refusal(400, 1, "Session ID unknown")
        elif not session.polling or (transport == "websocket" and session.upgrading):
            return _engineio_refusal(400, 3, "Bad request")  # upgraded, or upgrading
    elif request.method != "GET":
        return _engineio_refusal(400, 2, "Bad handshake method")
    if query.get("EIO") != "4":
        return _engineio_refusal(400, 5, "Unsupported protocol version")
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if transport == "websocket" and (not upgrade or request.method != "GET"):
        return _engineio_refusal(400, 3, "Bad request")
    try:
        _check_origin(request)
    except ApiError as exc:
        return _engineio_refusal(403, 4, exc.message)

    if relayed:  # checked here, where it came in; its owner checks the session
        return await engine.relay.forward(request, relayed, transport)
    if transport == "websocket":
        return await _engineio_websocket(request, engine, session)
    if session is None:
        session = engine.open(True, *_engineio_client(request))
        if session is None:
            return _engineio_refusal(503, 3, "too many polling sessions; try again later",
                                     {"Retry-After": "5"})
        return _engineio_text(session.open_packet())
    if request.method == "GET":
        return await _engineio_poll(session)
    if request.method == "POST":
        return await _engineio_post(request, session)
    return _engineio_refusal(400, 3, "Bad request")


def _engineio_client(request: web.Request) -> tuple[str, str | None]:
    """(the client's address, the token of its Bearer header or cookie, if valid)."""
    access = request.app[ACCESS]
    if not access.required:
        return access.client(request), None
    return access.client(request), access.credential(request, _cookie_counts(request))[0]


async def _engineio_poll(session: EngineIOSession) -> web.Response:
    if session.polled:  # one GET at a time, says the protocol; a second ends the session
        session.close(1002, "overlapping polls")
        return _engineio_refusal(400, 3, "Bad request")
    session.polled = True
    try:
        body = await session.poll()
    finally:
        session.polled = False
        session.polled_at = asyncio.get_running_loop().time()
    if body == "1":  # the close is said: nothing more for that sid
        session.engine.forget(session)
    return _engineio_text(body)


async def _engineio_post(request: web.Request | None, session: EngineIOSession,
                         body: bytes | None = None) -> web.Response:
    """A POST of packets: read from the request, or already read (relayed)."""
    if session.posting:
        session.close(1002, "overlapping posts")
        return _engineio_refusal(400, 3, "Bad request")
    session.posting = True
    try:
        try:
            if body is None:
                body = await read_body(request, EIO_MAX_PAYLOAD)
        except ApiError as exc:
            return engineio_unreadable(session, exc)
        if body.count(b"\x1e") >= EIO_MAX_POST_PACKETS:
            session.close(1002, "too many packets")
            return _engineio_refusal(400, 3, f"more than {EIO_MAX_POST_PACKETS} packets "
                                             "in one payload")
        try:
            packets = body.decode("utf-8").split("\x1e")
        except UnicodeDecodeError:
            packets = [""]
        for packet in packets:
            if session.closing:  # by the client, or refused: what follows is not read
                break
            if not session.receive(packet):
                session.close(1002, "bad packet")
                return _engineio_refusal(400, 3, "Bad request")
        return _engineio_text("ok")
    finally:
        session.posting = False


def engineio_unreadable(session: EngineIOSession, exc: ApiError) -> web.Response:
    """A POST whose body could not be read: its packets are lost, so the session ends and
    the client starts over, recovering."""
    if exc.status == 413:
        session.close(1009, "payload too large")
    else:
        session.close(1002, "unreadable body")
    return _engineio_refusal(exc.status, 3, exc.message)


async def _engineio_websocket(request: web.Request, engine: EngineIO,
                              session: EngineIOSession | None) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=EIO_MAX_PAYLOAD)
    if session is None:
        await ws.prepare(request)
        session = engine.open(False, *_engineio_client(request))
        session.use_websocket(ws, request.transport)
        session.start([session.open_packet()])
    else:
        await ws.prepare(request)
        if not await _engineio_upgrade(ws, session):
            await ws.close()
            return ws
        session.upgrade(ws, request.transport)
    return await engineio_receive(ws, session)


async def engineio_receive(ws: web.WebSocketResponse, session: EngineIOSession
                           ) -> web.WebSocketResponse:
    """The client's packets on its WebSocket, until it closes."""
    try:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                session.close(1003, "binary packets are not supported")  # ends the loop
            elif not session.closing:  # what follows a refused CONNECT is not read
                session.receive(message.data)
    finally:
        session.close(1000, "")
        if session.closer is not None:
            await session.closer  # returning first would cut the close handshake short (1006)
    return ws


async def _engineio_upgrade(ws: web.WebSocketResponse, session: EngineIOSession) -> bool:
    """The probe, then `5`: True once the session is upgraded."""
    session.upgrading = True

    def probed() -> None:
        session.probed = True
        session.wakeup.set()  # a poll waiting now is answered with a noop

    try:
        return await engineio_probe(ws, probed) and not session.closing
    finally:
        if session.polling:
            session.upgrading = session.probed = False


async def engineio_probe(ws: web.WebSocketResponse, probed) -> bool:
    """`2probe` → `3probe` (then probed() is called), then `5`: True if the client upgrades."""
    try:
        async with asyncio.timeout(EIO_UPGRADE_TIMEOUT):
            probe = await ws.receive()
            if probe.type != aiohttp.WSMsgType.TEXT or probe.data != "2probe":
                return False
            await ws.send_str("3probe")
            probed()
            while True:
                message = await ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    return False
                if message.data == "5":
                    return True
                if message.data != "6":
                    return False
    except (TimeoutError, ConnectionError, RuntimeError):
        return False


INDEX_FILE = STATIC_DIR / "index.html"
OPENAPI_FILE = STATIC_DIR / "openapi.json"


async def index(request: web.Request) -> web.Response:
    return web.Response(text=request.app[INDEX_HTML], content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.FileResponse:
    """A file under static/, or a JSON 404: never a path outside it, never a directory."""
    try:
        path = await asyncio.to_thread((STATIC_DIR / request.match_info["path"]).resolve)
        found = path.is_relative_to(STATIC_DIR) and await asyncio.to_thread(path.is_file)
    except (OSError, ValueError):  # a NUL byte, a name too long, a loop of links
        found = False
    if not found:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


async def openapi(request: web.Request) -> web.Response:
    return web.FileResponse(OPENAPI_FILE, headers={"Content-Type": JSON_TYPE})


def content_security_policy(settings: Settings) -> str:
    images = " ".join(dict.fromkeys(
        ["'self'", "https://images.unsplash.com", "https://plus.unsplash.com",
         settings.unsplash_origin]))
    return (f"default-src 'self'; img-src {images}; connect-src 'self'; style-src 'self'; "
            "script-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def image_origins(settings: Settings) -> str:
    return " ".join(dict.fromkeys(
        ["https://images.unsplash.com", "https://plus.unsplash.com", settings.unsplash_origin]))


EXPOSED_HEADERS = "Location, Link, X-Jobs-Seq, Retry-After"

# DNS rebinding: a page at http://evil.example:3000 whose name the attacker then points
# at 127.0.0.1 is, to the browser, the same origin as its requests to this service, so
# every Origin check passes (Origin and Host both say evil.example). Only the Host tells,
# and a name this service is not known by gets 421. An IP address cannot be rebound (a
# page at http://10.0.0.5:3000 came from whatever listens there), nor can localhost
# (browsers resolve it themselves): those are always answered. Other names must be
# listed: ALLOWED_HOSTS, the names in CORS_ORIGINS, a listening address that is a name.
# Any port: the name is what an attacker controls, and a proxy in front may add its own.
# A Host once allowed is remembered (up to HOST_MEMORY), so the hot path is one set
# lookup of the raw header.

HOST_MEMORY = 1024


class HostCheck:
    def __init__(self, settings: Settings):
        self.any = "*" in settings.allowed_hosts
        names = {"localhost", *settings.allowed_hosts}
        names.update(urlsplit(origin).hostname for origin in settings.cors_origins
                     if origin != "*")
        if _ip(settings.host) is None:
            names.add(settings.host.lower())
        self.names = frozenset(names)
        # None: no Host header at all (HTTP/1.0), which no browser sends.
        self.known: set[str | None] = {None}
        self.refused: set[str] = set()

    def allows(self, host: str) -> bool:
        """A Host not seen before: its name (any port) is an IP address or a known name."""
        if host.startswith("["):
            end = host.find("]")
            name, port = host[1:end], host[end + 1:]
            allowed = end > 0 and (self.any or isinstance(_ip(name), ipaddress.IPv6Address))
        else:
            name, colon, port = host.partition(":")
            port = colon + port
            name = name.lower()
            allowed = self.any or name in self.names or _ip(name) is not None
        allowed = allowed and (not port or (port[0] == ":" and is_ascii_number(port[1:])))
        if allowed and len(self.known) < HOST_MEMORY:
            self.known.add(host)
        return allowed

    def refusal(self, host: str) -> str:
        """What to tell a refused Host; the log hears of each one once (of the first 1,000)."""
        if host not in self.refused and len(self.refused) < 1000:
            self.refused.add(host)
            log.warning("refused a request for Host %r: not a name this service answers "
                        "to; if clients reach it by that name, add it to ALLOWED_HOSTS",
                        host[:200])
        return (f"this service does not answer to the host {host[:200]!r}; its operator can "
                "add the name to ALLOWED_HOSTS")

    def describe(self) -> str:
        if self.any:
            return "any name (ALLOWED_HOSTS=*)"
        return ", ".join(["IP addresses", *sorted(self.names)])


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


async def guard(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    app, method, sent = request.app, request.method, request.headers
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else UNROUTED
    origin = sent.get("Origin")
    host, hosts = sent.get("Host"), app[HOSTS]
    if host not in hosts.known and not hosts.allows(host):
        response = error_response(421, "misdirected_request", hosts.refusal(host))
    elif method == "OPTIONS" and "Access-Control-Request-Method" in sent:
        if origin is None or not app[SETTINGS].allows_origin(origin):
            response = error_response(403, "origin_not_allowed",
                                      _refused_origin(app, origin or "(none)"))
        else:
            response = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": sent.get(
                    "Access-Control-Request-Headers", "Content-Type"),
                "Access-Control-Max-Age": "600",
            })
    else:
        try:
            _check_access(request, app, origin, route)
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers, message = None, exc.reason
            if exc.status == 404:
                message = f"nothing at {request.path}"
            elif exc.status == 405:
                headers = {"Allow": exc.headers["Allow"]}
                message = f"{method} is not allowed here; use {exc.headers['Allow']}"
            elif exc.status == 413:
                message = f"the body is over {MAX_BODY} bytes"
            response = error_response(exc.status, HTTP_ERROR_CODES.get(exc.status, "error"),
                                      message, headers)
        except ConnectionError:
            # The client went away mid-response (a WebSocket handshake cut by the
            # network, say): routine on bad networks, and nobody is left to answer.
            response = web.Response(status=400)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s failed", method, request.path)
            response = error_response(500, "internal_error", "the server failed; see its log")
    if not response.prepared:
        add_headers(request, response)
    # Labelled by route template and a known method, never by raw path: bounded sets.
    app[METRICS].http(route if route != UNROUTED else "unmatched",
                      method if method in HTTP_METHODS else "OTHER", response.status,
                      time.perf_counter() - started)
    return response


def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CORS and the security headers, on a response not yet sent (the guard does it for
    every response, a handler that streams does it before it starts)."""
    headers, origin = response.headers, request.headers.get("Origin")
    if origin is not None and (settings := request.app[SETTINGS]).allows_origin(origin):
        if origin in settings.cors_origins:  # listed by name: credentials may come
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Allow-Credentials"] = "true"
        else:
            headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        headers.add("Vary", "Origin")
    if "Content-Security-Policy" not in headers:  # else made from CREATED_HEADERS
        headers.update(request.app[SECURITY_HEADERS])


HTTP_METHODS = frozenset(("GET", "POST", "DELETE", "OPTIONS", "HEAD", "PUT", "PATCH"))
# Open without a token: the page and its files (it asks for the token itself), the API
# document, /healthz (which then says only "ok"), the session door, and Socket.IO, whose
# clients pass the token in their CONNECT packet.
PUBLIC_ROUTES = frozenset(("/", "/static/{path}", "/openapi.json", "/healthz", "/session",
                           "/socket.io/", "/socket.io"))
ENGINEIO_ROUTES = frozenset(("/socket.io/", "/socket.io"))
# A typed key where aiohttp has them (3.14 warns of a plain one); before, the string is it.
TOKEN = web.RequestKey("token", str) if hasattr(web, "RequestKey") else "token"


def _check_access(request: web.Request, app: web.Application, origin: str | None,
                  route: str) -> None:
    """The token, where one is needed; and for a change, an Origin that may make it."""
    access = app[ACCESS]
    by_cookie = False
    if access.required and route != UNROUTED and route not in PUBLIC_ROUTES:
        token, by_cookie, presented = access.credential(
            request, route != "/ws" or _cookie_counts(request))
        if presented and access.guessing(request):
            access.refuse(request, presented)
        if token is None:
            access.refuse(request, presented)
        request[TOKEN] = token
    if route in ENGINEIO_ROUTES:
        return  # Engine.IO checks its own, and answers in its own error format
    if request.method in MUTATING and origin is not None:
        # A form or fetch from another site is sent by the browser before any CORS
        # check (only its answer is hidden): refuse it before anything changes.
        own = origin == own_origin(request)
        if not own and not app[SETTINGS].allows_origin(origin):
            raise ApiError(403, "origin_not_allowed", _refused_origin(app, origin))
        if by_cookie and not own:
            raise ApiError(403, "origin_not_allowed",
                           "a session cookie works only from the service's own page")
    elif request.method in MUTATING and by_cookie:
        raise ApiError(403, "origin_not_allowed",
                       "a change with a session cookie needs the page's Origin header")


def _cookie_counts(request: web.Request) -> bool:
    """Whether the session cookie may stand for a token on a WebSocket or an Engine.IO
    session: from the page's own origin, or one listed by name in CORS_ORIGINS. A browser
    enforces no CORS on a WebSocket, so an origin let in by `*` (which means without
    credentials) would otherwise read the events with the cookie of whoever visits it."""
    origin = request.headers.get("Origin")
    return (origin is None or (origin != "*" and origin in request.app[SETTINGS].cors_origins)
            or origin == own_origin(request))


def own_origin(request: web.Request) -> str:
    return f"{request.app[ACCESS].scheme(request)}://{request.host}"


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus's text format; gauges of current state are read now."""
    app, metrics = request.app, request.app[METRICS]
    store = app[STORE]
    for status, count in store.counts.items():
        metrics.jobs.labels(status).set(count)
    photos = app[IMAGES].status()
    metrics.photo_pool.set(photos.get("pool", 0))
    metrics.quota_limit.set(photos.get("limit") or 0)
    metrics.quota_remaining.set(photos.get("remaining") or 0)
    native = sum(peer.frames is NativeFrames for peer in app[HUB].peers)
    polling = app[ENGINE].polling_count
    metrics.peers.labels("websocket").set(native)
    metrics.peers.labels("socketio_websocket").set(len(app[ENGINE].sessions) - polling)
    metrics.peers.labels("socketio_polling").set(polling)
    metrics.storage_ok.set(0 if store.fault else 1)
    return web.Response(body=generate_latest(metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- Application factory ------------------------------------------------------------
# create_app() wires the pieces; its lifecycle loads the store before the first
# request is served (a Redis-mode store finishes loading while /healthz answers) and,
# on shutdown, closes sockets, then finishes writing.

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", JobStore)
IMAGES = web.AppKey("images", object)
SCHEDULER = web.AppKey("scheduler", object)
HUB = web.AppKey("hub", EventHub)
METRICS = web.AppKey("metrics", Metrics)
ACCESS = web.AppKey("access", Access)
ENGINE = web.AppKey("engine", EngineIO)
SECURITY_HEADERS = web.AppKey("security_headers", dict)
CREATED_HEADERS = web.AppKey("created_headers", CIMultiDict)
INDEX_HTML = web.AppKey("index_html", str)
NODE = web.AppKey("node", str)
REFUSED_ORIGINS = web.AppKey("refused_origins", set)
HOSTS = web.AppKey("hosts", HostCheck)
BULK = web.AppKey("bulk", BulkChange)


# A Redis-mode node serves while it loads its jobs (at start, and again if it falls
# behind the event stream): /healthz says "loading", and the routes that read or change
# jobs answer 503 until the registry is whole. A layer of its own, in that mode only,
# so that the file mode's requests pay nothing for it.


async def until_loaded(request: web.Request, handler) -> web.StreamResponse:
    if not request.app[STORE].ready:
        raise ApiError(503, "loading", "this node is still loading the jobs; try again in "
                       "a moment", {"Retry-After": "1"})
    return await handler(request)


NEEDS_REGISTRY = frozenset((create_job, list_jobs, job_stats, get_job, delete_job, retry_job,
                            retry_jobs, delete_jobs, find_jobs, events_socket,
                            socketio_endpoint))


# Every route is served through the guard, which add_route() wraps around its handler,
# rather than as an aiohttp middleware: with any middleware at all, aiohttp adds a layer
# of its own and looks the chain up for each request, 16,500 instructions of a POST's
# 414,000. A route added otherwise stops start-up. The last route takes what no other
# does, and answers as aiohttp's router would: 405 with Allow where a route has the
# path for other methods, else 404.

UNROUTED = "/{unrouted}"  # the canonical path of that last route
# /jobs/{id}, but not /jobs/stats and the others: no job takes their names
JOB_PATH = "/jobs/{id:(?!(?:stats|find|retry|delete)$)[^{}/]+}"


def add_route(app: web.Application, method: str, path: str, handler) -> None:
    if app[SETTINGS].redis and handler in NEEDS_REGISTRY:
        handler = functools.partial(until_loaded, handler=handler)
    guarded = functools.partial(guard, handler=handler)
    if method == "GET":
        app.router.add_get(path, guarded)  # and HEAD
    else:
        app.router.add_route(method, path, guarded)


async def unrouted(request: web.Request) -> web.Response:
    allowed: set[str] = set()
    for candidate in request.app.router.resources():
        if candidate.canonical != UNROUTED:
            allowed |= (await candidate.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


async def _every_route_guarded(app: web.Application) -> None:
    for route in app.router.routes():
        handler = route.handler
        if not (isinstance(handler, functools.partial) and handler.func is guard):
            raise RuntimeError(f"{route.method} {route.resource.canonical} is served without "
                               "the guard (no token, CORS or error checks): add it with "
                               "add_route() in create_app")


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[SECURITY_HEADERS] = {  # the same for every response: made once
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": content_security_policy(settings),
        "Referrer-Policy": "strict-origin-when-cross-origin"}
    # A 201's headers but its Location, copied for each: an update of a new one costs more.
    app[CREATED_HEADERS] = CIMultiDict({"Content-Type": JSON_CONTENT_TYPE,
                                        **app[SECURITY_HEADERS]})
    app[REFUSED_ORIGINS] = set()
    app[HOSTS] = HostCheck(settings)
    # Unique per process, across machines and restarts: which node answered, in a cluster.
    app[NODE] = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    app[METRICS] = Metrics()
    app[ACCESS] = Access(settings)
    app[INDEX_HTML] = INDEX_FILE.read_text("utf-8").replace(
        "__IMAGE_ORIGINS__", image_origins(settings))
    for method, path, handler in [
            ("GET", "/", index),
            ("POST", "/jobs", create_job),
            ("GET", "/jobs", list_jobs),
            ("GET", "/jobs/stats", job_stats),
            ("GET", "/jobs/find", find_jobs),
            ("POST", "/jobs/retry", retry_jobs),
            ("POST", "/jobs/delete", delete_jobs),
            ("GET", JOB_PATH, get_job),
            ("DELETE", JOB_PATH, delete_job),
            ("POST", "/jobs/{id}/retry", retry_job),
            ("GET", "/healthz", health),
            ("GET", "/session", session_status),
            ("POST", "/session", open_session),
            ("DELETE", "/session", close_session),
            ("GET", "/metrics", metrics_endpoint),
            ("GET", "/openapi.json", openapi),
            ("GET", "/ws", events_socket),
            ("*", "/socket.io/", socketio_endpoint),
            ("*", "/socket.io", socketio_endpoint),
            ("GET", "/static/{path:.+}", static_file),
            ("*", "/{unrouted:.*}", unrouted)]:  # last
        add_route(app, method, path, handler)
    app.on_startup.append(_every_route_guarded)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_sockets)
    return app


def storage(settings: Settings, metrics: Metrics, node: str, session: aiohttp.ClientSession):
    """(store, image source, scheduler class): in memory and jobs.json, or in Redis,
    shared by every process pointed at it. The rest of the service cannot tell which."""
    unsplash = bool(settings.unsplash_access_key)
    if not settings.redis:
        images = UnsplashImages(session, settings, metrics) if unsplash else CatalogImages()
        return (JobStore(settings.jobs_file, settings.events_replay_window, metrics),
                images, Scheduler)
    cluster = redis_mode()
    store = cluster.RedisJobStore(settings, metrics, node)
    images = cluster.SharedPhotoPool(session, settings, metrics, store) if unsplash \
        else CatalogImages()
    return store, images, cluster.RedisScheduler


def redis_mode():
    """The Redis mode's module, which needs redis-py, an optional extra."""
    try:
        import jobservice_redis
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "redis":
            raise
        raise ConfigError("REDIS_URL needs redis-py, which is not installed: "
                          "pip install 'jobservice[redis]'") from None
    return jobservice_redis


async def _lifecycle(app: web.Application):
    settings = app[SETTINGS]
    metrics = app[METRICS]
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.unsplash_timeout),
        headers={"User-Agent": f"jobservice/{__version__}"})
    try:
        store, images, scheduler_class = storage(settings, metrics, app[NODE], session)
        store.authored.append(metrics.on_commit)
        replayed = await store.load()
    except BaseException:
        await session.close()
        raise
    app[STORE], app[IMAGES] = store, images
    app[HUB] = hub = EventHub(store, settings)
    app[ENGINE] = EngineIO(hub, app[ACCESS])
    app[SCHEDULER] = scheduler = scheduler_class(store, images, settings)
    app[BULK] = bulk = BulkChange(store)
    relay = redis_mode().Relay(app) if settings.redis else None  # before any session
    await store.open(replayed)
    scheduler.start()
    try:
        if relay is not None:
            await relay.start()
        yield
    finally:
        await bulk.stop()
        if relay is not None:
            await relay.close()
        await scheduler.stop()
        await store.close()
        await session.close()


async def _close_sockets(app: web.Application) -> None:
    await app[ENGINE].close_all(1001, "server shutting down")
    await app[HUB].close_all(1001, "server shutting down")
    if app[ENGINE].relay is not None:
        await app[ENGINE].relay.close()


# --- Command line -------------------------------------------------------------------
# `jobservice` / `python jobservice.py`: settings, one start-up line, serve until
# SIGINT or SIGTERM, then stop accepting, close sockets (1001), finish writing, exit 0.

# The log is bounded: of each kind of line (its logger, level and message template), the
# first in LOG_INTERVAL is written and the rest are counted, and the count is written in
# one line when the interval is over. A malformed request that aiohttp refused is the
# client's fault: one line, never a traceback (aiohttp writes a dozen lines for each).
# A flood of bad requests or connections costs a few lines a kind, not the disk.

LOG_INTERVAL = 10.0
LOG_KINDS_MAX = 1000
CLIENT_FAULTS = (aiohttp.http.HttpProcessingError, web.RequestPayloadError, ConnectionError)


class BoundedLog(logging.StreamHandler):
    def __init__(self, stream=None, interval: float = LOG_INTERVAL):
        super().__init__(stream)
        self.interval = interval
        self.kinds: dict[tuple, list] = {}  # kind -> [interval ends, lines left out, sample]

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        if record.exc_info and record.name.startswith("aiohttp") \
                and isinstance(record.exc_info[1], CLIENT_FAULTS):
            record = _client_fault(record)
        # A message made whole before logging (asyncio's) is told by its first line.
        kind = (record.name, record.levelno, str(record.msg).partition("\n")[0])
        now = time.monotonic()
        held = self.kinds.get(kind)
        if held is not None and now < held[0]:
            held[1] += 1
            if held[1] == 1:
                timer = threading.Timer(held[0] - now, self._report, (kind,))
                timer.daemon = True
                timer.start()
            return
        if len(self.kinds) >= LOG_KINDS_MAX:
            self.kinds = {key: value for key, value in self.kinds.items()
                          if value[0] > now or value[1]}
        self.kinds[kind] = [now + self.interval, 0, record.getMessage().partition("\n")[0]]
        super().emit(record)

    def _report(self, kind: tuple) -> None:
        with self.lock:
            held = self.kinds.pop(kind, None)
            if held is None or not held[1]:
                return
            summary = logging.LogRecord(
                kind[0], kind[1], "", 0, "%d more like this in the last %s, left out: %s",
                (held[1], describe_duration(self.interval), held[2][:300]), None)
            super().emit(summary)

    def close(self) -> None:
        for kind in list(self.kinds):  # at exit: what the timers have not told yet
            self._report(kind)
        super().close()


def _client_fault(record: logging.LogRecord) -> logging.LogRecord:
    """aiohttp's record of a request it refused, as one line without the traceback."""
    exc = record.exc_info[1]
    reason = (getattr(exc, "message", "") or str(exc)).strip().partition("\n")[0]
    reason = "".join(char if char.isprintable() else "?" for char in reason[:200])
    fault = logging.makeLogRecord(record.__dict__)
    fault.levelno, fault.levelname = logging.WARNING, "WARNING"
    fault.msg, fault.args = "a client's request was refused: %s (%s)", (
        reason or type(exc).__name__, record.getMessage())
    fault.exc_info = fault.exc_text = None
    return fault


# Connections are accepted here, not by asyncio's server, so that one past MAX_CONNECTIONS
# is closed as soon as it is accepted: a flood never takes the descriptors that the
# journal, a snapshot, Redis and Unsplash need, and established clients never notice it.
# asyncio's own loop accepts a hundred sockets at a time before any is looked at, and
# once the descriptors run out it logs a traceback for each accept that fails (and keeps
# trying, hundreds a second). admit() is where a new connection is judged: against
# MAX_CONNECTIONS, and against MAX_CONNECTIONS_PER_ADDRESS for its peer's address (a
# trusted proxy's is exempt, every client behind it shares that address).
#
# aiohttp has no read timeout: a connection that never finishes its headers, or its
# body, is served for ever. So once a second the gate looks at every connection (no
# timer or task per request, which POST /jobs would pay for): a request whose headers
# are not whole HEADER_TIMEOUT after the connection was made, or after the first byte of
# them, or whose body is not whole BODY_TIMEOUT after its headers, is closed. An idle
# connection between two requests is aiohttp's to close (keepalive_timeout, from
# KEEPALIVE_TIMEOUT); a request being handled (a WebSocket, a long-poll) is never idle.

ACCEPT_BACKLOG = 128
ACCEPT_BATCH = 64  # accepts per wake-up, so that a flood does not hold the loop
ACCEPT_PAUSE = 1.0  # after an accept failed for want of descriptors or memory
SWEEP_INTERVAL = 1.0  # how often the gate looks for requests that are late


class ConnectionGate:
    def __init__(self, protocol_factory, settings: Settings, metrics: Metrics):
        self.protocol_factory = protocol_factory  # aiohttp's: a handler per connection
        self.settings = settings
        self.metrics = metrics
        self.open = 0
        self.by_address: dict[str, int] = {}  # connections open, by peer address
        self.connections: set[Connection] = set()
        self.sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listen on each address the host names ("" names them all), as create_server."""
        loop = self._loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        try:
            for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
                listener = socket.create_server(address, family=family, backlog=ACCEPT_BACKLOG,
                                                reuse_port=reuse_port)
                self.sockets.append(listener)
                listener.setblocking(False)
        except BaseException:
            self.close()
            raise
        for listener in self.sockets:
            loop.add_reader(listener.fileno(), self._accept, listener)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def admit(self, address: str) -> str | None:
        """Why a new connection is refused (the reason it is counted under), or None."""
        if self.open >= self.settings.max_connections:
            return "max_connections"
        if self.by_address.get(address, 0) >= self.settings.max_connections_per_address \
                and not self.settings.trusts_proxy(address):
            return "max_connections_per_address"
        return None

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, (address, *_) = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors (or memory): wait, rather than spin
                log.error("cannot accept connections: %s; trying again in %g s",
                          exc.strerror, ACCEPT_PAUSE)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_PAUSE, self._resume, listener)
                return
            refusal = self.admit(address)
            if refusal is not None:
                conn.close()
                self.metrics.connections_refused.labels(refusal).inc()
                if refusal == "max_connections":
                    log.warning("closed connections at once: %d are open, the most this "
                                "service keeps (MAX_CONNECTIONS)", self.open)
                else:
                    log.warning("closed connections from %s at once: it has %d open, the "
                                "most one address may keep (MAX_CONNECTIONS_PER_ADDRESS)",
                                address, self.by_address[address])
                continue
            self.open += 1
            self.by_address[address] = self.by_address.get(address, 0) + 1
            self._loop.create_task(self._serve(conn, address))

    def _resume(self, listener: socket.socket) -> None:
        if listener in self.sockets:  # not closed meanwhile
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def _serve(self, conn: socket.socket, address: str) -> None:
        connection = Connection(self, address)
        try:
            await self._loop.connect_accepted_socket(lambda: connection, conn)
        except OSError:  # gone before it was served
            connection.leave()
            conn.close()

    def _sweep(self) -> None:
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
        now = self._loop.time()
        for connection in list(self.connections):
            late = connection.late(now)
            if late is not None:
                self.metrics.connections_timed_out.labels(late).inc()
                connection.handler.force_close()

    def close(self) -> None:
        """Stop listening; the connections open stay, for the server to close."""
        for listener in self.sockets:
            if self._loop is not None:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self.sockets = []
        if self._sweeper is not None:
            self._sweeper.cancel()


# aiohttp keeps no public account of where a connection is within its request, and has
# no read timeout to set: these are the only reads of its handler's private fields. The
# test test_aiohttp_handler_field names each one, so that an aiohttp release that moves
# one fails by name (pyproject caps aiohttp below the first minor not yet tested).
AIOHTTP_HANDLER_FIELDS = ("_request_count", "_request_in_progress", "_current_request",
                          "_waiter")


def handler_state(handler) -> tuple[int, web.BaseRequest | None, bool]:
    """Where aiohttp's handler of one connection is: (how many requests' headers have come
    whole on it, the request being handled if any, whether it waits for the next request's
    headers, which is also its state between two requests)."""
    if handler._request_in_progress:  # None once the handler returned: its response goes
        return handler._request_count, handler._current_request, False
    return handler._request_count, None, handler._waiter is not None


class Connection(asyncio.Protocol):
    """An admitted connection: aiohttp's handler for it, counted out of the gate at its end,
    and how long the request it is on has taken (looked at by the gate's sweep).

    Each of the transport's calls is a method here that hands it on. A loop may look a
    protocol's methods up once, when the protocol is set (uvloop does, for data_received),
    so nothing here is swapped on the instance later."""

    def __init__(self, gate: ConnectionGate, address: str):
        self.gate = gate
        self.address = address
        self.handler = None
        self.counted = True
        self.requests = 0  # whose headers were whole, when the sweep last looked
        self.awaited = 0  # the request the sweep last saw awaited (its headers not whole)
        self.since: float | None = None  # the current part of the request began

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.handler = self.gate.protocol_factory()
        self.since = self.gate._loop.time()
        self.gate.connections.add(self)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.since is None:  # idle until now: the headers' time begins with this byte
            self.since = self.gate._loop.time()
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def late(self, now: float) -> str | None:
        """The part of the request that is late ("headers" or "body"), or None."""
        settings = self.gate.settings
        requests, request, waiting = handler_state(self.handler)
        if requests != self.requests:  # headers came: the body's time begins
            self.requests, self.since = requests, now
        if request is not None:
            if not request.content.is_eof() and now - self.since >= settings.body_timeout:
                return "body"
        elif waiting:  # between requests, or within one's headers
            if self.awaited != self.requests:
                # Idle so far (aiohttp's keep-alive timeout applies): the headers' time
                # begins with their first byte, which data_received notes from now on.
                # Bytes that came before this look (with the previous request, say) go
                # unseen until the next: such a connection costs what an idle one does,
                # and is closed as one.
                self.awaited, self.since = self.requests, None
            elif self.since is not None and now - self.since >= settings.header_timeout:
                return "headers"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.leave()
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def leave(self) -> None:
        if self.counted:
            self.counted = False
            self.gate.open -= 1
            self.gate.connections.discard(self)
            left = self.gate.by_address[self.address] - 1
            if left:
                self.gate.by_address[self.address] = left
            else:
                del self.gate.by_address[self.address]


def raise_open_files_limit() -> None:
    """Let the process open as many descriptors as it may: the soft RLIMIT_NOFILE up to
    the hard one (a soft 1,024 is common, and a few hundred clients would take it all)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # more than the system takes (macOS): keep the limit there is


# The event loop (--loop, LOOP), by uvicorn's convention. auto serves on the host's loop if
# it set an event loop policy (a launcher's uvloop.install(), say), else on uvloop when it
# is installed (the uvloop extra), else on asyncio's own. Nothing here relies on more than
# what every conforming asyncio loop does; uvloop is the fast path. Workers run on the
# loop their supervisor runs on.

EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def host_loop_policy() -> bool:
    """Whether the host set an event loop policy of its own. Python 3.14 deprecates
    policies and 3.16 drops them, and with them the host's way to choose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return type(asyncio.get_event_loop_policy()) is not asyncio.DefaultEventLoopPolicy
        except AttributeError:
            return False


def event_loop(choice: str):
    """(the factory of the loop to serve on, None for the host's; why that one, for the
    start-up line). A uvloop asked for and not installed is a ConfigError."""
    if choice == "auto" and host_loop_policy():
        return None, "the host's event loop policy"
    if choice != "asyncio":
        try:
            import uvloop
        except ModuleNotFoundError as exc:
            if exc.name != "uvloop":
                raise
            if choice == "uvloop":
                raise ConfigError("--loop uvloop (LOOP=uvloop) needs uvloop, which is not "
                                  "installed: pip install 'jobservice[uvloop]'") from None
        else:
            return uvloop.new_event_loop, f"--loop {choice}"
    return asyncio.SelectorEventLoop, f"--loop {choice}"


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """uvloop, asyncio, or the module and class of another loop."""
    kind = type(loop)
    package = kind.__module__.partition(".")[0]
    return package if package in EVENT_LOOPS else f"{kind.__module__}.{kind.__qualname__}"


def describe_loop(loop: asyncio.AbstractEventLoop) -> str:
    kind = loop_kind(loop)
    version = getattr(sys.modules.get(kind), "__version__", None)
    return f"{kind} {version}" if version else kind


async def serve(settings: Settings, loop_chosen_by: str = "") -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0,
                           keepalive_timeout=settings.keepalive_timeout, **SERVER_OPTIONS)
    await runner.setup()
    gate = ConnectionGate(runner.server, settings, app[METRICS])
    app[METRICS].connections.set_function(lambda: gate.open)
    try:
        await gate.listen(settings.host, settings.port, reuse_port=bool(settings.supervisor))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if settings.supervisor:  # a worker outlives no supervisor, even a killed one
            orphan_watch = asyncio.create_task(_stop_when_orphaned(settings.supervisor, stop))
        access = app[ACCESS]
        def rotate() -> None:  # SIGHUP: read API_TOKENS_FILE again, drop revoked peers
            access.reload()
            app[HUB].revoke(access.tokens)
            app[ENGINE].revoke(access.tokens)  # and sessions still waiting to CONNECT

        loop.add_signal_handler(signal.SIGHUP, rotate)
        host, port = gate.sockets[0].getsockname()[:2]
        store, images = app[STORE], app[IMAGES]
        if not store.ready:  # a Redis-mode node: /healthz answers "loading" meanwhile
            log.info("loading the jobs from %s; until then http://%s:%d answers 503 "
                     "\"loading\"", store.describe(), host if ":" not in host else f"[{host}]",
                     port)
            loading = asyncio.ensure_future(store.until_ready())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
            loading.cancel()
            stopping.cancel()
        if not access.required and not ipaddress.ip_address(
                socket_host(host)).is_loopback:
            log.warning("listening on %s with no API_TOKEN: anyone who can reach this port "
                        "can create and delete jobs", settings.host)
        elif access.required:
            log.info("every door needs one of %d access tokens (API_TOKEN%s)",
                     len(access.tokens), "S_FILE" if settings.api_tokens_file else "")
        hosts = app[HOSTS]
        if hosts.any:
            log.warning("ALLOWED_HOSTS=*: requests are answered whatever name they were sent "
                        "to, so a web page whose name is pointed at this machine (DNS "
                        "rebinding) can use the service from any browser that reaches it")
        else:
            log.info("answering requests sent to %s; a request for another name gets 421: "
                     "list the names clients use in ALLOWED_HOSTS", hosts.describe())
        if isinstance(images, CatalogImages):
            log.warning("no UNSPLASH_ACCESS_KEY: photos come from the built-in catalog; set "
                        "UNSPLASH_ACCESS_KEY to an Unsplash access key for fresh random photos")
        note_stored_jobs_cost(settings)
        if store.carried_over:
            retention = settings.job_retention
            log.info("the %d finished jobs carried over are kept %s (JOB_RETENTION)",
                     store.carried_over,
                     f"{describe_duration(retention)} from now" if retention else "forever")
        log.info(
            "jobservice %s listening on http://%s:%d; event loop %s%s; %d jobs (%d pending) "
            "in %s; delays %g-%g s step %g; retries %g-%g s, %d attempts; CORS %s; images: %s; "
            "finished jobs are kept %s (JOB_RETENTION); deletions are replayed for %s "
            "(EVENTS_REPLAY_WINDOW); at most %d jobs pending (MAX_PENDING_JOBS); %s "
            "(MAX_STORED_JOBS); at most %d connections (MAX_CONNECTIONS) of %d open "
            "files (RLIMIT_NOFILE), %d from one address (MAX_CONNECTIONS_PER_ADDRESS); "
            "Socket.IO pings every %g s (PING_INTERVAL) and waits %g s for the pong "
            "(PING_TIMEOUT)",
            __version__, host if ":" not in host else f"[{host}]", port, describe_loop(loop),
            f" ({loop_chosen_by})" if loop_chosen_by else "", len(store.jobs),
            store.counts["pending"], store.describe(), settings.job_delay_min,
            settings.job_delay_max, settings.job_delay_step, settings.retry_base_delay,
            settings.retry_max_delay, settings.job_max_attempts,
            ", ".join(settings.cors_origins) or "same origin only", images.describe(),
            describe_duration(settings.job_retention) if settings.job_retention
            else "forever", describe_duration(settings.events_replay_window),
            settings.max_pending_jobs, f"at most {settings.max_stored_jobs} stored"
            if settings.max_stored_jobs else "no limit on jobs stored",
            settings.max_connections, open_files_limit(), settings.max_connections_per_address,
            settings.ping_interval, settings.ping_timeout)
        await stop.wait()
        log.info("shutting down")
        if settings.supervisor:
            await orphan_watch
    finally:
        gate.close()
        await runner.cleanup()


async def _stop_when_orphaned(supervisor: int, stop: asyncio.Event) -> None:
    # The pid comes from the supervisor: one read here at start could already be init's,
    # were the supervisor killed while this worker was starting.
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            if os.getppid() != supervisor:
                log.warning("the supervisor is gone; stopping")
                stop.set()


# `--workers N`: one supervisor, N worker processes on one port (SO_REUSEPORT, so the
# kernel spreads connections over them), sharing jobs through Redis. A worker that dies
# is started again (with a growing pause if it keeps dying at once); SIGTERM or SIGINT
# stops them all gracefully; SIGHUP is passed on (token rotation). The workers relay
# Socket.IO requests to each other by Unix sockets in a directory only this user can
# open (mode 0700), made for this run and removed after it.

WORKER_STOP_TIMEOUT = 30.0


def supervise(settings: Settings, loop_factory, loop_chosen_by: str) -> int:
    base = os.environ.get("XDG_RUNTIME_DIR")
    runtime = tempfile.mkdtemp(prefix="jobservice-",
                               dir=base if base and os.path.isdir(base) else None)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_supervise(settings, Path(__file__).resolve(), runtime,
                                         loop_chosen_by))
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def _supervise(settings: Settings, program: Path, runtime: str,
                     loop_chosen_by: str) -> int:
    # Held (bound, never listening) for as long as the workers run: port 0 becomes one
    # port for all of them, and nobody else can take it between restarts.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    if settings.port:  # taken by anyone, even another supervisor: refused, not shared
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((settings.host, settings.port))
    port = holder.getsockname()[1]
    loop = asyncio.get_running_loop()
    kind = loop_kind(loop)
    command = [sys.executable, str(program), "--worker", str(os.getpid()), "--runtime-dir",
               runtime, "--host", settings.host, "--port", str(port), "--data",
               str(settings.jobs_file), "--loop", kind if kind in EVENT_LOOPS else settings.loop]
    env = {**os.environ, "REDIS_URL": settings.redis_url}  # not in argv, where ps shows it
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    workers: dict[int, asyncio.subprocess.Process] = {}

    def pass_on(signum: int) -> None:
        for process in workers.values():
            if process.returncode is None:
                process.send_signal(signum)

    loop.add_signal_handler(signal.SIGHUP, pass_on, signal.SIGHUP)

    async def keep_running(number: int) -> None:
        quick_exits = 0
        while not stop.is_set():
            started = loop.time()
            process = workers[number] = await asyncio.create_subprocess_exec(*command, env=env)
            exited = asyncio.ensure_future(process.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                if process.returncode is None:
                    process.terminate()
                    try:
                        await asyncio.wait_for(exited, WORKER_STOP_TIMEOUT)
                    except TimeoutError:
                        process.kill()
                        await exited
                return
            quick_exits = quick_exits + 1 if loop.time() - started < 5 else 0
            pause = min(30.0, 0.5 * 2 ** quick_exits) if quick_exits else 0.0
            log.warning("worker %d (pid %d) exited with %s; starting another%s", number,
                        process.pid, process.returncode,
                        f" in {pause:g} s" if pause else "")
            if pause:
                try:
                    await asyncio.wait_for(stop.wait(), pause)
                except TimeoutError:
                    pass

    log.info("jobservice %s supervising %d workers on http://%s:%d (pid %d); event loop %s%s",
             __version__, settings.workers, settings.host, port, os.getpid(),
             describe_loop(loop), f" ({loop_chosen_by})" if loop_chosen_by else "")
    note_stored_jobs_cost(settings)
    try:
        await asyncio.gather(*(keep_running(number) for number in range(settings.workers)))
    finally:
        holder.close()
    log.info("all workers stopped")
    return 0


# `jobservice import FILE` / `jobservice export FILE`: a jobs.json (ours or the old
# service's) into Redis, and Redis's jobs into a jobs.json the embedded mode loads.


def transfer(command: str, argv: list[str]) -> int:
    into = command == "import"
    parser = argparse.ArgumentParser(
        prog=f"jobservice {command}",
        description="Copy a jobs file into Redis (REDIS_URL), keeping ids, states and times."
        if into else "Write the jobs in Redis (REDIS_URL) into a jobs file.")
    parser.add_argument("file", help="the jobs file to read" if into else "the file to write")
    parser.add_argument("--force", action="store_true",
                        help="replace the jobs in Redis" if into else "replace the file")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL") or "",
                        help="the Redis to use (env REDIS_URL)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(["--redis", args.redis])
        if not settings.redis:
            raise ConfigError(f"{command} needs REDIS_URL (or --redis URL, or "
                              "REDIS_SENTINELS)")
        cluster = redis_mode()
    except ConfigError as exc:
        print(f"jobservice: {exc}", file=sys.stderr)
        return 2
    run = cluster.import_file if into else cluster.export_file
    try:
        print(asyncio.run(run(settings, Path(args.file), args.force)))
    except (cluster.Refused, StoreCorrupt, StorageError, OSError) as exc:
        print(f"jobservice {command}: {exc}", file=sys.stderr)
        return 1
    return 0


# What a stored job costs a process that holds the registry (RSS after a full collection:
# the largest of tests/bench.py's rows at 1,000,000 jobs, either mode, rounded up). The
# default MAX_STORED_JOBS stays one figure on every machine, so that every node and
# worker refuses at the same count; at start the service says what it will cost, and
# warns when that is more than 3/4 of the memory it may have.
STORED_JOB_BYTES = 800
PROCESS_BYTES = 64 << 20  # the interpreter, aiohttp and the rest, with no job stored


def memory_limit(proc: Path = Path("/proc/self/cgroup"),
                 cgroups: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(the memory this process may have, what sets it): the lowest memory limit of its
    cgroup and the cgroups above it (v2 memory.max, or v1 memory.limit_in_bytes), if
    lower than the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = []
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder, name, top = cgroups / path.lstrip("/"), "memory.max", cgroups
        elif "memory" in controllers.split(","):
            top = cgroups / "memory"
            folder, name = top / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        while True:  # in a container its own cgroup is mounted as the root
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                limits.append(int(text))
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
    if limits and min(limits) < physical:
        return min(limits), "its cgroup's memory limit"
    return physical, "the machine's physical memory"


def note_stored_jobs_cost(settings: Settings) -> None:
    """Said once (by the supervisor of workers), unless MAX_STORED_JOBS was chosen."""
    if settings.max_stored_jobs and "MAX_STORED_JOBS" not in os.environ \
            and not settings.supervisor:
        log.log(*stored_jobs_note(settings.max_stored_jobs, settings.workers or 1,
                                  *memory_limit()))


def stored_jobs_note(jobs: int, processes: int, limit: int, source: str) -> tuple[int, str]:
    """(log level, what to say) about what the default MAX_STORED_JOBS will cost."""
    each = jobs * STORED_JOB_BYTES + PROCESS_BYTES
    need = each * processes
    cost = (f"{jobs:,} stored jobs (MAX_STORED_JOBS, by default) will take about "
            f"{need / 2**30:.1f} GiB" + (f" ({processes} workers, each with every job)"
                                         if processes > 1 else ""))
    if need <= limit * 3 // 4:  # the rest is the kernel's, and other processes'
        return logging.INFO, f"{cost}, of the {limit / 2**30:.1f} GiB of {source}"
    fits = max(0, (limit * 3 // 4 // processes - PROCESS_BYTES) // STORED_JOB_BYTES)
    return logging.WARNING, (
        f"{cost}, more than 3/4 of the {limit / 2**30:.1f} GiB of {source}: the kernel "
        f"may stop the service before the cap refuses a job; set MAX_STORED_JOBS to "
        f"{fits // 1000 * 1000:,} or less, or give it more memory")


# `jobservice systemd-unit`: a unit file for this installation. It runs as a user made for
# it (DynamicUser=), keeps jobs.json in its StateDirectory=, and is sandboxed as tightly
# as a network service that writes one folder can be (systemd-analyze security: 1.x).

SYSTEMD_UNIT = """\
[Unit]
Description=jobservice: jobs that resolve with a food photo
After={after}
{wants}
[Service]
Type=exec
ExecStart={command} --data %S/jobservice/jobs.json{workers}
# Settings and secrets (HOST, PORT, API_TOKEN, UNSPLASH_ACCESS_KEY...), read by systemd
# as root: keep the file 0600. API_TOKENS_FILE=%S/jobservice/tokens is read again on
# reload (systemctl reload), which sends SIGHUP.
EnvironmentFile=-/etc/jobservice/env
{environment}ExecReload=/bin/kill -s HUP $MAINPID
KillSignal=SIGTERM
KillMode=mixed
# A graceful stop: a supervisor gives each worker {worker_stop:g} s, a process 5 s for its
# requests, then the last writes.
TimeoutStopSec={stop_timeout:g}
Restart=on-failure
# MAX_CONNECTIONS clients, each of which may hold a second descriptor (a file being
# sent), and {reserve} for the journal, Redis and Unsplash.
LimitNOFILE={open_files}
DynamicUser=yes
StateDirectory=jobservice
StateDirectoryMode=0700
UMask=0077
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateIPC=yes
PrivateMounts=yes
DevicePolicy=closed
ProtectSystem=strict
ProtectHome=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def _on_this_machine(redis_url: str) -> bool:
    host = urlsplit(redis_url).hostname or ""
    try:
        return redis_url.startswith("unix:") or host == "localhost" or \
            ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


def systemd_unit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jobservice systemd-unit",
        description="Print a systemd unit that runs this jobservice as a service.")
    parser.add_argument("--max-connections", type=int, default=10_000, metavar="N",
                        help="MAX_CONNECTIONS, and LimitNOFILE to match (default 10000)")
    parser.add_argument("--redis", default="", metavar="URL",
                        help="REDIS_URL; on this machine, the unit starts after its "
                             "redis-server.service")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="run N worker processes (needs --redis)")
    args = parser.parse_args(argv)
    if args.max_connections < 1 or args.workers < 0:
        parser.error("--max-connections must be 1 or more, --workers 0 or more")
    if args.workers and not args.redis:
        parser.error("--workers needs --redis: processes share jobs through Redis")
    program = Path(sys.argv[0]).absolute()  # the venv's command: never resolved past it
    command = f"{sys.executable} {program}" if program.suffix == ".py" else str(program)
    environment = f"Environment=MAX_CONNECTIONS={args.max_connections}\n"
    after, wants = "network.target", ""
    if args.redis:
        environment += f"Environment=REDIS_URL={args.redis}\n"
        if _on_this_machine(args.redis):
            after, wants = "network.target redis-server.service", \
                "Wants=redis-server.service\n"
        else:
            after, wants = "network-online.target", "Wants=network-online.target\n"
    print(SYSTEMD_UNIT.format(
        after=after, wants=wants, command=command, environment=environment,
        workers=f" --workers {args.workers}" if args.workers else "",
        worker_stop=WORKER_STOP_TIMEOUT, stop_timeout=WORKER_STOP_TIMEOUT + 15,
        reserve=FD_RESERVE, open_files=2 * args.max_connections + FD_RESERVE), end="")
    return 0


def socket_host(host: str) -> str:
    """An address as ipaddress reads it (a listening socket may add a zone)."""
    return host.split("%", 1)[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[BoundedLog()])
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("import", "export"):
        return transfer(argv[0], argv[1:])
    if argv and argv[0] == "systemd-unit":
        return systemd_unit(argv[1:])
    raise_open_files_limit()  # first: MAX_CONNECTIONS is derived from the limit
    try:
        settings = load_settings(argv)
        if settings.redis:
            redis_mode()  # a missing extra is a one-line error now, not a traceback later
        loop_factory, loop_chosen_by = event_loop(settings.loop)  # a missing uvloop too
    except ConfigError as exc:
        print(f"jobservice: {exc}", file=sys.stderr)
        return 2
    try:
        if settings.workers:
            return supervise(settings, loop_factory, loop_chosen_by)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings, loop_chosen_by))
    except StoreCorrupt as exc:
        print(f"jobservice: cannot load jobs: {exc}; the file was left untouched",
              file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"jobservice: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            print(f"jobservice: cannot listen on {settings.host}:{settings.port}: "
                  f"{exc.strerror}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    # Run as a script, this module is __main__; the Redis mode imports it as jobservice,
    # and must get this very module, not a second copy with classes of its own.
    sys.modules.setdefault("jobservice", sys.modules[__name__])
    sys.exit(main())
