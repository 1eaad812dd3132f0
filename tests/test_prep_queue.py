"""Dataset prep as queued jobs: `gencli regen` and `gencli prep --queue` against a real prep worker."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

import pytest
from click.testing import CliRunner
from services import start_worker

from gencli.cli.main import main
from gencli.storage.db import JobStatus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]


@pytest.fixture(scope="module")
def prep_worker(env):
    w = start_worker(env, None, f"prep-{env['id']}@test", "--prep")
    yield w
    w.stop()


def chat_file(path, n, tag):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{tag} question {i}: how are you?"},
                {"role": "assistant", "content": f"{tag} answer {i}: fine, thanks <|im_end|>"},
            ]}) + "\n")
    return path


@pytest.fixture
def config(tmp_path):
    chat_file(tmp_path / "a.jsonl", 40, "alpha")
    chat_file(tmp_path / "b.jsonl", 30, "beta")
    cfg = tmp_path / "datasets.toml"
    cfg.write_text(
        '[defaults]\ntokenizer = "cl100k_base"\nformat = "chatml"\n\n'
        '[[datasets]]\nname = "alpha"\nsource = "chat"\npaths = ["a.jsonl"]\nout = "out/alpha"\n\n'
        '[[datasets]]\nname = "beta"\nsource = "chat"\npath = "b.jsonl"\nout = "out/beta"\nformat = "legacy"\n'
        "loss_mask = true\n"
    )
    return cfg


def test_regen_queues_one_job_per_dataset_and_tail_shows_progress(config, prep_worker, client):
    r = CliRunner().invoke(main, ["regen", "--config", str(config), "--follow"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stdout.splitlines() if " -> " in x]
    assert len(lines) == 2 and "alpha ->" in lines[0] and "beta ->" in lines[1]
    assert "prep chat" in r.stderr  # the progress bar
    out = config.parent / "out"
    for name, n, fmt in (("alpha", 40, "chatml"), ("beta", 30, "legacy")):
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["chat_format"] == fmt
        assert sum(split["conversations"] for split in meta["counts"].values()) == n
        assert (out / name / "train.bin").stat().st_size > 0
    assert (out / "beta" / "train.mask.bin").exists()
    jobs = [client.job(x.split()[0]) for x in lines]
    for job in jobs:
        rec = job.record()
        assert rec.kind == "prep" and rec.status == "succeeded" and rec.worker == prep_worker.name
        assert rec.result["skipped"] is False and rec.result["counts"]
    assert "train: " in r.stdout and " conversations, " in r.stdout and "tokens per turn" in r.stdout  # not raw JSON
    listed = CliRunner().invoke(main, ["list", "--kind", "prep"])
    assert all(j.id in listed.output for j in jobs)
    total = sum(c["tokens"] for c in jobs[0].record().result["counts"].values())
    row = next(x for x in listed.output.splitlines() if x.startswith(jobs[0].id))
    assert f" {total} " in row  # the dataset's tokens, not 0
    shown = CliRunner().invoke(main, ["show", jobs[0].id])
    assert shown.exit_code == 0 and "train: " in shown.output and "tokens per turn" in shown.output, shown.output
    res = CliRunner().invoke(main, ["results", jobs[0].id])
    assert res.exit_code == 0 and json.loads(res.stdout)["counts"] == jobs[0].record().result["counts"]
    text = CliRunner().invoke(main, ["results", jobs[0].id, "--format", "text"])
    assert "tokens per turn" in text.stdout
    events = list(jobs[0].events())
    assert [e["t"] for e in events][0] == "start" and events[-1]["t"] == "end"
    assert any(e["t"] == "progress" and e["done"] == e["total"] == 40 for e in events)


def test_regen_of_unchanged_inputs_is_a_no_op_unless_forced(config, prep_worker, client):
    assert CliRunner().invoke(main, ["regen", "--config", str(config), "--follow"]).exit_code == 0
    train = config.parent / "out" / "alpha" / "train.bin"
    before = train.read_bytes(), train.stat().st_mtime_ns
    again = CliRunner().invoke(main, ["regen", "--config", str(config), "--only", "alpha", "--follow"])
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stdout
    assert train.stat().st_mtime_ns == before[1]
    forced = CliRunner().invoke(main, ["regen", "--config", str(config), "--only", "alpha", "--force", "--follow"])
    assert forced.exit_code == 0, forced.output
    assert train.read_bytes() == before[0] and train.stat().st_mtime_ns != before[1]  # rewritten, same bytes
    job = client.job(forced.stdout.split()[0])
    assert job.record().result["skipped"] is False


def test_prep_queue_flag_submits_a_job(tmp_path, prep_worker, client):
    src = chat_file(tmp_path / "c.jsonl", 12, "gamma")
    r = CliRunner().invoke(main, ["prep", "chat", "--path", str(src), "--out", str(tmp_path / "o"), "--queue"])
    assert r.exit_code == 0, r.output
    job = client.job(r.stdout.strip())
    assert job.wait(60) is JobStatus.SUCCEEDED
    assert (tmp_path / "o" / "meta.json").exists()


def test_prep_job_records_its_files_hashes_and_its_attempts_software(tmp_path, prep_worker, client):
    src = chat_file(tmp_path / "d.jsonl", 20, "delta")
    out = tmp_path / "o"
    argv = ["prep", "chat", "--path", str(src), "--out", str(out), "--loss-mask", "--queue"]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    job = client.job(r.stdout.strip())
    assert job.wait(60) is JobStatus.SUCCEEDED
    result = job.record().result
    data = src.read_bytes()
    assert [(i["path"], i["sha256"], i["bytes"]) for i in result["inputs"]] == [
        (str(src), hashlib.sha256(data).hexdigest(), len(data))]
    assert set(result["outputs"]) == {"train.bin", "val.bin", "train.mask.bin", "val.mask.bin"}
    for name, rec in result["outputs"].items():
        data = (out / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    shown = CliRunner().invoke(main, ["results", job.id, "--format", "jsonl"])
    assert shown.exit_code == 0, shown.output
    assert {k: json.loads(shown.stdout)[k] for k in ("inputs", "outputs")} == {
        k: result[k] for k in ("inputs", "outputs")}
    [attempt] = client.store.attempts(job.id)
    assert attempt.attempt == 1 and attempt.worker == prep_worker.name
    assert attempt.provenance["kind"] == "prep" and attempt.provenance["device"] == "cpu"
    assert attempt.provenance["software"]["gencli"] == metadata.version("gencli")

    again = client.job(CliRunner().invoke(main, argv).stdout.strip())  # up to date: the existing meta's hashes
    assert again.wait(60) is JobStatus.SUCCEEDED
    skipped = again.record().result
    assert skipped["skipped"] is True
    assert (skipped["inputs"], skipped["outputs"]) == (result["inputs"], result["outputs"])
    assert [a.provenance["kind"] for a in client.store.attempts(again.id)] == ["prep"]


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[[datasets]]\nsource = "nope"\nout = "x"\n', "unknown prep source 'nope'"),
        ('[[datasets]]\nsource = "chat"\n', "needs 'out'"),
        ("[defaults]\n", "no [[datasets]] tables"),
        ("not toml ===", "not valid TOML"),
        ('[[datasets]]\nsource = "chat"\nout = "x"\npaths = ["missing.jsonl"]\n', "no such file or directory"),
    ],
)
def test_bad_configs_queue_nothing(tmp_path, client, toml, message):
    cfg = tmp_path / "datasets.toml"
    cfg.write_text(toml)
    before = len(client.store.list_jobs(kind="prep", limit=10_000))
    r = CliRunner().invoke(main, ["regen", "--config", str(cfg)])
    assert r.exit_code == 1 and message in r.output, r.output
    assert len(client.store.list_jobs(kind="prep", limit=10_000)) == before


def test_regen_help_shows_the_config_format_that_its_errors_point_to(tmp_path):
    r = CliRunner().invoke(main, ["regen", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 1 and "see gencli regen --help for its format" in r.output
    h = CliRunner().invoke(main, ["regen", "--help"])
    assert "[defaults]" in h.output and "[[datasets]]" in h.output and 'source = "chitchat"' in h.output
