"""What the bench scripts share: sizes and results directory from the environment, the machine's
description, a throwaway schema, synthetic A/B traffic in SQL, a statement-counting proxy in front
of PostgreSQL, and the printed table and JSON file of the results.

Environment:
    TEST_DATABASE_URL  the PostgreSQL to bench against (default postgresql://postgres@127.0.0.1:5432/test)
    BENCH_REDIS_URL    the Redis (default redis://127.0.0.1:6379/0)
    BENCH_MAX_POSTS    caps the largest size of every script (the smaller sizes stay)
    BENCH_RESULTS_DIR  where the JSON goes (default bench/results/)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SCHEMA_PREFIX = "bench_"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").replace("_", "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {os.environ[name]!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be >= 1, got {value}")
    return value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


def bench_sizes(defaults: Sequence[int]) -> list[int]:
    """The default sizes with BENCH_MAX_POSTS as the largest: (10k, 1M) capped at 50k is (10k, 50k)."""
    cap = env_int("BENCH_MAX_POSTS", max(defaults))
    return sorted({min(size, cap) for size in defaults})


def results_dir() -> Path:
    path = Path(os.environ.get("BENCH_RESULTS_DIR") or REPO / "bench" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how busy it was when the script started."""
    import psutil
    import psycopg

    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        cpu_model = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")),
            cpu_model,
        )
    try:
        with psycopg.connect(BASE_URL, connect_timeout=5) as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            settings = dict(conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
                "('shared_buffers', 'work_mem', 'max_parallel_workers_per_gather')"
            ).fetchall())
    except psycopg.Error as exc:
        server, settings = f"unreachable: {exc}", {}
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu_model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "postgresql": server,
        "postgresql_settings": settings,
        "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB RAM, "
        f"load average at start {' / '.join(str(x) for x in info['load_average_at_start'])}; "
        f"PostgreSQL {info['postgresql']}, Python {info['python']}"
    )


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks drop the throwaway schemas."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def schema_url(schema: str, base_url: str = BASE_URL) -> str:
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options={quote(f'-csearch_path={schema}')}"


def _drop_orphans(admin: Any) -> None:
    """Drop bench schemas left by a bench process that no longer runs (SIGKILL, power cut)."""
    import psutil

    rows = admin.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (SCHEMA_PREFIX.replace("_", r"\_") + "%",)
    ).fetchall()
    for (name,) in rows:
        match = re.fullmatch(rf"{SCHEMA_PREFIX}(\d+)_[0-9a-f]+", name)
        if match and not psutil.pid_exists(int(match[1])):
            admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@contextlib.contextmanager
