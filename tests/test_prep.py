"""`gencli prep`: every source and format on small real files, exact tokens, splits, masks,
reproducibility, the fingerprint, a killed run, malformed input, and the command itself."""

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gencli.cli.main import main
from gencli.model.chat import ChatFormat
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.prep import chitchat
from gencli.prep.common import read_text
from gencli.prep.encode import EOT, ConversationEncoder
from gencli.prep.run import prepare
from gencli.prep.spec import PrepError, PrepSpec
from gencli.prep.writer import atomic_files

TINY = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say <|im_end|> please"},
     {"role": "assistant", "content": "ok <|im_end|>"}],
    [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": " see you \n\n"}],
]
DAILY = [
    "Say , Jim , how about going for a few beers after dinner ? __eou__ You know that is tempting . __eou__ ",
    "Can you do push-ups ? __eou__ Of course I can . __eou__ Really ? __eou__",
    "The kitchen stinks . __eou__ I'll throw out the garbage . __eou__",
    "So Dick , how about getting some coffee for tonight ? __eou__ Coffee ? I don't honestly like that . __eou__",
    "Are things still going badly ? __eou__ Yes . __eou__ Sorry to hear that . __eou__",
]
FINAL = {"train.bin", "val.bin", "test.bin", "train.mask.bin", "val.mask.bin", "test.mask.bin", "meta.json"}


@pytest.fixture(scope="module")
def chatml():
    return Tokenizer(load_encoding("cl100k_base"), chatml=True)


@pytest.fixture(scope="module")
def legacy():
    return Tokenizer(load_encoding("cl100k_base"), chatml=False)


def write_jsonl(path: Path, rows, *, raw: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw)
    path.write_text("\n".join(lines) + "\n")
    return path


def spec(tmp_path, source, *paths, out="out", **kw) -> PrepSpec:
    return PrepSpec(source=source, out=str(tmp_path / out), paths=tuple(str(p) for p in paths), **kw)


def read_bin(out: Path, name: str, meta: dict) -> np.ndarray:
    return np.fromfile(out / f"{name}.bin", dtype=meta["dtype"])


def split_conversations(ids: np.ndarray, eot: int) -> list[list[int]]:
    out, cur = [], []
    for i in ids.tolist():
        cur.append(i)
        if i == eot:
            out.append(cur)
            cur = []
    assert cur == [], "every conversation ends with <|endoftext|>"
    return out


def all_conversations(out: Path, meta: dict, tok: Tokenizer) -> list[list[int]]:
    return [c for name in meta["counts"] for c in split_conversations(read_bin(out, name, meta), tok.eot_id)]


def files_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --- exact tokens -------------------------------------------------------------------------------


def test_chat_jsonl_chatml_exact_tokens(tmp_path, chatml):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY])
    meta = prepare(spec(tmp_path, "chat", src)).meta
    out = tmp_path / "out"
    assert meta["dtype"] == "uint32"  # cl100k's ids pass 65535
    assert meta["special_ids"] == {"endoftext": 100257, "im_start": 100264, "im_end": 100265}
    convs = all_conversations(out, meta, chatml)
    texts = {chatml.encoding.decode(c) for c in convs}
    assert texts == {
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|endoftext|>",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsay <|im_end|> please<|im_end|>\n"
        "<|im_start|>assistant\nok <|im_end|><|im_end|>\n<|endoftext|>",
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n see you \n\n<|im_end|>\n<|endoftext|>",
    }
    e = chatml.encode
    first = [100264, *e("user\n"), *e("Hi"), 100265, *e("\n"), 100264, *e("assistant\n"), *e("Hello"), 100265,
             *e("\n"), 100257]
    assert first in convs  # real special ids, each text segment encoded on its own
    second = next(c for c in convs if chatml.encoding.decode(c).startswith("<|im_start|>system"))
    assert second.count(100265) == 3 and second.count(100264) == 3  # the literal ones stayed text
    assert meta["literal_special_strings"]["<|im_end|>"] == 2
    assert meta["literal_special_strings"]["<|im_start|>"] == 0
    assert meta["total"] == {"conversations": 3, "turns": 7, "tokens": sum(map(len, convs))}
    assert meta["mean_tokens_per_turn"] == round(sum(map(len, convs)) / 7, 3)
    assert meta["counts"]["val"]["conversations"] == 1  # at least one conversation in val


