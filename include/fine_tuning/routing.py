"""The live routing the content agent reads, in Redis, and the function it calls to pick a model.

One hash per model type, ``fine_tuning:routing:{model_type}``::

    {"baseline": "0.9", "candidate": "0.1",
     "baseline_model": "gpt-3.5-turbo-0125", "candidate_model": "ft:...", "source": "ab-...",
     "fallback_model": "selfhosted:...", "retires_at": "{\"ft:...\": 1799884800.0}"}

A request goes to the candidate when its bucket, a hash of (candidate model, request id) in
[0, 1), is below the candidate's share: the same request always gets the same arm, and when a
rollout raises the share, requests already on the candidate stay there.

The pipeline writes, next to the models, when each of them stops serving (``retires_at``, Unix
seconds, from :mod:`fine_tuning.retirement`) and the model to serve instead
(``fallback_model``): the agent never calls a model past its retirement, even between the
pipeline's own checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis
    from redis.typing import EncodableT

KEY = "fine_tuning:routing:{model_type}"

log = logging.getLogger(__name__)
# Retired models already reported by this process's choose_model (one log line each).
_reported_retired: set[str] = set()
# The last routing each model type was read with, per Redis server: what choose_model serves
# while Redis cannot be read. Bounded: a process reads a handful of model types.
_last_read: OrderedDict[tuple[str, str], Routing | None] = OrderedDict()
_LAST_READ_MAX = 64
# Model types whose Redis outage choose_model has already logged (cleared when Redis answers).
_outage_logged: set[tuple[str, str]] = set()
# After a failed read, Redis is not asked again for this long (monotonic deadline per key): a
# default redis-py client spends seconds retrying each call, and the agent must not wait that
# long on every request of an outage.
REDIS_RETRY_SECONDS = 5.0
_skip_until: dict[tuple[str, str], float] = {}


@dataclass(frozen=True)
class Routing:
    baseline_model: str
    candidate_model: str | None
    candidate_share: float
    source: str
    # The model served instead of one past its retirement, and when each model retires.
    fallback_model: str | None = None
    retires_at: dict[str, float] = field(default_factory=dict)

    def retired(self, model: str, now: float) -> bool:
        at = self.retires_at.get(model)
        return at is not None and now >= at

    def serving(self, model: str, now: float, default: str) -> str:
        """``model``, unless it is past its retirement: then the fallback, the other arm's model,
        or ``default``, the first that still serves (said once per model in the log)."""
        if not self.retired(model, now):
            return model
        others = [self.fallback_model, self.baseline_model, self.candidate_model, default]
        chosen = next((m for m in others if m and m != model and not self.retired(m, now)), default)
        if model not in _reported_retired:
            _reported_retired.add(model)
            log.error(
                "routing names %s, retired since %s: serving %s instead",
                model,
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.retires_at[model])),
                chosen,
            )
        return chosen

    def as_split(self) -> dict[str, float]:
        return {"baseline": round(1 - self.candidate_share, 6), "candidate": round(self.candidate_share, 6)}


def routing_key(model_type: str) -> str:
    return KEY.format(model_type=model_type)


def set_routing(client: redis.Redis, model_type: str, routing: Routing) -> float:
    """Replace the routing in one MULTI/EXEC: a reader sees the old one or the new one, never half.

    :returns: the time the switch took (seconds), for the rollback timing.
    """
    started = time.perf_counter()
    split = routing.as_split()
    mapping: dict[EncodableT, EncodableT] = {
        "baseline": str(split["baseline"]),
        "candidate": str(split["candidate"]),
        "baseline_model": routing.baseline_model,
        "candidate_model": routing.candidate_model or "",
        "source": routing.source,
        "fallback_model": routing.fallback_model or "",
        "retires_at": json.dumps(routing.retires_at, sort_keys=True),
        "updated_at": str(time.time()),
    }
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(routing_key(model_type))
        pipe.hset(routing_key(model_type), mapping=mapping)
        pipe.execute()
    return time.perf_counter() - started


def get_routing(client: redis.Redis, model_type: str) -> Routing | None:
    raw = client.hgetall(routing_key(model_type))
    if not raw:
        return None
    data = {
        k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
        for k, v in raw.items()
    }
    return Routing(
        baseline_model=data["baseline_model"],
        candidate_model=data.get("candidate_model") or None,
        candidate_share=float(data.get("candidate", 0.0)),
        source=data.get("source", ""),
        fallback_model=data.get("fallback_model") or None,
        retires_at={str(k): float(v) for k, v in json.loads(data.get("retires_at") or "{}").items()},
    )


def bucket(candidate_model: str, request_id: str) -> float:
    """A stable position in [0, 1) for this request (uniform over request ids)."""
    digest = hashlib.sha256(f"{candidate_model}\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm_for(routing: Routing, request_id: str) -> str:
    if routing.candidate_model and bucket(routing.candidate_model, request_id) < routing.candidate_share:
        return "candidate"
    return "baseline"


def choose_model(
    client: redis.Redis, model_type: str, request_id: str, default: str, *, now: float | None = None
) -> str:
    """The model the agent should use for this request (``default`` when no routing is set).

    Deterministic by ``request_id``; over many requests the candidate's share matches the split.
    A model past its retirement is never returned (see :meth:`Routing.serving`). Never raises
    for Redis: while it cannot be read, the last routing this process read is served (else
    ``default``, the agent's champion), and the outage is logged once.
    """
    routing = current_routing(client, model_type)
    if routing is None:
        return default
    arm = arm_for(routing, request_id)
    model = (
        routing.candidate_model if arm == "candidate" and routing.candidate_model else routing.baseline_model
    )
    return routing.serving(model, time.time() if now is None else now, default)


def _server(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"


def current_routing(client: redis.Redis, model_type: str) -> Routing | None:
    """The live routing; while Redis cannot be read, the last one read from it (or None)."""
    import redis as redis_lib

    key = (_server(client), model_type)
    if time.monotonic() < _skip_until.get(key, 0.0):
        return _last_read.get(key)
    try:
        routing = get_routing(client, model_type)
    except redis_lib.RedisError as exc:
        _skip_until[key] = time.monotonic() + REDIS_RETRY_SECONDS
        remembered = _last_read.get(key)
        if key not in _outage_logged:
            _outage_logged.add(key)
            log.error(
                "routing of %s unreadable (%s: %s): serving %s until Redis answers",
                model_type,
                type(exc).__name__,
                exc,
                "the last routing read" if remembered else "the agent's default model",
            )
        return remembered
    _skip_until.pop(key, None)
    if key in _outage_logged:
        _outage_logged.discard(key)
        log.warning("routing of %s readable again", model_type)
    _last_read[key] = routing
    _last_read.move_to_end(key)
    while len(_last_read) > _LAST_READ_MAX:
        _last_read.popitem(last=False)
    return routing
