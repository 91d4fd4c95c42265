"""Real clients from PyPI against the real server process: lm-eval's ``local-completions`` (multiple choice
scored from prompt logprobs, and generate_until) on an uploaded PEFT prefix-tuning task.

The multiple-choice task is a local YAML + JSONL written here (no hub access: HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE are set). Its expected accuracy, and every loglikelihood lm-eval computes, come from
PEFT's own forward pass over the same tokens. lm-eval finds the server's tokenizer through /tokenizer_info,
/tokenize and /detokenize (its "remote" tokenizer backend), so the server decides every token boundary.

Run: PREFIX_SERVE_CACHE=/tmp/pscache .venv/bin/python -m pytest -q tests/api/test_clients.py
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

from server.example import QUESTIONS  # the shipped example's questions: one list
from tests.helpers.server_process import ServerSpec
from tests.helpers.support import make_adapter

pytestmark = [pytest.mark.long, pytest.mark.slow]

TASK = "qa-prefix"
SHORT_ANSWERS = [("Q: What is the capital of Italy?\nA:", "Rome"), ("Q: What color is the sky?\nA:", "Blue"),
                 ("Q: How many legs does a dog have?\nA:", "Four")]


@pytest.fixture(scope="module")
def adapter(default_model, tmp_path_factory):
    """A PEFT prefix-tuning adapter for the default model, and PEFT's model for it (the oracle)."""
    return make_adapter(default_model, "prefix", 8, tmp_path_factory.mktemp("adapter"), seed=5, scale=0.2)


@pytest.fixture(scope="module")
def server_spec(adapter) -> ServerSpec:
    return ServerSpec(uploads={TASK: adapter.files}, startup_timeout=300, stop_timeout=10, clean_log=True)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """lm-eval tasks as local files: a multiple-choice one and a generate_until one."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    with open(folder / "mc.jsonl", "w") as f:
        f.writelines(json.dumps({"question": question, "choices": choices, "label": label}) + "\n"
                     for question, choices, label in QUESTIONS)
    with open(folder / "short.jsonl", "w") as f:
        f.writelines(json.dumps({"question": question, "answer": answer}) + "\n"
                     for question, answer in SHORT_ANSWERS)
    (folder / "ps_mc.yaml").write_text(f"""task: ps_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    (folder / "ps_short.yaml").write_text(f"""task: ps_short
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "short.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return folder


def run_lm_eval(server, task_dir, task: str, **kwargs) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": TASK, "base_url": f"{server.url}/v1/completions", "num_concurrent": 1,
                    "max_retries": 1, "tokenized_requests": True},
        tasks=[task], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
        **kwargs)


@torch.no_grad()
def peft_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of PEFT's log-probabilities of ``continuation`` after ``context``, split into tokens the way
    lm-eval splits them (encode the whole, the continuation is what follows the context's tokens)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(whole):].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def test_lm_eval_multiple_choice_accuracy_equals_peft(server, task_dir, adapter, default_model):
    results = run_lm_eval(server, task_dir, "ps_mc", batch_size=4)
    accuracy = results["results"]["ps_mc"]["acc,none"]
    expected = []
    for question, choices, label in QUESTIONS:
        scores = [peft_loglikelihood(adapter.oracle, default_model.tokenizer, question, " " + c)
                  for c in choices]
        expected.append((scores, label))
    # not only the accuracy: every loglikelihood lm-eval got from the server is PEFT's
    samples = sorted(results["samples"]["ps_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    for sample, (scores, _) in zip(samples, expected):
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(scores, abs=1e-3), sample["doc"]
    peft_accuracy = sum(max(range(len(s)), key=s.__getitem__) == label
                        for s, label in expected) / len(expected)
    assert accuracy == pytest.approx(peft_accuracy)
    # the task matters: the bare model scores the same questions differently
    base = [peft_loglikelihood(default_model.model, default_model.tokenizer, q, " " + c[0])
            for q, c, _ in QUESTIONS]
    assert max(abs(b - s[0]) for b, (s, _) in zip(base, expected)) > 0.05


def test_lm_eval_generate_until_equals_the_served_completion(server, task_dir):
    results = run_lm_eval(server, task_dir, "ps_short", batch_size=2)
    samples = sorted(results["samples"]["ps_short"], key=lambda s: s["doc_id"])
    assert len(samples) == len(SHORT_ANSWERS)
    for sample, (question, _) in zip(samples, SHORT_ANSWERS):
        r = httpx.post(f"{server.url}/generate", params={"task": TASK}, timeout=120,
                       json={"prompt": question, "max_new_tokens": 8, "stop": ["\n"]})
        assert r.status_code == 200, r.text
        assert sample["resps"][0][0] == r.json()["text"]
    assert "exact_match,none" in results["results"]["ps_short"]


def test_guidellm_short_run_has_no_errors(server, tmp_path):
    """guidellm's OpenAI HTTP backend, 2 concurrent streams for a few seconds on the served task (loopback
    only): every request it made succeeded or was still running when the time was up, none errored."""
    import subprocess
    import sys

    from server.engine.model import default_model_dir

    # guidellm loads the tokenizer as from_pretrained(<model name>): a folder named like the task, here,
    # holds the base model's tokenizer, so nothing is downloaded
    (tmp_path / TASK).symlink_to(default_model_dir())
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={server.url},model={TASK}",
           "--profile", "kind=concurrent,streams=2", "--constraint", "kind=max_duration,seconds=4",
           "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
           "--output", f"kind=json,path={report}", "--disable-console-interactive"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [benchmark] = json.loads(report.read_text())["benchmarks"]
    made = benchmark["scheduler_metrics"]["requests_made"]
    assert made["errored"] == 0 and made["successful"] >= 1, made
