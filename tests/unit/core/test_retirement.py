"""The retirement table: shipped rows with sources, overrides, provider-reported dates, and the
routing that never names a model past its inference retirement (the agent's side included)."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime

import pytest
import redis

from fine_tuning import retirement
from fine_tuning.config import ConfigError, load_config
from fine_tuning.routing import Routing, choose_model, get_routing, set_routing

DEC_3 = datetime(2026, 12, 3, tzinfo=UTC)
JAN_15 = datetime(2027, 1, 15, tzinfo=UTC)
OPENAI_FT = "ft:gpt-4o-mini-2024-07-18:acme:weekly:abc123"


def test_retire_table_ships_a_source_and_a_date_checked_for_every_row() -> None:
    rows = retirement.shipped_rows()
    assert rows, "the package ships no retirement table"
    for row in rows:
        assert row.source.strip() and row.checked == date(2026, 12, 2)
    table = retirement.table_for(load_config(env={}))
    # OpenAI: nobody trains from 2027-01-06; gpt-4o-mini and its fine-tunes stop on 2027-01-14.
    ft = table.lookup(OPENAI_FT)
    assert (ft.ref.provider, ft.ref.base_model, ft.ref.fine_tuned) == ("openai", "gpt-4o-mini-2024-07-18", True)
    assert ft.training_retires == date(2027, 1, 6) and ft.inference_retires == date(2027, 1, 14)
    assert "secondary" in (ft.source or "")
    assert ft.status("inference", DEC_3, 30) == "ok"  # 42 days away
    assert ft.status("inference", datetime(2026, 12, 20, tzinfo=UTC), 30) == "retiring"
    assert ft.status("inference", JAN_15, 30) == "retired"
    # gpt-3.5-turbo: training closes with everyone's; no inference date is announced.
    old = table.lookup("gpt-3.5-turbo-0125")
    assert old.training_retires == date(2027, 1, 6) and old.inference_retires is None
    # The same base on Azure serves months longer; a self-hosted adapter never retires.
    azure = table.lookup("gpt-4o-mini-2024-07-18.ft-0123abcd")
    assert (azure.ref.provider, azure.inference_retires) == ("azure_openai", date(2027, 10, 1))
    assert table.lookup("selfhosted:ftjob-1").status("inference", JAN_15, 30) == "ok"
    # Already gone: gpt-4.1-nano shut down on 2026-10-23.
    assert table.lookup("gpt-4.1-nano-2025-04-14").retired("inference", DEC_3)


def test_retire_override_rows_replace_the_shipped_ones_and_bad_rows_name_the_field() -> None:
    config = load_config(
        env={},
        params={
            "retirement": {
                "overrides": [
                    {
                        "provider": "openai",
                        "models": ["gpt-4o-mini*"],
                        "inference_retires": "2027-03-01",
                        "source": "our account manager, 2026-12-01",
                        "checked": "2026-12-01",
                    }
                ]
            }
        },
    )
    found = retirement.table_for(config).lookup(OPENAI_FT)
    assert found.inference_retires == date(2027, 3, 1) and found.training_retires is None
    assert found.source == "our account manager, 2026-12-01"
    with pytest.raises(ConfigError, match=r"retirement\.overrides\.0\.provider"):
        load_config(
            env={},
            params={"retirement": {"overrides": [{"provider": "openia", "models": ["*"], "source": "x", "checked": "2026-12-01"}]}},
        )
    with pytest.raises(ConfigError, match=r"retirement\.serving_fallback"):
        load_config(env={}, params={"retirement": {"serving_fallback": {"caption": "gpt-x"}}})


def test_retire_model_providers_say_who_serves_an_id_that_does_not() -> None:
    config = load_config(
        env={},
        params={"retirement": {"model_providers": {"ft:*:gateway-org:*": "openai_compatible"}}},
    )
    table = retirement.table_for(config)
    # An OpenAI-looking id made by a gateway is not OpenAI's to retire.
    assert table.lookup("ft:gpt-4o-mini-2024-07-18:gateway-org:weekly:x").inference_retires is None
    assert table.lookup(OPENAI_FT).inference_retires == date(2027, 1, 14)


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    """A Redis database of this test's own (the routing keys are per model type)."""
    return redis.Redis.from_url(redis_db)