def test_chat_jsonl_legacy_exact_text(tmp_path, legacy):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY])
    meta = prepare(spec(tmp_path, "chat", src, format="legacy")).meta
    assert meta["special_ids"] == {"endoftext": 100257}
    convs = all_conversations(tmp_path / "out", meta, legacy)
    texts = {legacy.encoding.decode(c) for c in convs}
    assert texts == {
        "Human: Hi\nAssistant: Hello\n<|endoftext|>",
        "Be brief.\nHuman: say <|im_end|> please\nAssistant: ok <|im_end|>\n<|endoftext|>",
        "Human: Bye\nAssistant:  see you \n\n\n<|endoftext|>",
    }
    e = legacy.encode
    assert [*e("Human:"), *e(" Hi\n"), *e("Assistant:"), *e(" Hello\n"), 100257] in convs
    assert all(i < 100257 for c in convs for i in c[:-1])  # only <|endoftext|> is special
    assert meta["literal_special_strings"]["<|im_end|>"] == 2


def test_sharegpt_shape_is_the_same_conversation(tmp_path):
    share = [{"conversations": [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]],
                                 "value": m["content"]} for m in conv]} for conv in TINY]
    a = prepare(spec(tmp_path, "chat", write_jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in TINY]),
                     out="a")).meta
    b = prepare(spec(tmp_path, "chat", write_jsonl(tmp_path / "b.jsonl", share), out="b")).meta
    for name in ("train", "val"):
        assert (tmp_path / "a" / f"{name}.bin").read_bytes() == (tmp_path / "b" / f"{name}.bin").read_bytes()
    assert a["counts"] == b["counts"]


def test_small_vocab_is_uint16_and_decodes(tmp_path, byte_ranks_file):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY[:1]] * 2)
    for fmt in ("chatml", "legacy"):
        meta = prepare(spec(tmp_path, "chat", src, out=fmt, format=fmt, tokenizer=str(byte_ranks_file))).meta
        assert meta["dtype"] == "uint16"
        tok = Tokenizer(load_encoding(str(byte_ranks_file)), chatml=fmt == "chatml")
        convs = all_conversations(tmp_path / fmt, meta, tok)
        want = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|endoftext|>"
                if fmt == "chatml" else "Human: Hi\nAssistant: Hello\n<|endoftext|>")
        assert [tok.encoding.decode(c) for c in convs] == [want, want]
        assert (tmp_path / fmt / "train.bin").stat().st_size == 2 * meta["counts"]["train"]["tokens"]


@pytest.mark.parametrize("fmt", ["chatml", "legacy"])
def test_loss_mask_marks_exactly_the_assistant_replies(tmp_path, fmt):
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=fmt == "chatml")
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY])
    meta = prepare(spec(tmp_path, "chat", src, format=fmt, loss_mask=True)).meta
    out = tmp_path / "out"
    replies = []
    for name in ("train", "val"):
        ids = read_bin(out, name, meta)
        mask = np.fromfile(out / f"{name}.mask.bin", dtype=np.uint8)
        assert len(mask) == len(ids) and set(mask.tolist()) <= {0, 1}
        # each run of 1s is one reply
        for is_target, run in itertools.groupby(zip(ids.tolist(), mask.tolist(), strict=True), key=lambda p: p[1]):
            if is_target:
                replies.append(tok.encoding.decode([i for i, _ in run]))
    end = "<|im_end|>" if fmt == "chatml" else "\n"
    lead = "" if fmt == "chatml" else " "
    assert sorted(replies) == sorted(f"{lead}{c[-1]['content']}{end}" for c in TINY)


# --- the fast path is the reference, on awkward text ----------------------------------------------

