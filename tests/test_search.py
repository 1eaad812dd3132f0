"""History search over the job store (`gencli list -q/--since/--after/--json`, `GET /v1/jobs?q=`):
prompts and outputs found by their words through SQLite's FTS5 index and PostgreSQL's GIN index,
and job ids that sort by time. A real SQLite file and a real PostgreSQL (tests/test_store.py's
`store_url`); the API test a real `gencli serve` (conftest's `env`)."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from services import start_api
from test_store import claim, drop_every_table, open_stores, save, store_url  # noqa: F401  (fixtures)

from gencli.cli.main import main
from gencli.storage.db import ItemStatus, JobStatus, utcnow
from gencli.storage.migrations import MIGRATIONS, migrate
from gencli.storage.store import SearchError, Store, StoreError


@pytest.fixture
def store(store_url, open_stores) -> Store:  # noqa: F811
    return open_stores(store_url)


def submit(store: Store, *prompts, model: str = "tiny") -> str:
    job, created = store.create_job(model=model, params={}, items=[{"prompt": p, "line": i + 1}
                                                                   for i, p in enumerate(prompts)])
    assert created
    return job.id


def found(store: Store, query: str, **kw) -> set[str]:
    return {j.id for j in store.list_jobs(query=query, **kw)}


def run_and_save(store: Store, job_id: str, outputs: list[str], status=JobStatus.SUCCEEDED) -> None:
    """What a worker does: claim the job, save each item's output, end the job."""
    assert claim(store, job_id, "w").ok
    item_status = ItemStatus.SUCCEEDED if status is JobStatus.SUCCEEDED else ItemStatus.FAILED
    for idx, text in enumerate(outputs):
        assert save(store, job_id, "w", idx, text, status=item_status)
    assert store.finish(job_id, "w", status)


def fts_rows(store: Store, word: str) -> int:
    """On SQLite, the index's own entries for a word (stale ones included): what triggers keep."""
    with store.engine.connect() as c:
        return c.execute(sa.text("SELECT count(*) FROM items_fts WHERE items_fts MATCH :w"),
                         {"w": f'"{word}"'}).scalar()


# --- what is searched ----------------------------------------------------------------------------


def test_a_word_in_a_prompt_finds_its_job(store):
    fox = submit(store, "The quick brown fox", "something else")
    dog = submit(store, "a lazy dog")
    assert found(store, "fox") == {fox}
    assert found(store, "dog") == {dog}
    assert found(store, "cat") == set()
    matches = store.matching_items([fox, dog], "fox")
    assert {job: [it.idx for it in items] for job, items in matches.items()} == {fox: [0], dog: []}


def test_a_prompt_longer_than_a_tsvector_holds_is_recorded_and_found_by_its_start(store):
    """PostgreSQL's tsvector holds at most 1 MB: a 4 MB prompt (kept whole, --truncate feeds its end)
    must not fail its write; its first SEARCH_CHARS characters are indexed there, all of it on SQLite."""
    words = " ".join(f"w{n:07d}" for n in range(500_000))  # 4.5 MB of distinct words
    job = submit(store, "puffin " + words)
    assert store.items(job)[0].prompt == "puffin " + words
    assert found(store, "puffin") == {job}


def test_a_word_in_an_output_finds_its_job(store):
    job = submit(store, "Once upon a time", "The sea")
    assert found(store, "dragon") == set()
    run_and_save(store, job, ["there was a dragon", "waves"])
    assert found(store, "dragon") == {job}
    assert [it.idx for it in store.matching_items([job], "dragon")[job]] == [0]
    assert [it.idx for it in store.matching_items([job], "waves")[job]] == [1]


def test_chat_message_prompts_are_searched_by_their_contents(store):
    chat = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name a volcano"}]}]
    job = submit(store, chat)
    assert found(store, "terse") == found(store, "volcano") == {job}
    assert found(store, "system") == found(store, "role") == set()  # the roles and keys are not text


