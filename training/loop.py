"""`prefix-serve train`: learn a prefix for a task on the frozen base model, save it as a PEFT adapter.

The methods are PEFT's own, so the saved folder is exactly what PEFT (and ``POST /prefixes``) loads:
- ``prefix``: P-Tuning v2 / prefix-tuning, per-layer key/value prompts; ``--prefix-projection`` trains
  them through the ChatGLM-style ``Embedding -> Linear -> Tanh -> Linear`` reparameterisation;
- ``p-tuning``: P-Tuning v1, input-layer prompts produced by an MLP or LSTM prompt encoder;
- ``prompt``: prompt tuning, input-layer prompt embeddings trained directly.
PEFT saves the encoder's output, so any reparameterisation is folded into plain tensors on save.

Only the prefix parameters train; the loss covers completion tokens only. Exact-match accuracy is
measured by generating greedily with the serving engine itself (:mod:`training.engine_eval`), from the
artifact parsed as an upload is, so the number printed is what the server will do.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tqdm.auto import tqdm

from prefixes.artifact import PrefixArtifact, flatten_prefix
from prefixes.formats import from_own_format, parse_artifact
from training.engine_eval import EvalPrompt, greedy_generations

METHODS = ("prefix", "p-tuning", "prompt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class TrainingError(ValueError):
    """A problem with the user's data or options; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: Path
    out: Path
    model: str = "default"
    method: str = "prefix"
    num_virtual_tokens: int = 16
    prefix_projection: bool = False
    encoder: str = "mlp"  # p-tuning prompt encoder: mlp or lstm
    encoder_hidden_size: int = 128
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-2
    batch_size: int = 8
    eval: Path | None = None
    seed: int = 0
    init_from: str | None = None
    server: str | None = None  # a prefix-serve URL, for --upload and --init-from TASK
    task: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise TrainingError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.encoder not in ("mlp", "lstm"):
            raise TrainingError("--encoder must be mlp or lstm")
        if self.prefix_projection and self.method != "prefix":
            raise TrainingError("--prefix-projection applies to --method prefix only")
        if self.epochs is not None and self.steps is not None:
            raise TrainingError("give --epochs or --steps, not both")
        for name in ("num_virtual_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1")
        if self.task is not None and self.server is None:
            raise TrainingError("--task needs --upload URL (the server to upload to)")


@dataclass(slots=True)
class Example:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS so the served task knows when to stop
    completion: str


@dataclass(slots=True)
class EpochReport:
    epoch: int
    step: int
    loss: float
    eval_loss: float | None = None
    exact_match: float | None = None


@dataclass(slots=True)
class TrainResult:
    out: Path
    history: list[EpochReport] = field(default_factory=list)
    upload: dict | None = None


# -- data ------------------------------------------------------------------------------------------------


def load_examples(path: Path, tokenizer) -> list[Example]:
    """JSONL lines of ``{"prompt", "completion"}`` or chat ``{"messages": [...]}`` (last turn = answer)."""
    examples = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        prompt, completion = _prompt_and_completion(row, tokenizer, f"{path}:{number}")
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        examples.append(Example(tokenizer(prompt)["input_ids"], completion_ids, completion))
    if not examples:
        raise TrainingError(f"{path}: no examples")
    return examples