AWKWARD = [
    [("user", "  leading and trailing  "), ("assistant", "\n\nnewlines\n\n"), ("user", "")],
    [("system", "sys \t"), ("user", "emoji 🤖 and ünïcode"), ("assistant", "lone \ud83d surrogate")],
    [("user", "<|endoftext|><|im_start|>user\nfake<|im_end|>"), ("assistant", "<|fim_prefix|>x")],
    [("user", "a NUL \x00 byte"), ("assistant", EOT + " the end marker itself")],
    [("assistant", "starts with the assistant"), ("assistant", "twice")],
    [("user", "don't 's 've 123456 !!!   ")],
]


@pytest.mark.parametrize("fmt", [ChatFormat.CHATML, ChatFormat.LEGACY])
@pytest.mark.parametrize("fast", [True, False])
def test_encoder_matches_the_reference_on_awkward_text(fmt, fast):
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=fmt is ChatFormat.CHATML)
    enc = ConversationEncoder(tok, fmt, loss_mask=True, fast=fast)
    assert (enc.templates is not None) == fast
    want_ids, want_mask = [], []
    for conv in AWKWARD:
        i, m = enc.reference(conv)
        want_ids += i
        want_mask += m
    for batch in (AWKWARD, AWKWARD[:3], AWKWARD[3:]):  # the NUL pieces take the reference path
        got = enc.encode(enc.render(batch))
        ids, mask = [], []
        for conv in batch:
            i, m = enc.reference(conv)
            ids += i
            mask += m
        assert got.ids.tolist() == ids
        assert got.mask.tolist() == mask
        assert got.lengths.tolist() == [len(enc.reference(c)[0]) for c in batch]


# --- sources --------------------------------------------------------------------------------------


def write_release(root: Path, *, splits: bool) -> Path:
    rel = root / "ijcnlp_dailydialog"
    rel.mkdir(parents=True)
    (rel / "dialogues_text.txt").write_text("\n".join(DAILY) + "\n")
    if splits:
        for name, lines in (("train", DAILY[:3]), ("validation", DAILY[3:4]), ("test", DAILY[4:])):
            (rel / name).mkdir()
            (rel / name / f"dialogues_{name}.txt").write_text("\n".join(lines) + "\n")
    return rel


def test_dailydialog_release_splits_used_as_given(tmp_path, chatml):
    rel = write_release(tmp_path, splits=True)
    meta = prepare(spec(tmp_path, "dailydialog", rel, loss_mask=True)).meta
    out = tmp_path / "out"
    assert meta["split"]["method"] == "given"
    assert {n: c["conversations"] for n, c in meta["counts"].items()} == {"train": 3, "val": 1, "test": 1}
    assert {n: c["turns"] for n, c in meta["counts"].items()} == {"train": 7, "val": 2, "test": 3}
    assert (out / "test.bin").is_file() and (out / "test.mask.bin").is_file()
    val = split_conversations(read_bin(out, "val", meta), chatml.eot_id)
    assert [chatml.encoding.decode(c) for c in val] == [
        "<|im_start|>user\nSo Dick , how about getting some coffee for tonight ?<|im_end|>\n"
        "<|im_start|>assistant\nCoffee ? I don't honestly like that .<|im_end|>\n<|endoftext|>"
    ]
    assert [i["split"] for i in meta["inputs"]] == ["train", "val", "test"]


def test_dailydialog_text_file_and_folder_split_by_seed(tmp_path, legacy):
    rel = write_release(tmp_path, splits=False)
    a = prepare(spec(tmp_path, "dailydialog", rel, out="a", format="legacy", val_fraction=0.4)).meta
    b = prepare(spec(tmp_path, "dailydialog", rel / "dialogues_text.txt", out="b", format="legacy",
                     val_fraction=0.4)).meta
    assert a["split"]["method"] == "seeded"
    assert a["counts"] == b["counts"]
    assert a["counts"]["val"]["conversations"] == 2 and a["counts"]["train"]["conversations"] == 3
    texts = {legacy.encoding.decode(c) for c in all_conversations(tmp_path / "a", a, legacy)}
    assert "Human: The kitchen stinks .\nAssistant: I'll throw out the garbage .\n<|endoftext|>" in texts
    assert not (tmp_path / "a" / "test.bin").exists()