def test_every_word_must_be_in_one_item_whole_and_in_any_case(store):
    both = submit(store, "Red apples and green pears")
    split = submit(store, "red apples", "green pears")  # the words in two items: no item has both
    answered = submit(store, "Why is the SKY blue?")
    run_and_save(store, answered, ["Rayleigh scattering"])
    assert found(store, "red pears") == {both}
    assert found(store, "RED Apples") == {both, split}
    assert found(store, "sky rayleigh") == {answered}  # one word in the prompt, one in its output
    assert found(store, "appl") == found(store, "apple") == set()  # whole words, no prefixes or stems
    assert found(store, "red banana") == set()


@pytest.mark.parametrize("query", ['"foo" OR bar*', "NEAR(", "NEAR(foo bar, 2)", "foo AND NOT bar", "bar*",
                                   "prompt_text:foo", "^foo", "-foo", '"foo', "foo)", "{prompt_text output}: x",
                                   "'; DROP TABLE jobs; --", "foo\x00bar"])
def test_fts_syntax_in_a_query_is_searched_as_text(store, query):
    submit(store, "foo or bar near the barn")
    store.list_jobs(query=query)  # never a syntax error
    assert store.get_job(submit(store, "still here")) is not None


def test_fts_operators_are_words_like_any_other(store):
    all_three = submit(store, "foo or bar")
    foo = submit(store, "just foo")
    barn = submit(store, "a barn and NEAR the river")
    assert found(store, '"foo" OR bar*') == {all_three}  # foo, or, bar: each a word, all needed
    assert found(store, "bar*") == {all_three}  # no prefix query: barn is not bar
    assert found(store, "NEAR(") == {barn}
    assert found(store, '"foo') == {all_three, foo}


@pytest.mark.parametrize("query", ["", "   ", "--", '"" * ()', "___", "\x00"])
def test_a_query_without_words_is_an_error_not_everything(store, query):
    submit(store, "anything")
    with pytest.raises(SearchError, match="nothing to search for"):
        store.list_jobs(query=query)


# --- the index follows the items -----------------------------------------------------------------


def test_a_retry_clears_the_old_output_from_the_index(store):
    job = submit(store, "tell me about zebras")
    run_and_save(store, job, ["partial stripes"], status=JobStatus.FAILED)
    assert found(store, "stripes") == {job}
    assert store.reset_for_retry(job) == 1
    assert found(store, "stripes") == set()
    assert found(store, "zebras") == {job}  # the prompt stays
    if store.engine.dialect.name == "sqlite":
        assert fts_rows(store, "stripes") == 0


def test_a_deleted_job_leaves_the_index(store):
    keep, gone = submit(store, "keep this ocelot"), submit(store, "drop this ocelot")
    run_and_save(store, gone, ["gone for good"])
    store.delete_job(gone)
    assert found(store, "ocelot") == {keep}
    assert found(store, "good") == set()
    if store.engine.dialect.name == "sqlite":
        assert fts_rows(store, "drop") == fts_rows(store, "good") == 0


# --- with the other filters, and pages -----------------------------------------------------------


def test_since_keeps_the_jobs_created_from_then(store):
    old = submit(store, "an early note")
    time.sleep(0.05)
    mark = store.db_time()
    time.sleep(0.05)
    new = submit(store, "a later note")
    assert {j.id for j in store.list_jobs(since=mark)} == {new}
    assert found(store, "note", since=mark) == {new}
    assert found(store, "note", since=mark - timedelta(hours=1)) == {old, new}
    assert found(store, "note", since=mark.replace(tzinfo=timezone.utc)) == {new}  # an aware time: its UTC
    assert store.list_jobs(since=mark + timedelta(hours=1)) == []
    edge = [datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),  # before the calendar once in UTC
            datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))]  # after it
    assert [len(store.list_jobs(since=t)) for t in edge] == [2, 0]


def test_model_and_status_filters_combine_with_the_query(store):
    a = submit(store, "shared word", model="alpha")
    b = submit(store, "shared word", model="beta")
    c = submit(store, "shared word", model="alpha")
    submit(store, "other thing", model="alpha")
    run_and_save(store, c, ["done"])
    assert found(store, "shared") == {a, b, c}
    assert found(store, "shared", model="alpha") == {a, c}
    assert found(store, "shared", model="alpha", status="queued") == {a}
    assert found(store, "shared", status="succeeded") == {c}
    assert found(store, "shared", kind="prep") == set()
    assert found(store, "shared", model="al\x00pha") == set()  # a NUL: no job's (PostgreSQL's text has none)


