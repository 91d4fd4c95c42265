"""Choosing every row's next token under its own parameters, for the whole batch at once.

Per step, in vLLM's order: the raw logits give the log-probabilities a request asked for (the model's own
distribution, before anything below); then logit_bias, the repetition / presence / frequency penalties, the
min_tokens mask and the grammar mask edit the logits; then greedy rows take the argmax and the others are
drawn after temperature, top-k and top-p. Each stage is one batched tensor operation over the rows that use
it. The only per-row Python is what is per-request by nature: one uniform number from the request's own
generator (so a seeded request draws the same tokens whatever else is in the batch), the grammar matcher,
and adding the chosen token to the row's penalty counts.

A row that cannot be sampled (non-finite logits, every token masked, a grammar error, an exception) fails on
its own: :meth:`Sampler.sample` reports it in ``errors`` and the other rows get their tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from server.engine.grammar import Grammars
from server.engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)

LogprobEntry = tuple[float, list[tuple[int, float]]]  # (the token's logprob, [(id, logprob)] best first)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request draws the same numbers whatever shares its batch."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def token_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[LogprobEntry]:
    """logits: [m, V]; ``targets``: the m tokens whose log-probability is wanted. Plain lists, one per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [m, V]
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = torch.topk(logprobs, top, dim=-1)  # [m, top], best first
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in targets]
    return list(zip(chosen, tops))


@dataclass(slots=True)
class RowState:
    """Per-request sampling state, made at admission and dropped when the request leaves."""

    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [V] float32: how often each id was generated (penalties)
    seen: torch.Tensor | None = None  # [V] bool: ids in the prompt or the output (repetition penalty)
    matcher: object | None = None  # the grammar matcher (structured outputs)