def throwaway_schema() -> Iterator[str]:
    """A fresh schema (named after this process), migrated; yields a URL whose search_path is it.
    The schema is dropped whatever happens (an exception, Ctrl-C, SIGTERM)."""
    from fine_tuning.infra import db

    schema = f"{SCHEMA_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with db.connect(BASE_URL, autocommit=True) as admin:
        _drop_orphans(admin)
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        url = schema_url(schema)
        with db.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        yield url
    finally:
        with db.connect(BASE_URL, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# Synthetic A/B traffic, made by PostgreSQL itself (10M rows in a minute or two, where COPY from
# Python would take ten). Posts are spread evenly over [start, end) in insertion order, as the
# agent writes them; before ``window_start`` they are the baseline's (and, before
# ``older_until``, an older model's); inside it a ``candidate_share`` of them are the candidate's.
# Some rows carry what real data has: engagement not yet scored (NULL) or NaN, missing cost,
# missing quality score, failed generations.
AB_POSTS_SQL = """
INSERT INTO posts (persona_id, hook, body, engagement_rate, ts, tokens_used, model_id,
                   response_time_ms, quality_score, cost_usd, is_error)
SELECT 'persona_' || (i %% 5),
       'hook ' || i,
       left(%(filler)s, 250 + ((i * 7919) %% 500)::int),
       CASE WHEN u_eng < 0.02 THEN NULL
            WHEN u_eng < 0.0201 THEN 'NaN'::float8
            ELSE greatest(0, least(1, (CASE WHEN is_candidate THEN %(candidate_engagement)s
                                            ELSE %(baseline_engagement)s END) + 0.03 * z_eng)) END,
       ts,
       tokens,
       CASE WHEN is_candidate THEN %(candidate)s
            WHEN ts < %(older_until)s THEN %(older)s
            ELSE %(baseline)s END,
       exp(6.6 + 0.35 * z_rt),
       CASE WHEN u_q < 0.03 THEN NULL ELSE greatest(0, least(1, 0.72 + 0.1 * z_q)) END,
       CASE WHEN u_cost < 0.01 THEN NULL
            ELSE tokens * (CASE WHEN is_candidate THEN 1.8e-6 ELSE 2e-6 END) END,
       u_err < 0.01
FROM (
    SELECT i, ts, ts >= %(window_start)s AND u_arm < %(candidate_share)s AS is_candidate,
           u_eng, u_q, u_cost, u_err, tokens,
           sqrt(-2 * ln(1 - u1)) * cos(2 * pi() * u2) AS z_eng,
           sqrt(-2 * ln(1 - u3)) * cos(2 * pi() * u4) AS z_rt,
           sqrt(-2 * ln(1 - u5)) * cos(2 * pi() * u6) AS z_q
    FROM (
        SELECT i,
               %(start)s::timestamptz + (%(end)s::timestamptz - %(start)s::timestamptz)
                   * ((i - 0.5) / %(n)s)::float8 AS ts,
               random() AS u_arm, random() AS u_eng, random() AS u_q, random() AS u_cost,
               random() AS u_err, 200 + (random() * 400)::int AS tokens,
               random() AS u1, random() AS u2, random() AS u3, random() AS u4,
               random() AS u5, random() AS u6
        FROM generate_series(1, %(n)s::bigint) AS i
    ) AS draws
) AS rows
"""
_FILLER = ("Honestly the smallest habit changes compound into the biggest results over a year. " * 12)


def insert_ab_posts(
    conn: Any,
    n: int,
    *,
    baseline: str,
    candidate: str,
    start: datetime,
    end: datetime,
    window_start: datetime,
    older_model: str = "bench-older-model",
    older_until: datetime | None = None,
    candidate_share: float = 0.1,
    baseline_engagement: float = 0.060,
    candidate_engagement: float = 0.062,
) -> None:
    """Insert ``n`` posts spread over [start, end) in one statement (see AB_POSTS_SQL)."""
    conn.execute(
        AB_POSTS_SQL,
        {
            "n": n, "start": start, "end": end, "window_start": window_start, "baseline": baseline,
            "candidate": candidate, "older": older_model, "older_until": older_until or start,
            "candidate_share": candidate_share, "baseline_engagement": baseline_engagement,
            "candidate_engagement": candidate_engagement, "filler": _FILLER,
        },
    )


class CountingProxy:
    """A TCP proxy in front of PostgreSQL that counts the statements its clients send.

    Every statement reaches the server as a simple-protocol Query message or an extended-protocol
    Execute message; both are counted, by the statement's first keyword (SELECT, DECLARE, FETCH,
    BEGIN...). Nothing in the client is patched, and the server-to-client bytes (the rows) are
    relayed untouched, a megabyte at a time. Clients connect through :meth:`conninfo`, which
    turns TLS off so that the messages can be read.

    Counted on the wire because the server-side way, ``pg_stat_statements``, needs the module
    in ``shared_preload_libraries`` and a server restart, which a bench on a shared PostgreSQL
    may not do.
    """

    _STARTUP_CODES_BEFORE_STARTUP = {80877102, 80877103, 80877104}  # cancel, SSL, GSS requests

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self._statements: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False

    @classmethod
    def for_url(cls, url: str) -> CountingProxy:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
        return cls(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))

    def conninfo(self, url: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(url, host="127.0.0.1", port=self.port, sslmode="disable", gssencmode="disable")

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self._accept, daemon=True, name="counting-proxy").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        with contextlib.suppress(OSError):  # close() alone does not wake a blocked accept() on Linux
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def take(self) -> Counter[str]:
        """The statements counted since the last call."""
        with self._lock:
            taken, self._statements = self._statements, Counter()
        return taken

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(server, client), daemon=True).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        buffer = memoryview(bytearray(1 << 20))
        try:
            while n := server.recv_into(buffer):
                client.sendall(buffer[:n])
        except OSError:
            pass
        finally:
            self._close(server, client)

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        pending = bytearray()
        started = False
        statements: dict[bytes, bytes] = {}  # prepared statement name -> its text
        portals: dict[bytes, bytes] = {}  # portal name -> its statement's text
        try:
            while data := client.recv(1 << 16):
                server.sendall(data)
                pending += data
                while True:
                    if not started:  # untyped startup packets: int32 length, int32 code
                        if len(pending) < 8 or len(pending) < int.from_bytes(pending[:4], "big"):
                            break
                        length = int.from_bytes(pending[:4], "big")
                        code = int.from_bytes(pending[4:8], "big")
                        started = code not in self._STARTUP_CODES_BEFORE_STARTUP
                        del pending[:length]
                        continue
                    if len(pending) < 5:
                        break
                    total = 1 + int.from_bytes(pending[1:5], "big")
                    if len(pending) < total:
                        break
                    kind, body = pending[0:1], bytes(pending[5:total])
                    del pending[:total]
                    if kind == b"Q":
                        self._count(body.split(b"\0", 1)[0])
                    elif kind == b"P":
                        name, text = body.split(b"\0", 2)[:2]
                        statements[name] = text
                    elif kind == b"B":
                        portal, name = body.split(b"\0", 2)[:2]
                        portals[portal] = statements.get(name, b"")
                    elif kind == b"E":
                        self._count(portals.get(body.split(b"\0", 1)[0], b""))
        except OSError:
            pass
        finally:
            self._close(client, server)

    def _count(self, text: bytes) -> None:
        words = text.lstrip().split(None, 1)
        keyword = words[0].decode("ascii", "replace").upper().rstrip(";") if words else "(empty)"
        with self._lock:
            self._statements[keyword] += 1


def statements_summary(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def child_result(stdout: str) -> dict[str, Any]:
    """The JSON object a child process printed last (Airflow's logging may print lines too)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the child printed no result:\n{stdout[-2000:]}")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (the kernel's high-water mark), in MiB.

    Linux's ``VmHWM``, not ``getrusage``'s ``ru_maxrss``: across ``execve`` the latter keeps the
    high-water mark of the memory it replaced, which for a child started by ``subprocess``
    (vfork, then exec) is the parent's, so a child reported at least its parent's peak (measured:
    176 MiB for a collect that peaked at 119 MiB, after the bench's parent had tokenized).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(
    title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()
) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for note in notes:
        print(note)
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    path = results_dir() / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"results: {path}")
    return path