def test_pages_after_an_id_give_every_job_once_newest_first(store):
    jobs = []
    for i in range(5):
        jobs.append(submit(store, f"page word {i}"))
        time.sleep(0.003)
    submit(store, "not on any page")
    assert jobs == sorted(jobs)  # ids sort by time
    pages, after = [], None
    while True:
        page = [j.id for j in store.list_jobs(query="page word", limit=2, after=after)]
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert pages == [jobs[4:2:-1], jobs[2:0:-1], jobs[:1]]
    assert [j.id for j in store.list_jobs(limit=2, after=jobs[3][:20])] == [jobs[2], jobs[1]]  # a unique prefix
    for unknown in ("nope-nope", jobs[0][:20] + "\x00"):
        with pytest.raises(StoreError, match="to page after"):
            store.list_jobs(after=unknown)


def test_job_ids_are_32_hex_that_start_with_the_time_in_milliseconds(store):
    before = time.time_ns() // 1_000_000
    ids = []
    for _ in range(3):
        ids.append(submit(store, "x"))
        time.sleep(0.002)
    after = time.time_ns() // 1_000_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(before <= int(i[:12], 16) <= after for i in ids)
    assert len({i[12:] for i in ids}) == 3  # the rest is random
    assert store.get_job(ids[1][:16]).id == ids[1]  # a unique prefix still finds a job


def test_an_old_store_from_0004_gets_its_prompts_and_outputs_indexed(store_url, open_stores):  # noqa: F811
    engine = open_stores(store_url).engine
    drop_every_table(engine)
    (name, _), old = MIGRATIONS[4], MIGRATIONS[:4]
    assert name == "0005_provenance_and_search"
    old_id = uuid.uuid4().hex  # ids made before they sorted by time
    chat = [{"role": "user", "content": "an old conversation about kestrels"}]
    with engine.begin() as c:  # a store made by the release with 0004
        for _, step in old:
            step(c)
        c.execute(sa.text("CREATE TABLE gencli_migrations (name VARCHAR(100) PRIMARY KEY, "
                          "applied_at TIMESTAMP NOT NULL)"))
        for n, _ in old:
            c.execute(sa.text("INSERT INTO gencli_migrations VALUES (:n, CURRENT_TIMESTAMP)"), {"n": n})
        c.execute(sa.text(
            "INSERT INTO jobs (id, kind, model, status, params, priority, created_at, attempts, cancel_requested, "
            "oom_retries, n_items, completion_tokens, run_seconds) VALUES (:id, 'generate', 'm', 'succeeded', '{}', "
            "0, :t, 1, false, 0, 2, 0, 0)"), {"id": old_id, "t": utcnow() - timedelta(days=30)})
        for idx, (prompt, output) in enumerate([("an old prompt about herons", "egrets too"), (chat, None)]):
            c.execute(sa.text("INSERT INTO items (job_id, idx, line, prompt, status, output, epoch) "
                              "VALUES (:j, :i, :l, :p, 'succeeded', :o, 0)"),
                      {"j": old_id, "i": idx, "l": idx + 1, "p": json.dumps(prompt), "o": output})
    assert migrate(engine) == [name for name, _ in MIGRATIONS[4:]]
    store = open_stores(store_url)
    assert found(store, "herons") == found(store, "egrets") == found(store, "kestrels") == {old_id}
    new = submit(store, "a new prompt about herons")
    assert [j.id for j in store.list_jobs(query="herons")] == [new, old_id]
    assert [j.id for j in store.list_jobs(query="herons", after=new)] == [old_id]  # pages across old ids
    assert [j.id for j in store.list_jobs(since=utcnow() - timedelta(days=1))] == [new]


# --- gencli list ---------------------------------------------------------------------------------


@pytest.fixture
def cli(store_url, monkeypatch, tmp_path):  # noqa: F811
    """`gencli list ...` through CliRunner on the test's store (list reads the store alone: no Redis)."""
    from gencli.storage import store as store_module

    monkeypatch.setenv("GENCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GENCLI_DB_URL", store_url)
    yield lambda *args: CliRunner().invoke(main, ["list", *args])
    opened = store_module._stores.pop(store_url, None)  # the CLI's store, shared within this process
    if opened is not None:
        opened.engine.dispose()