@dataclass(slots=True)
class SampleResult:
    tokens: list[int]  # one per row; meaningless for the rows in ``errors``
    logprobs: dict[int, LogprobEntry] = field(default_factory=dict)  # row -> entry, for rows that asked
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it could not be sampled


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: frozenset[int],
                 grammars: Grammars | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.grammars = grammars
        self._rows: dict[int, RowState] = {}  # Sequence.id -> its state

    # -- lifecycle ----------------------------------------------------------------------------------------

    def admit(self, seq: Sequence) -> None:
        """Make ``seq``'s state (raises if its grammar cannot be built: the request fails alone)."""
        params, state = seq.params, RowState(generator=make_generator(seq.params, self.device))
        if params.penalised:
            state.counts = torch.zeros(self.vocab_size, device=self.device)
            state.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            if seq.prompt_ids:
                state.seen[torch.tensor(seq.prompt_ids, device=self.device)] = True
            for token in seq.output_ids:
                self._count(state, token)
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured outputs are not available on this engine")
            state.matcher = self.grammars.matcher(params.structured)
        self._rows[seq.id] = state

    def release(self, seq: Sequence) -> None:
        self._rows.pop(seq.id, None)

    @staticmethod
    def _count(state: RowState, token: int) -> None:
        state.counts[token] += 1
        state.seen[token] = True

    # -- one step -----------------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [n, V] next-token logits of the n rows of ``seqs``, in order."""
        logits = logits.float()
        result = SampleResult([0] * len(seqs))
        try:
            result.tokens = self._choose(logits, seqs, result.errors)
        except Exception:  # isolate the culprit: every row on its own (the batch path mutates nothing)
            log.exception("batched sampling failed; sampling row by row")
            result.errors.clear()
            for i, seq in enumerate(seqs):
                try:
                    errors: dict[int, str] = {}
                    result.tokens[i] = self._choose(logits[i: i + 1], [seq], errors)[0]
                    if errors:
                        result.errors[i] = errors[0]
                except Exception as exc:
                    result.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        for i, seq in enumerate(seqs):  # the per-request state moves on only for rows that got a token
            if i in result.errors:
                continue
            try:
                state = self._rows[seq.id]
                if state.counts is not None:
                    self._count(state, result.tokens[i])
                if state.matcher is not None:
                    self.grammars.accept(state.matcher, result.tokens[i])
            except Exception as exc:
                result.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None and i not in result.errors]
        if wanted:
            top = max(seqs[i].params.logprobs for i in wanted)
            entries = token_logprobs(logits[wanted], [result.tokens[i] for i in wanted], top)
            for i, (logprob, tops) in zip(wanted, entries):
                result.logprobs[i] = (logprob, tops[: seqs[i].params.logprobs])
        return result

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence], errors: dict[int, str]) -> list[int]:
        """Tokens for every row of ``logits`` [n, V]; rows that cannot be sampled go to ``errors``.
        Leaves ``logits`` and every row's state untouched."""
        bad = ~torch.isfinite(logits).all(dim=-1)  # [n]
        processed = self._process(logits, seqs, errors)  # [n, V], a copy when anything applies
        # A row is samplable when some token is still allowed and nothing became NaN.
        bad |= torch.isnan(processed).any(dim=-1) | torch.isneginf(processed).all(dim=-1)
        for i in bad.nonzero()[:, 0].tolist():
            if i not in errors:
                errors[i] = ("the model produced non-finite logits for this request (check the task's prefix "
                             "values)" if not torch.isfinite(logits[i]).all() else
                             "no token is allowed here (min_tokens, logit_bias or the grammar exclude them all)")
        tokens = torch.argmax(processed, dim=-1)  # [n]: greedy rows are done
        drawn = [i for i, seq in enumerate(seqs) if not seq.params.greedy and i not in errors]
        if drawn:
            tokens[drawn] = self._draw(processed[drawn], [seqs[i].params for i in drawn],
                                       [self._rows[seqs[i].id].generator for i in drawn])
        return tokens.tolist()

    def _process(self, logits: torch.Tensor, seqs: list[Sequence], errors: dict[int, str]) -> torch.Tensor:
        """logit_bias, penalties, min_tokens and grammar masks, each batched over the rows using it."""
        out = logits
        params = [seq.params for seq in seqs]
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
        penalised = [i for i, p in enumerate(params) if p.penalised]
        banned = [(i, t) for i, seq in enumerate(seqs) if len(seq.output_ids) < seq.params.min_tokens
                  for t in (*self.eos_token_ids, *seq.params.stop_token_ids)]
        guided = [i for i, p in enumerate(params) if p.structured is not None]
        if biased or penalised or banned or guided:
            out = logits.clone()
        if biased:
            rows, ids, values = zip(*biased)
            out.index_put_((self._long(rows), self._long(ids)), torch.tensor(values, device=out.device),
                           accumulate=True)
        if penalised:
            states = [self._rows[seqs[i].id] for i in penalised]
            counts = torch.stack([s.counts for s in states])  # [p, V]
            seen = torch.stack([s.seen for s in states])  # [p, V]
            column = lambda name: torch.tensor([getattr(params[i], name) for i in penalised],
                                               device=out.device)[:, None]  # [p, 1]
            rows = out[penalised]  # [p, V]
            repetition = column("repetition_penalty")
            rows = torch.where(seen, torch.where(rows > 0, rows / repetition, rows * repetition), rows)
            rows -= column("frequency_penalty") * counts + column("presence_penalty") * (counts > 0)
            out[penalised] = rows
        if banned:
            rows, ids = zip(*banned)
            out[self._long(rows), self._long(ids)] = float("-inf")
        if guided:
            mask = self.grammars.allocate_mask(len(guided))  # [g, ceil(V / 32)]
            for j, i in enumerate(guided):
                try:
                    self.grammars.fill_mask(self._rows[seqs[i].id].matcher, mask, j)
                except Exception as exc:
                    errors[i] = str(exc)
            rows = out[guided]
            self.grammars.apply_mask(rows, mask)
            out[guided] = rows
        return out

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits: [m, V] of the sampled rows -> [m] token ids: temperature, top-k, top-p, one draw each.

        Works on each row's logits sorted best first, so top-k and top-p are masks by rank, and draws by
        inverting the cumulative distribution at one uniform number per row from the row's own generator.
        """
        device, (m, vocab) = logits.device, logits.shape
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [m, 1]
        top_k = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None]  # [m, 1]
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]  # [m, 1]
        ordered, order = torch.sort(logits / temperature, dim=-1, descending=True)  # [m, V] each
        ordered.masked_fill_(torch.arange(vocab, device=device)[None] >= top_k, float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        probs.masked_fill_(torch.cumsum(probs, dim=-1) - probs >= top_p, 0.0)
        cdf = torch.cumsum(probs.double(), dim=-1)  # [m, V]; float64 so the tail of 49k ids adds up
        uniform = torch.stack([torch.rand((), generator=g, device=device, dtype=torch.float64)
                               for g in generators])  # [m]
        rank = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)  # [m, 1]
        return order.gather(1, rank.clamp_(max=vocab - 1))[:, 0]

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
