"""EleutherAI's lm-evaluation-harness, for real: `lm-eval run --model local-completions` against a real
`gencli serve` and worker, on the multiple-choice and generation tasks of tests/data/lmeval (loaded
from there, no download), with `tokenizer_backend=remote` (gencli's /tokenize and /tokenizer_info)
and both `tokenized_requests` settings. The model is a Hugging Face GPT-2 checkpoint (random
weights over cl100k_base), so the harness's log-likelihoods are checked twice: bit for bit against
gencli's model run in-process, and within 1e-4 nats per token against transformers' own forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from services import start_api, start_worker

from gencli.model.checkpoint import load_model
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: pip install -e '.[dev]'")

# the harness sees only the HTTP API: one store is enough (the queue's tests cover both)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env"),
              pytest.mark.parametrize("env", ["sqlite"], indirect=True)]

TASKS = Path(__file__).parent / "data" / "lmeval"
MODEL = "gpt2-birds"


@pytest.fixture(scope="module")
def gpt2(env) -> Path:
    """A GPT-2 checkpoint as transformers saves it: config.json and model.safetensors."""
    config = transformers.GPT2Config(vocab_size=100288, n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                     bos_token_id=100257, eos_token_id=100257)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = env["tmp"] / "gpt2-birds"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(env, gpt2):
    w = start_worker(env, str(gpt2), f"lmeval-{env['id']}@test", "--model-name", MODEL, "--tokenizer", "cl100k_base",
                     "--chat-format", "legacy", "--batch_size", "4")
    api = start_api(env)
    yield api
    api.stop()
    w.stop()


def lm_eval(api, out: Path, tokenized: bool) -> dict[str, list[dict]]:
    """Run the harness on both tasks; each task's logged samples."""
    args = (f"base_url={api.url}/v1/completions,model={MODEL},tokenizer_backend=remote,"
            f"tokenized_requests={tokenized},max_length=256,num_concurrent=2,max_retries=1,timeout=120")
    cmd = [str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "local-completions", "--model_args", args,
           "--include_path", str(TASKS), "--tasks", "gencli_birds_mc,gencli_birds_gen", "--output_path", str(out),
           "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    samples = {}
    for task in ("gencli_birds_mc", "gencli_birds_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_local_completions_runs_both_tasks_and_its_numbers_equal_the_model_in_process(
        served, gpt2, tmp_path, tokenized):
    samples = lm_eval(served, tmp_path / "out", tokenized)
    loaded = load_model(str(gpt2), tokenizer="cl100k_base", chat_format="legacy")
    gen, tok = TextGenerator(loaded), loaded.tokenizer
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2).eval()

    mc = samples["gencli_birds_mc"]
    assert len(mc) == 4 and all(len(s["resps"]) == len(s["doc"]["choices"]) for s in mc)
    for s in mc:
        for (args, (ll, greedy)) in zip(s["arguments"].values(), (r[0] for r in s["resps"]), strict=True):
            ll, greedy = float(ll), str(greedy) == "True"  # (the samples file writes them as text, exactly)
            context, continuation = args["arg_0"], args["arg_1"]
            ctx, cont = tok.encode(context), tok.encode(continuation)
            # gencli's model alone, in-process: the same floats, summed as the harness sums them
            batch = gen.stream([ctx + cont], SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1))
            for _ in batch:
                pass
            entries = batch.seqs[0].prompt_logprobs[len(ctx):]
            assert ll == sum(e.logprob for e in entries), (context, continuation)
            assert greedy == all(e.logprob == e.top[0][1] for e in entries)
            # transformers' GPT-2 forward, in float32
            with torch.inference_mode():
                logits = hf(torch.tensor([ctx + cont])).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            want = sum(lp[len(ctx) + k - 1, t].item() for k, t in enumerate(cont))
            assert abs(ll - want) <= 1e-4 * len(cont), (ll, want)

    generated = samples["gencli_birds_gen"]
    assert len(generated) == 3
    for s in generated:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        (stream,) = gen.generate([tok.encode(context)], SamplingParams(max_tokens=12, temperature=0,
                                                                       stop=("\n", "<|endoftext|>")))
        assert s["resps"] == [[stream.text]], context