def _prompt_and_completion(row, tokenizer, where: str) -> tuple[str, str]:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) \
            and isinstance(row.get("completion"), str):
        return row["prompt"], row["completion"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        messages = row["messages"]
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant" \
                or not isinstance(last.get("content"), str):
            raise TrainingError(f"{where}: the last message must be the assistant's answer")
        if tokenizer.chat_template is None:
            raise TrainingError(f"{where}: chat examples need a model with a chat template")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        return prompt, last["content"]
    raise TrainingError(f'{where}: expected {{"prompt": str, "completion": str}} or {{"messages": [...]}}')


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on completion tokens."""
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.completion_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.completion_ids)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# -- the PEFT model ------------------------------------------------------------------------------------


def peft_config(cfg: TrainConfig):
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                  prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.encoder_hidden_size)
    if cfg.method == "p-tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_reparameterization_type=cfg.encoder.upper(),
                                   encoder_hidden_size=cfg.encoder_hidden_size)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)


def initial_artifact(cfg: TrainConfig, shape) -> PrefixArtifact | None:
    """The artifact named by ``--init-from``: a local folder/file in any accepted format, or a task on the
    server."""
    if cfg.init_from is None:
        return None
    source = Path(cfg.init_from)
    if source.exists():
        files = ({p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} if source.is_dir()
                 else {source.name: source.read_bytes()})
        return parse_artifact(files, shape)
    if cfg.server is None:
        raise TrainingError(f"--init-from {cfg.init_from}: no such folder; to start from a served task, also "
                            "give --upload URL")
    response = httpx.get(f"{cfg.server.rstrip('/')}/prefixes/{cfg.init_from}/artifact", timeout=60)
    if response.status_code != 200:
        raise TrainingError(f"--init-from {cfg.init_from}: the server answered {response.status_code}: "
                            f"{response.text[:200]}")
    return from_own_format(response.content, cfg.init_from)


def initialise_from(peft_model, cfg: TrainConfig, artifact: PrefixArtifact) -> None:
    """Multi-task initialisation: copy an existing prefix into the trainable embedding."""
    if cfg.method == "p-tuning" or cfg.prefix_projection:
        raise TrainingError("--init-from works with --method prefix (without --prefix-projection) or "
                            "prompt: a saved prefix is already folded, so an encoder network cannot be "
                            "recovered from it")
    if artifact.kind.is_deep != (cfg.method == "prefix"):
        raise TrainingError(f"--init-from holds a {artifact.kind.value} prefix, which cannot start --method "
                            f"{cfg.method}")
    flat = flatten_prefix(artifact.tensor) if artifact.kind.is_deep else artifact.tensor
    weight = peft_model.prompt_encoder["default"].embedding.weight
    if flat.shape != weight.shape:
        raise TrainingError(f"--init-from has {artifact.num_virtual_tokens} virtual tokens; pass "
                            f"--num-virtual-tokens {artifact.num_virtual_tokens}")
    with torch.no_grad():
        weight.copy_(flat.to(weight.dtype))


# -- the loop --------------------------------------------------------------------------------------------


def batches(examples: list[Example], batch_size: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


@torch.no_grad()
def eval_loss(peft_model, examples: list[Example], batch_size: int, pad_id: int) -> float:
    peft_model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        total += float(peft_model(**collate(chunk, pad_id)).loss) * len(chunk)
        count += len(chunk)
    return total / count


def exact_match(base, adapter_dir: Path, examples: list[Example]) -> float:
    """Greedy generations with the saved adapter, parsed as an upload is, compared to the completions."""
    artifact = parse_artifact({n: (adapter_dir / n).read_bytes() for n in ADAPTER_FILES}, base.shape)
    prompts = [EvalPrompt(e.prompt_ids, len(e.completion_ids) + 2) for e in examples]
    texts = greedy_generations(base, artifact, prompts)
    correct = sum(t.strip() == e.completion.strip() for t, e in zip(texts, examples, strict=True))
    return correct / len(examples)


def train(cfg: TrainConfig, base) -> TrainResult:
    """``base`` is the loaded base model (frozen; the exact-match evaluation's engine shares it): its
    ``model``, ``tokenizer`` and ``shape``. With ``cfg.eval`` each epoch reports the eval loss and exact
    match."""
    tokenizer = base.tokenizer
    train_set = load_examples(cfg.data, tokenizer)
    eval_set = load_examples(cfg.eval, tokenizer) if cfg.eval else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    start_from = initial_artifact(cfg, base.shape)

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    peft_model = get_peft_model(base.model, peft_config(cfg))
    if start_from is not None:
        initialise_from(peft_model, cfg, start_from)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)

    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else steps_per_epoch * (cfg.epochs or 1)
    result = TrainResult(Path(cfg.out))
    bar = tqdm(total=total_steps, desc=f"train {cfg.method}", disable=not cfg.progress, unit="step")
    step, epoch = 0, 0
    try:
        while step < total_steps:
            epoch += 1
            losses = []
            peft_model.train()
            for batch in batches(train_set, cfg.batch_size, rng):
                if step >= total_steps:
                    break
                loss = peft_model(**collate(batch, pad_id)).loss
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {float(loss)} at step {step}; lower --lr")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            report = EpochReport(epoch, step, sum(losses) / max(len(losses), 1))
            if eval_set:
                report.eval_loss = eval_loss(peft_model, eval_set, cfg.batch_size, pad_id)
                save(peft_model, result.out)
                report.exact_match = exact_match(base, result.out, eval_set)
            result.history.append(report)
            if cfg.progress:
                bar.write(_format_report(report), file=sys.stderr)
        save(peft_model, result.out)
    finally:
        bar.close()
        # Hand the base model back unwrapped and frozen, for serving or another run.
        base.model = peft_model.get_base_model().eval().requires_grad_(False)
    if cfg.task is not None:
        assert cfg.server is not None, "TrainConfig checks that --task comes with --server"
        result.upload = upload(cfg.server, cfg.task, result.out)
    return result


def _format_report(r: EpochReport) -> str:
    parts = [f"epoch {r.epoch} (step {r.step}): loss {r.loss:.4f}"]
    if r.eval_loss is not None:
        parts.append(f"eval loss {r.eval_loss:.4f}")
    if r.exact_match is not None:
        parts.append(f"exact match {r.exact_match:.1%}")
    return ", ".join(parts)


def save(peft_model, out: Path) -> None:
    """PEFT's own save: prompt encoders are run and folded into ``prompt_embeddings``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as stage:
        peft_model.save_pretrained(stage)
        for name in ADAPTER_FILES:
            (Path(stage) / name).replace(out / name)


def upload(server: str, task: str, adapter_dir: Path) -> dict:
    files = [("files", (name, (adapter_dir / name).read_bytes())) for name in ADAPTER_FILES]
    response = httpx.post(f"{server.rstrip('/')}/prefixes/{task}", files=files, timeout=120)
    if response.status_code != 201:
        raise TrainingError(f"upload to {server} failed with {response.status_code}: {response.text[:300]}")
    return response.json()

