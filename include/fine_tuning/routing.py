"""The live routing the content agent reads, in Redis, and the function it calls to pick a model.

One hash per model type, ``fine_tuning:routing:{model_type}``::

    {"baseline": "0.9", "candidate": "0.1",
     "baseline_model": "gpt-3.5-turbo-0125", "candidate_model": "ft:...", "source": "ab-..."}

A request goes to the candidate when its bucket, a hash of (candidate model, request id) in
[0, 1), is below the candidate's share: the same request always gets the same arm, and when a
rollout raises the share, requests already on the candidate stay there.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis
    from redis.typing import EncodableT

KEY = "fine_tuning:routing:{model_type}"


@dataclass(frozen=True)
class Routing:
    baseline_model: str
    candidate_model: str | None
    candidate_share: float
    source: str

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
    )


def bucket(candidate_model: str, request_id: str) -> float:
    """A stable position in [0, 1) for this request (uniform over request ids)."""
    digest = hashlib.sha256(f"{candidate_model}\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm_for(routing: Routing, request_id: str) -> str:
    if routing.candidate_model and bucket(routing.candidate_model, request_id) < routing.candidate_share:
        return "candidate"
    return "baseline"


def choose_model(client: redis.Redis, model_type: str, request_id: str, default: str) -> str:
    """The model the agent should use for this request (``default`` when no routing is set).

    Deterministic by ``request_id``; over many requests the candidate's share matches the split.
    """
    routing = get_routing(client, model_type)
    if routing is None:
        return default
    return routing.candidate_model if arm_for(routing, request_id) == "candidate" else routing.baseline_model  # type: ignore[return-value]
