"""The agent's choose_model with Redis down: it keeps serving what it last read, never raises."""

from __future__ import annotations

import logging

import pytest
import redis
from faulty_proxy import FaultyProxy

from fine_tuning import routing
from fine_tuning.routing import Routing, choose_model, set_routing

CANDIDATE = "ft:gpt-3.5-turbo-0125:acme:weekly:outage1"


def test_choose_model_serves_the_last_routing_read_while_redis_is_down(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, redis_db: str
) -> None:
    direct = redis.Redis.from_url(redis_db)
    db_number = direct.connection_pool.connection_kwargs["db"]
    host, port = direct.connection_pool.connection_kwargs["host"], direct.connection_pool.connection_kwargs["port"]
    model_type = "outage-body"
    set_routing(direct, model_type, Routing("gpt-3.5-turbo-0125", CANDIDATE, 0.5, "ab-outage"))
    with FaultyProxy(host, port) as proxy:
        # A client as an agent would make it: redis-py's defaults (it retries a failed call).
        agent = redis.Redis(host="127.0.0.1", port=proxy.port, db=db_number, socket_timeout=1, socket_connect_timeout=1)
        before = [choose_model(agent, model_type, f"req-{i}", "champion-model") for i in range(100)]
        assert set(before) == {"gpt-3.5-turbo-0125", CANDIDATE}
        proxy.down()
        reads: list[str] = []
        real_read = routing.get_routing
        monkeypatch.setattr(routing, "get_routing", lambda c, t: reads.append(t) or real_read(c, t))
        with caplog.at_level(logging.ERROR, logger="fine_tuning.routing"):
            during = [choose_model(agent, model_type, f"req-{i}", "champion-model") for i in range(100)]
        # The same arm for every request as before the outage, and one log line for it; Redis
        # was asked once in the outage, not once per request (each ask costs seconds of retries).
        assert during == before
        assert sum("unreadable" in r.message for r in caplog.records) == 1
        assert reads.count(model_type) == 1
        # A model type never read before the outage gets the agent's default.
        assert choose_model(agent, "never-read", "req-1", "champion-model") == "champion-model"
    direct.delete(f"fine_tuning:routing:{model_type}")