def test_gencli_list_q_json_prints_each_job_with_its_matching_lines(cli, store):
    chat = [{"role": "user", "content": "where do puffins\nlive?"}]
    job = submit(store, "nothing here", chat, "puffins again")
    other = submit(store, "no birds")
    run_and_save(store, job, ["a", "On cliffs by the sea, puffins nest.\n" + "x" * 300, "b"])
    r = cli("-q", "puffins", "--json")
    assert r.exit_code == 0, r.output
    (line,) = [json.loads(x) for x in r.output.splitlines()]
    assert set(line) == {"id", "kind", "model", "status", "created_at", "finished_at", "n_items",
                         "completion_tokens", "tokens_per_s", "worker", "device", "matches"}
    assert (line["id"], line["status"], line["n_items"], line["worker"], line["device"]) == (
        job, "succeeded", 3, "w-w", "cpu")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["created_at"]) and line["finished_at"]
    assert line["matches"] == [
        {"line": 2, "custom_id": None, "prompt": chat, "output": "On cliffs by the sea, puffins nest.\n" + "x" * 300},
        {"line": 3, "custom_id": None, "prompt": "puffins again", "output": "b"},
    ]
    r = cli("--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert [x["id"] for x in lines] == [other, job] and "matches" not in lines[0]

    r = cli("-q", "puffins")  # the table: one snippet line under each job, its first match
    assert r.exit_code == 0, r.output
    header, row, snippet = r.output.splitlines()
    assert header.startswith("job") and row.startswith(job)
    assert snippet.startswith("  line 2: where do puffins live? -> On cliffs by the sea, puffins nest. xx")
    assert len(snippet) <= 110 and snippet.endswith("...")


def test_gencli_list_since_and_after(cli, store):
    first = submit(store, "one")
    time.sleep(0.003)
    second = submit(store, "two")
    r = cli("--since", "1h", "--json")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["id"] for x in r.output.splitlines()] == [second, first]
    tomorrow = (utcnow() + timedelta(days=1)).date().isoformat()
    for since in (tomorrow, f"{tomorrow}T00:00", f"{tomorrow}T00:00:00+00:00"):
        r = cli("--since", since, "--json")
        assert r.exit_code == 0 and r.output == "", (since, r.output)
    r = cli("--since", "0001-01-01T00:00+05:00", "--json")  # before the calendar begins, in UTC
    assert r.exit_code == 0 and len(r.output.splitlines()) == 2, r.output
    r = cli("--after", second, "--json")
    assert r.exit_code == 0 and [json.loads(x)["id"] for x in r.output.splitlines()] == [first]
    r = cli("--after", "f" * 32)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no job" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("since", ["yesterday", "2h30m", "-1d", "1y", "2025-13-01"])
def test_gencli_list_refuses_a_bad_since_naming_the_forms(cli, store, since):
    r = cli("--since", since)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "30m, 2h, 3d or 1w" in r.output and "ISO date" in r.output and repr(since) in r.output


@pytest.mark.parametrize("query", ["", "  ", "*()"])
def test_gencli_list_refuses_a_query_without_words_in_one_line(cli, store, query):
    submit(store, "anything")
    r = cli("-q", query)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: nothing to search for")


# --- GET /v1/jobs?q= -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_api_searches_jobs_with_q_and_since(env, client):
    store = client.store
    puffin = submit(store, f"puffins {env['id']}")
    submit(store, "nothing")
    api = start_api(env)
    try:
        url = api.url + "/v1/jobs"
        r = httpx.get(url, params={"q": f"PUFFINS {env['id']}"})
        assert r.status_code == 200, r.text
        assert [j["id"] for j in r.json()["data"]] == [puffin]
        since = (utcnow() + timedelta(hours=1)).isoformat() + "Z"
        assert httpx.get(url, params={"q": "puffins", "since": since}).json()["data"] == []
        for params, param in [({"q": "()"}, "q"), ({"since": "soon"}, "since")]:
            r = httpx.get(url, params=params)
            err = r.json()["error"]
            assert r.status_code == 422 and err["param"] == param and "\n" not in err["message"], r.text
    finally:
        api.stop()