def test_retire_routing_written_past_the_date_names_the_fallback(client: redis.Redis) -> None:
    model_type = "body"
    config = load_config(env={}, params={"retirement": {"serving_fallback": {"body": "selfhosted:fallback"}}})
    try:
        served = retirement.write_routing(
            config, client, model_type, Routing(OPENAI_FT, "ft:gpt-4o-2024-08-06:acme:w:def", 0.3, "deploy-1"), JAN_15
        )
        raw = {k.decode(): v.decode() for k, v in client.hgetall(f"fine_tuning:routing:{model_type}").items()}
        # Both models are past 2027-01-14: nothing of theirs is left in what the agent reads.
        assert not any(OPENAI_FT in value or "ft:gpt-4o-2024" in value for value in raw.values())
        assert json.loads(raw["retires_at"]) == {}
        assert raw["baseline_model"] == "selfhosted:fallback" and raw["candidate_model"] == ""
        assert raw["candidate"] == "0.0" and served.source == "deploy-1:candidate_retired:fallback"
        # Before the date, the same routing is written as asked, with each model's last instant.
        served = retirement.write_routing(config, client, model_type, Routing(OPENAI_FT, None, 0.0, "x"), DEC_3)
        stored = get_routing(client, model_type)
        assert stored is not None and stored.baseline_model == OPENAI_FT
        assert stored.retires_at[OPENAI_FT] == datetime(2027, 1, 14, tzinfo=UTC).timestamp()
        assert stored.fallback_model == "selfhosted:fallback"
        # Without a fallback, a retired baseline is refused, naming the setting; the routing stays.
        with pytest.raises(ConfigError, match=r"retirement\.serving_fallback\.body"):
            retirement.write_routing(load_config(env={}), client, "body", Routing(OPENAI_FT, None, 0.0, "y"), JAN_15)
    finally:
        client.delete(f"fine_tuning:routing:{model_type}")


def test_retire_choose_model_never_returns_a_retired_model(client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    model_type = f"retire-agent-{time.time_ns()}"
    candidate = "ft:gpt-4o-2024-08-06:acme:weekly:zzz"
    retires = datetime(2027, 1, 14, tzinfo=UTC).timestamp()
    # A routing written before the date (the pipeline's watch has not run since): the agent
    # itself stops calling the models at their retirement instant.
    set_routing(
        client,
        model_type,
        Routing(OPENAI_FT, candidate, 0.5, "ab-1", fallback_model="selfhosted:fallback",
                retires_at={OPENAI_FT: retires, candidate: retires}),
    )
    try:
        before = {choose_model(client, model_type, f"r{i}", "default-model", now=retires - 1) for i in range(200)}
        assert before == {OPENAI_FT, candidate}
        after = {choose_model(client, model_type, f"r{i}", "default-model", now=retires) for i in range(200)}
        assert after == {"selfhosted:fallback"}
        assert sum("retired since 2027-01-14" in r.message for r in caplog.records) == 2  # once per model
    finally:
        client.delete(f"fine_tuning:routing:{model_type}")


def test_retire_table_file_replaces_the_shipped_table_and_a_bad_one_is_named(tmp_path) -> None:
    own = tmp_path / "ours.json"
    own.write_text(json.dumps({"rows": [{"provider": "openai", "models": ["gpt-4o-mini*"],
                                         "inference_retires": "2027-02-01", "source": "ours", "checked": "2026-12-03"}]}))
    config = load_config(env={"FINE_TUNING_RETIREMENT_TABLE": str(own)})
    table = retirement.table_for(config)
    assert table.lookup(OPENAI_FT).inference_retires == date(2027, 2, 1)
    assert table.lookup("gpt-3.5-turbo-0125").training_retires is None  # not in our table
    broken = tmp_path / "broken.json"
    broken.write_text('{"rows": [{"provider": "openai"}]}')
    with pytest.raises(ConfigError, match=r"retirement.table_file .*broken.json"):
        retirement.table_for(load_config(env={"FINE_TUNING_RETIREMENT_TABLE": str(broken)}))
