"""`gencli generate` and `gencli init-model` through click's CliRunner, on a tiny real model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from gencli.cli.main import main
from gencli.model.checkpoint import create_model, load_model
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(create_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", tokenizer="cl100k_base",
                            chat_format="chatml", seed=1))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCLI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GENCLI_INJECT_OOM", raising=False)
    return tmp_path / "home"


def run(*args, input=None, env=None):
    return CliRunner().invoke(main, list(args), input=input, env=env)


def gen(model_dir, *args, input=None, env=None):
    return run("generate", "--model", model_dir, "--device", "cpu", *args, input=input, env=env)


def greedy(model_dir, prompt, n, chat=False):
    tg = TextGenerator(load_model(model_dir))
    ids = tg.encode(prompt, chat=chat)
    return tg.generate([ids], SamplingParams(max_tokens=n, temperature=0))[0].text


def test_a_jsonl_lines_own_parameters_apply_and_are_checked_as_submit_checks_them(model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hello there", "max_tokens": 3, "custom_id": "short"}) + "\n"
                 + json.dumps({"prompt": "Hello there"}) + "\n")
    out = tmp_path / "out"
    r = gen(model_dir, "--prompt_file", str(f), "--max_tokens", "9", "--temperature", "0", "--out", str(out))
    assert r.exit_code == 0, r.output
    saved = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda x: x["custom_id"] or "")
    assert [x["usage"]["completion_tokens"] for x in saved] == [9, 3]  # the line's own max_tokens
    assert saved[1]["output"] == greedy(model_dir, "Hello there", 3)
    for bad, message in [({"max_tokens": -3}, "p.jsonl:1: max_tokens must be a whole number >= 1"),
                         ({"tempratur": 1}, "p.jsonl:1: unknown parameter(s) tempratur"),
                         ({"top_k": 200.0}, "p.jsonl:1: top_k must be")]:
        f.write_text(json.dumps({"prompt": "x", **bad}) + "\n")
        r = gen(model_dir, "--prompt_file", str(f))
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output


def test_the_prompt_may_be_positional_or_piped_on_stdin(model_dir):
    want = greedy(model_dir, "Hello there", 6)
    r = gen(model_dir, "Hello there", "--max_tokens", "6", "--temperature", "0")
    assert r.exit_code == 0 and r.stdout == want + "\n", r.output
    r = gen(model_dir, "--max_tokens", "6", "--temperature", "0", input="Hello there")
    assert r.exit_code == 0 and r.stdout == want + "\n", r.output


def test_generate_prints_what_the_engine_makes(model_dir):
    r = gen(model_dir, "--prompt", "Hello there", "--max_tokens", "12", "--temperature", "0")
    assert r.exit_code == 0, r.output
    assert r.output == greedy(model_dir, "Hello there", 12) + "\n"


def test_hyphen_and_underscore_spellings_agree(model_dir):
    a = gen(model_dir, "--prompt", "x y", "--max-tokens", "8", "--top-k", "5", "--seed", "3")
    b = gen(model_dir, "--prompt", "x y", "--max_tokens", "8", "--top_k", "5", "--seed", "3")
    assert a.exit_code == 0, a.output
    assert a.output == b.output


def test_seeded_sampling_is_reproducible_and_seeds_differ(model_dir):
    args = ("--prompt", "The sea", "--max_tokens", "16", "--temperature", "1.5", "--top_k", "1000")
    a, b = gen(model_dir, *args, "--seed", "7"), gen(model_dir, *args, "--seed", "7")
    c = gen(model_dir, *args, "--seed", "8")
    assert a.output == b.output
    assert a.output != c.output


def test_prompt_file_each_line_labels_every_prompt(model_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    r = gen(model_dir, "--prompt_file", str(f), "--each-line", "--max_tokens", "6", "--temperature", "0",
            "--batch_size", "2")
    assert r.exit_code == 0, r.output
    assert "=== prompt 1, sample 1 ===" in r.output
    assert "=== prompt 3, sample 1 ===" in r.output
    # batched output is what each prompt gives alone
    assert greedy(model_dir, "second prompt", 6) in r.output.split("=== prompt 3, sample 1 ===\n")[1]


def test_whole_file_is_one_prompt_and_stdin_works(model_dir):
    text = "line one\nline two"
    r = gen(model_dir, "--prompt_file", "-", "--max_tokens", "5", "--temperature", "0", input=text + "\n")
    assert r.exit_code == 0, r.output
    assert r.output == greedy(model_dir, text, 5) + "\n"


def test_jsonl_prompts_and_messages(model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"custom_id": "a", "prompt": "hello"}) + "\n"
        + json.dumps({"custom_id": "b", "messages": [{"role": "user", "content": "hi <|im_end|>"}]}) + "\n"
    )
    out = tmp_path / "out"
    r = gen(model_dir, "--prompt_file", str(f), "--max_tokens", "5", "--temperature", "0", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "=== id a, sample 1 ===" in r.output and "=== id b, sample 1 ===" in r.output
    records = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r["custom_id"])
    assert [r["custom_id"] for r in records] == ["a", "b"]
    assert records[1]["prompt"] == [{"role": "user", "content": "hi <|im_end|>"}]
    assert records[1]["output"] == greedy(model_dir, [{"role": "user", "content": "hi <|im_end|>"}], 5)


def test_out_files_hold_prompt_and_output_and_never_overwrite(model_dir, tmp_path):
    out = tmp_path / "new" / "dir"
    for _ in range(2):
        r = gen(model_dir, "--prompt", "abc", "--num_samples", "2", "--max_tokens", "4", "--out", str(out))
        assert r.exit_code == 0, r.output
    files = sorted(out.glob("*.json"))
    assert len(files) == 4
    rec = json.loads(files[-1].read_text())  # the second run's last sample
    assert rec["prompt"] == "abc"
    assert rec["finish_reason"] in ("length", "stop")
    assert rec["output"] in r.output or rec["output"] == ""
    assert not list(out.glob(".*.tmp"))


def test_chat_wraps_prompt_in_the_models_format(model_dir):
    r = gen(model_dir, "--prompt", "hi", "--chat", "--max_tokens", "6", "--temperature", "0")
    assert r.exit_code == 0, r.output
    assert r.output == greedy(model_dir, "hi", 6, chat=True) + "\n"


def test_verbose_reports_load_device_and_speed(model_dir):
    r = gen(model_dir, "--prompt", "hi", "--max_tokens", "4", "--verbose")
    assert r.exit_code == 0, r.output
    assert "loaded gencli model" in r.output and "cpu" in r.output
    assert "first token after" in r.output and "tokens/s" in r.output
    assert "4 tokens in" in r.output and "finished: length" in r.output
    one = gen(model_dir, "--prompt", "hi", "--max_tokens", "1", "--verbose")
    assert "1 token in" in one.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  "], "empty --prompt"),
        ([], "<stdin> is empty"),  # no prompt given and stdin not a terminal: stdin is the prompt
        (["--prompt", "x", "--interactive"], "give exactly one of PROMPT (or --prompt), --prompt_file or "
                                             "--interactive"),
        (["--prompt", "x", "--stop", ""], "a stop string cannot be empty"),
        (["--interactive", "--max_tokens", "300"], "--max_tokens 300 does not fit the interactive chat"),
        (["--prompt", "x", "--max_tokens", "0"], "--max_tokens"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--top_p", "0"], "--top_p"),
        (["--prompt", "x", "--top_p", "1.5"], "--top_p"),
        (["--prompt", "x", "--top_k", "-1"], "--top_k"),
        (["--prompt", "x", "--device", "cuda:3"], "device cuda:3 is not available"),
        (["--prompt", "x", "--device", "tpu"], "unknown device"),
        (["--prompt", "x", "--max_tokens", "300"], "leaves no room for a prompt"),
        (["--prompt", "word " * 300, "--max_tokens", "10"], "exceeds the model's context of 256 tokens"),
        (["--prompt_file", "/nonexistent/p.txt"], "no such prompt file"),
        (["--prompt", "x", "--each-line"], "--each-line goes with --prompt_file"),
    ],
)
def test_bad_input_gets_a_one_line_error(model_dir, args, message):
    r = gen(model_dir, *args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\n  \n", "is empty"),
        (b"good line\n\xff\xfebad\n", ":2: not UTF-8 text"),
    ],
)
def test_bad_prompt_files(model_dir, tmp_path, content, message):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    r = gen(model_dir, "--prompt_file", str(f), "--each-line")
    assert r.exit_code == 1
    assert message in r.output


def test_bad_jsonl_line_is_named(model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n{"messages": [{"role": "robot", "content": "x"}]}\n')
    r = gen(model_dir, "--prompt_file", str(f))
    assert r.exit_code == 1 and "p.jsonl:2: not valid JSON" in r.output
    f.write_text('{"prompt": "ok"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    r = gen(model_dir, "--prompt_file", str(f))
    assert r.exit_code == 1 and "p.jsonl:2: unknown role 'robot'" in r.output


def test_directory_as_prompt_file(model_dir, tmp_path):
    r = gen(model_dir, "--prompt_file", str(tmp_path))
    assert r.exit_code == 1 and "is a directory" in r.output


def test_truncate_keeps_the_newest_tokens(model_dir):
    long = "word " * 300
    r = gen(model_dir, "--prompt", long, "--max_tokens", "10", "--truncate", "--temperature", "0")
    assert r.exit_code == 0, r.output


def test_missing_model_is_a_clear_error(tmp_path):
    r = run("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.exit_code == 1 and "no model at" in r.output


def test_out_of_memory_runs_fewer_sequences_at_once_and_changes_no_output(model_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\nd\n")
    args = ("--prompt_file", str(f), "--each-line", "--batch_size", "4", "--max_tokens", "3", "--temperature", "0")
    clean = gen(model_dir, *args)
    r = gen(model_dir, *args, env={"GENCLI_INJECT_OOM": "2"})
    assert r.exit_code == 0, r.output
    assert "[out of memory on cpu at 4 sequences: going on with 2]" in r.stderr
    assert "[out of memory on cpu at 2 sequences: going on with 1]" in r.stderr
    assert r.stdout == clean.stdout and "=== prompt 4, sample 1 ===" in r.stdout


def test_out_of_memory_at_one_sequence_is_a_clear_error(model_dir):
    r = gen(model_dir, "--prompt", "a", "--max_tokens", "3", env={"GENCLI_INJECT_OOM": "1"})
    assert r.exit_code == 1
    assert "out of memory on cpu generating 1 sequence" in r.output and "Traceback" not in r.output


def test_interactive_chat_keeps_history_and_saves_exchanges(model_dir, home, tmp_path):
    out = tmp_path / "chats"
    r = gen(model_dir, "--interactive", "--max_tokens", "5", "--temperature", "0", "--out", str(out),
            input="hello there\n/reset\nsecond question\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "(conversation reset)" in r.output
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [rec["prompt"][-1]["content"] for rec in records] == ["hello there", "second question"]
    assert len(records[1]["prompt"]) == 1  # /reset dropped the first exchange
    assert records[0]["output"] == greedy(model_dir, [{"role": "user", "content": "hello there"}], 5)
    history = (home / "history").read_text()
    assert "hello there" in history and "second question" in history
    # the history persists: a second session adds to it
    r = gen(model_dir, "--interactive", "--max_tokens", "3", input="third\n")
    assert r.exit_code == 0, r.output  # end of input exits cleanly
    history = (home / "history").read_text()
    assert "hello there" in history and "third" in history


def test_text_that_is_not_utf8_is_refused_by_generate_and_the_interactive_chat_goes_on(model_dir, home, tmp_path):
    # a real process: Python decodes the argument with surrogateescape, so the byte 0xff arrives as U+DCFF
    env = {**os.environ, "GENCLI_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "gencli.cli", "generate", "--model", model_dir, b"abc\xff"], env=env,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 1
    assert r.stderr == b"Error: --prompt: not valid UTF-8 (byte 0xff at character 3): give UTF-8 text\n"

    out = tmp_path / "chats"
    r = gen(model_dir, "--interactive", "--max_tokens", "3", "--temperature", "0", "--out", str(out),
            input=b"abc\xffdef\nhello\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("error: not valid UTF-8 (byte 0xff at character 3): give UTF-8 text (the line was not "
                          "sent)\n") == 1 and "Traceback" not in r.output
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]  # the next line was answered
    assert record["prompt"] == [{"role": "user", "content": "hello"}]
    assert "abc" not in (home / "history").read_text()


def test_init_model_writes_a_loadable_model(tmp_path):
    r = run("init-model", str(tmp_path / "m"), "--chat-format", "legacy")
    assert r.exit_code == 0, r.output
    loaded = load_model(tmp_path / "m")
    assert loaded.chat_format.value == "legacy" and loaded.tokenizer.spec_name == "cl100k_base"


def _spawn(args, home):
    env = dict(os.environ, GENCLI_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "gencli.cli", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_ctrl_c_keeps_partial_output_and_second_ctrl_c_exits_130(tmp_path, home):
    model = create_model(tmp_path / "m", preset="small", tokenizer="cl100k_base", chat_format="chatml")
    out = tmp_path / "out"
    p = _spawn(["generate", "--model", str(model), "--device", "cpu", "--prompt", "go", "--num_samples", "50",
                "--max_tokens", "500", "--out", str(out)], home)
    try:
        assert p.stdout.readline().startswith(b"=== prompt 1, sample 1")
        assert p.stdout.read(10)  # generation is under way
        p.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        while not list(out.glob("*.json")) and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        p.kill()
    err = p.stderr.read().decode()
    assert "[interrupted: kept what was generated; the next prompts go on, Ctrl-C again to quit]" in err
    assert "Traceback" not in err
    records = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    assert 1 <= len(records) < 50
    assert records[0]["finish_reason"] == "cancelled" and records[0]["output"]


@pytest.mark.slow
def test_ctrl_c_at_the_interactive_prompt_exits_130(model_dir, home):
    p = _spawn(["generate", "--model", model_dir, "--interactive"], home)
    try:
        assert b"Chatting" in p.stderr.readline()
        assert p.stdout.read(2) == b"> "  # the loop is at its prompt...
        # ...and blocked reading stdin: a SIGINT that lands between the prompt's write and the read
        # is only noticed by Python at the next bytecode, which a blocked read never reaches
        deadline = time.time() + 30
        while not Path(f"/proc/{p.pid}/wchan").read_text().endswith("pipe_read"):
            assert time.time() < deadline, "the interactive loop never blocked on its input"
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        p.kill()
    assert b"Traceback" not in p.stderr.read()


def test_default_max_tokens_fits_a_small_context(model_dir, tmp_path):
    out = tmp_path / "o"
    r = gen(model_dir, "--prompt", "hello", "--temperature", "0", "--out", str(out))
    assert r.exit_code == 0, r.output
    (rec,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert rec["params"]["max_tokens"] == 128  # half the tiny model's 256-token context
    assert rec["params"] == {"max_tokens": 128, "temperature": 0.0, "top_k": 200, "top_p": 1.0, "stop": []}
    assert rec["seed"] is None
    assert rec["usage"]["completion_tokens"] <= 128


def test_structured_output_and_sampling_options_from_the_command_line(model_dir, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out = tmp_path / "out"
    r = gen(model_dir, "Hello", "--json-schema", str(tmp_path / "s.json"), "--max_tokens", "30", "--temperature",
            "1", "--seed", "4", "--num_samples", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    saved = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(saved) == 3 and saved[0]["params"]["structured"] == {"json": schema}
    for x in saved:
        if x["finish_reason"] == "stop":
            jsonschema.validate(json.loads(x["output"]), schema)
    r = gen(model_dir, "Hello", "--choice", "yes", "--choice", "no", "--seed", "1", "--temperature", "1")
    assert r.exit_code == 0 and r.stdout.strip() in ("yes", "no"), r.output
    r = gen(model_dir, "Hello", "--max_tokens", "5", "--temperature", "0", "--ignore-eos", "--min-p", "0.1",
            "--presence-penalty", "0.5", "--logit-bias", "15=-100", "--stop-token-id", "198")
    assert r.exit_code == 0, r.output
    for args, message in [(["--regex", "(?=a)"], "structured.regex cannot be enforced"),
                          (["--choice", "a", "--regex", "b"], "give one of --json-schema, --regex, --choice"),
                          (["--logit-bias", "x"], "use ID=BIAS"),
                          (["--min-p", "2"], "min_p must be a number from 0 to 1"),
                          (["--logit-bias", "999999=1"], "logit_bias: token id 999999 is not in the model's")]:
        r = gen(model_dir, "Hello", *args)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, (args, r.output)