def chitchat_subset(path: Path, n: int) -> Path:
    """The first n conversations of the package's dataset.json, in the same shape."""
    src = chitchat.default_path()
    items = itertools.islice(chitchat._items(read_text(src), src), n)
    path.write_text(json.dumps({cid: conv for _, cid, conv in items}))
    return path


def test_chitchat_real_subset_matches_the_reference(tmp_path, chatml):
    sub = chitchat_subset(tmp_path / "sub.json", 50)
    meta = prepare(spec(tmp_path, "chitchat", sub, loss_mask=True)).meta
    assert meta["total"]["conversations"] == 50
    assert meta["counts"]["val"]["conversations"] == round(50 * 0.05)
    data = json.loads(sub.read_text())
    enc = ConversationEncoder(chatml, ChatFormat.CHATML, loss_mask=True)
    want = {tuple(enc.reference(chitchat.turns(conv))[0]) for conv in data.values()}
    assert {tuple(c) for c in all_conversations(tmp_path / "out", meta, chatml)} == want
    first = chitchat.turns(next(iter(data.values())))
    assert first[0] == ("user", "Hello\nHow are you doing today?")  # utterances join with "\n"
    assert first[1] == ("assistant", "whats up MD\nim doing good\nhow are you doing?")
    assert [r for r, _ in first] == ["user", "assistant"] * (len(first) // 2) + ["user"] * (len(first) % 2)


def test_chitchat_turns_join_a_senders_messages():
    conv = {"messages": [[{"sender": "a", "text": "hi"}],
                         [{"sender": "a", "text": "there"}, {"sender": "a", "text": " "}],
                         [{"sender": "b", "text": "yo"}], [{"sender": "a", "text": "bye"}]]}
    assert chitchat.turns(conv) == [("user", "hi\nthere"), ("assistant", "yo"), ("user", "bye")]
    with pytest.raises(ValueError, match="third sender"):
        chitchat.turns({"messages": [[{"sender": s, "text": "x"}] for s in "abc"]})


# --- reproducible, skipped when up to date, atomic -------------------------------------------------


def test_reruns_are_byte_identical(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY * 20])
    s = spec(tmp_path, "chat", src, loss_mask=True, val_fraction=0.2)
    prepare(s, force=True)
    first = files_bytes(tmp_path / "out")
    prepare(s, force=True)
    assert files_bytes(tmp_path / "out") == first
    assert set(first) == {"train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "meta.json"}
    other = prepare(spec(tmp_path, "chat", src, loss_mask=True, val_fraction=0.2, seed=7), force=True).meta
    assert other["counts"]["val"]["conversations"] == 12
    assert files_bytes(tmp_path / "out")["val.bin"] != first["val.bin"]  # another seed, another split


def test_fingerprint_skips_until_inputs_or_flags_change(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY])
    s = spec(tmp_path, "chat", src)
    first = prepare(s)
    assert not first.skipped
    stamp = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    again = prepare(s)
    assert again.skipped and again.meta == first.meta
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == stamp
    assert not prepare(s, force=True).skipped
    assert not prepare(spec(tmp_path, "chat", src, format="legacy")).skipped  # flags changed
    assert prepare(spec(tmp_path, "chat", src, format="legacy")).skipped
    write_jsonl(src, [{"messages": m} for m in TINY[:2]])  # input changed
    assert not prepare(spec(tmp_path, "chat", src, format="legacy")).skipped
    (tmp_path / "out" / "val.bin").unlink()  # a file gone
    assert not prepare(spec(tmp_path, "chat", src, format="legacy")).skipped


@pytest.mark.parametrize("given_splits", [False, True])
def test_meta_records_each_input_and_output_files_hash(tmp_path, given_splits):
    src = (write_release(tmp_path, splits=True) if given_splits
           else write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY * 20]))
    s = spec(tmp_path, "dailydialog" if given_splits else "chat", src, loss_mask=True, val_fraction=0.2)
    meta = prepare(s, force=True).meta
    out = tmp_path / "out"
    written = {p.name for p in out.iterdir()} - {"meta.json"}
    assert set(meta["outputs"]) == written == {f for files in meta["files"].values() for f in files.values()}
    for name, rec in meta["outputs"].items():
        data = (out / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    for inp in meta["inputs"]:
        data = Path(inp["path"]).read_bytes()
        assert (inp["sha256"], inp["bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))
    assert "as written" in meta["hashed"]
    first = files_bytes(out)
    assert prepare(s, force=True).meta == meta  # rewritten, same hashes
    assert files_bytes(out) == first  # meta.json included
    again = prepare(s)
    assert again.skipped and again.meta["outputs"] == meta["outputs"]


def test_stale_outputs_of_another_run_are_removed(tmp_path):
    rel = write_release(tmp_path, splits=True)
    prepare(spec(tmp_path, "dailydialog", rel, loss_mask=True))
    prepare(spec(tmp_path, "dailydialog", rel / "dialogues_text.txt"))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"train.bin", "val.bin", "meta.json"}


def test_a_failed_write_leaves_no_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_files(out, ["train.bin", "val.bin"]) as files:
            files["train.bin"].write(b"x" * 100)
            raise RuntimeError("disk on fire")
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_killed_job_leaves_no_partial_file_and_a_rerun_is_identical(tmp_path):
    """SIGKILL `gencli prep` while it writes; the default chitchat data is big enough to catch it."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", "prep", "chitchat", "--out", str(out), "--loss-mask"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(".tmp-" in p.name for p in out.iterdir())):
        if proc.poll() is not None:
            pytest.fail(f"prep ended (exit {proc.returncode}) before a temp file was seen: {proc.stderr.read()!r}")
        assert time.monotonic() < deadline, "no temp file within 120 s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    left = {p.name for p in out.iterdir()}
    assert not left & FINAL, left  # only temp files
    assert left and all(f".tmp-{proc.pid}" in n for n in left)

    rerun = prepare(PrepSpec(source="chitchat", out=str(out), loss_mask=True))  # the package's data by default
    assert not rerun.skipped
    assert rerun.meta["total"]["conversations"] == 7168
    prepare(PrepSpec(source="chitchat", out=str(tmp_path / "clean"), loss_mask=True))
    assert files_bytes(out) == files_bytes(tmp_path / "clean")  # the killed run's temp files are gone too


# --- malformed input ------------------------------------------------------------------------------

BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "unknown role 'tool'"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown from 'bot'"),
    ('{"messages": [{"role": "user", "content": null}]}', "'content' must be a string"),
    ('{"text": "no messages"}', 'expected a "messages"'),
    ('[1, 2]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_malformed_chat_line_is_named_and_nothing_is_written(tmp_path, line, reason):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TINY[0]}], raw=["", line])
    with pytest.raises(PrepError, match=rf"chat\.jsonl:3: .*{re.escape(reason)}"):
        prepare(spec(tmp_path, "chat", src))
    assert not (tmp_path / "out").exists()


def test_skip_bad_skips_and_counts(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY], raw=[b for b, _ in BAD_LINES])
    with open(src, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')  # Latin-1, not UTF-8
    meta = prepare(spec(tmp_path, "chat", src, skip_bad=True)).meta
    assert meta["total"]["conversations"] == 3
    assert meta["malformed"]["skipped"] == len(BAD_LINES) + 1
    assert meta["malformed"]["first"][0].startswith(f"{src.resolve()}:4: invalid JSON")
    assert meta["malformed"]["first"][-1].startswith(f"{src.resolve()}:11: not UTF-8")


def test_dailydialog_line_without_eou_is_named(tmp_path):
    f = tmp_path / "dialogues_text.txt"
    f.write_text("\n".join([DAILY[0], "no end of utterance here", DAILY[1], "ok __eou__ trailing words"]) + "\n")
    with pytest.raises(PrepError, match=r"dialogues_text\.txt:2: no __eou__"):
        prepare(spec(tmp_path, "dailydialog", f))
    assert not (tmp_path / "out").exists()
    meta = prepare(spec(tmp_path, "dailydialog", f, skip_bad=True)).meta
    assert meta["malformed"]["skipped"] == 2 and meta["total"]["conversations"] == 2
    assert "dialogues_text.txt:4: text after the last __eou__" in meta["malformed"]["first"][1]


def test_chitchat_bad_conversation_names_its_id_and_bad_json_its_line(tmp_path):
    good = {"messages": [[{"sender": "a", "text": "hi"}], [{"sender": "b", "text": "hello"}]]}
    f = tmp_path / "cc.json"
    f.write_text(json.dumps({"c1": good, "c2": {"messages": []}, "c3": good}, indent=1))
    with pytest.raises(PrepError, match=r"cc\.json:\d+: conversation c2: empty conversation"):
        prepare(spec(tmp_path, "chitchat", f))
    assert prepare(spec(tmp_path, "chitchat", f, skip_bad=True)).meta["total"]["conversations"] == 2
    f.write_text('{"c1": ' + json.dumps(good) + ',\n "c2": {"messages": [}\n}')
    with pytest.raises(PrepError, match=r"cc\.json:2:\d+: invalid JSON"):
        prepare(spec(tmp_path, "chitchat", f, out="o2", skip_bad=True))  # broken JSON can't be skipped
    assert not (tmp_path / "o2").exists()


def test_missing_inputs_and_bad_specs(tmp_path):
    with pytest.raises(PrepError, match="does not exist"):
        prepare(spec(tmp_path, "chat", tmp_path / "nope.jsonl"))
    with pytest.raises(PrepError, match="needs --path"):
        prepare(spec(tmp_path, "dailydialog"))
    with pytest.raises(PrepError, match="neither dialogues_text.txt"):
        prepare(spec(tmp_path, "dailydialog", tmp_path))
    with pytest.raises(PrepError, match="no conversations"):
        prepare(spec(tmp_path, "chat", write_jsonl(tmp_path / "e.jsonl", [], raw=["", "  "])))
    for bad in ({"source": "reddit"}, {"format": "alpaca"}, {"val_fraction": 0}, {"val_fraction": 1.0},
                {"val_fraction": float("nan")}, {"paths": "a.jsonl"}, {"colour": "red"}):
        with pytest.raises(PrepError):
            PrepSpec.from_dict({"source": "chat", "out": "o", **bad})


def test_spec_round_trips_through_json():
    s = PrepSpec(source="dailydialog", out="o", paths=("a", "b"), format="legacy", seed=3, loss_mask=True)
    assert PrepSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_progress_is_reported_to_the_end(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY * 10])
    calls = []
    prepare(spec(tmp_path, "chat", src), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (30, 30)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --- the command ------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, ["prep", *args])


def test_cli_prep_summary_then_up_to_date(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in TINY])
    out = str(tmp_path / "out")
    r = run("chat", "--path", str(src), "--out", out, "--val_fraction", "0.3", "--loss_mask")
    assert r.exit_code == 0, r.output
    assert "train: 2 conversations" in r.output and "val: 1 conversation, " in r.output
    assert "dtype uint32" in r.output and "tokens per turn" in r.output
    assert (tmp_path / "out" / "val.mask.bin").is_file()
    r = run("chat", "--path", str(src), "--out", out, "--val-fraction", "0.3", "--loss-mask")
    assert r.exit_code == 0 and "up to date" in r.output
    r = run("chat", "--path", str(src), "--out", out, "--val-fraction", "0.3", "--loss-mask", "--force")
    assert r.exit_code == 0 and "train: 2 conversations" in r.output


def test_cli_malformed_input_is_one_line_and_exit_1(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TINY[0]}], raw=["{oops"])
    r = run("chat", "--path", str(src), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1
    assert "chat.jsonl:2: invalid JSON" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = run("chat", "--path", str(src), "--out", str(tmp_path / "out"), "--skip_bad")
    assert r.exit_code == 0, r.output
    assert "skipped 1 malformed" in r.output
    r = run("reddit", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2  # click's own usage error
