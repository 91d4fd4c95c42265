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
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.grammar import Grammars
from server.engine.sequence import Sampling, Sequence

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger(__name__)

LogprobEntry = tuple[float, list[tuple[int, float]]]  # (the token's logprob, [(id, logprob)] best first)


def make_generator(params: Sampling, device: torch.device) -> torch.Generator | None:
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


def _invert(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs: [m, W] (rows need not sum to 1), uniform: [m] in [0, 1) -> [m] column of each row's draw."""
    cdf = torch.cumsum(probs.double(), dim=-1)  # float64, so the tail of 49k probabilities adds up
    column = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]  # first cdf > u
    return column.clamp_(max=probs.shape[-1] - 1)


@dataclass(slots=True)
class RowState:
    """Per-request sampling state, made at admission and dropped when the request leaves."""

    generator: torch.Generator | None = None
    prompt: frozenset[int] = frozenset()  # the prompt's ids, when the repetition penalty counts them
    matcher: llguidance.LLMatcher | None = None  # the grammar matcher (structured outputs)


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
        self._pool: ThreadPoolExecutor | None = None  # fills grammar masks while the forward runs
        # (Sequence.id -> mask row, masks [g, ceil(V / 32)], the fill's outcome) for the coming step
        self._prefetched: tuple[dict[int, int], torch.Tensor, Future] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def admit(self, seq: Sequence) -> None:
        """Make ``seq``'s state (raises if its grammar cannot be built: the request fails alone)."""
        params, state = seq.params, RowState(generator=make_generator(seq.params, self.device))
        if params.repetition_penalty != 1.0:
            state.prompt = frozenset(seq.prompt_ids)
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured outputs are not available on this engine")
            state.matcher = self.grammars.matcher(params.structured)
        self._rows[seq.id] = state

    def release(self, seq: Sequence) -> None:
        self._rows.pop(seq.id, None)

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
                except Exception as exc:  # noqa: BLE001 - any failure fails this row's request alone
                    result.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        self._prefetched = None  # used up: the matchers move on below
        for i, seq in enumerate(seqs):  # the per-request state moves on only for rows that got a token
            if i in result.errors:
                continue
            try:
                state = self._rows[seq.id]
                if state.matcher is not None:
                    assert self.grammars is not None, "a matcher was made by the grammars"
                    self.grammars.accept(state.matcher, result.tokens[i])
            except Exception as exc:  # noqa: BLE001 - any failure fails this row's request alone
                result.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        wanted = [i for i, seq in enumerate(seqs)
                  if seq.params.logprobs is not None and i not in result.errors]
        if wanted:
            top = max(seqs[i].params.logprobs or 0 for i in wanted)  # all set: ``wanted`` checked it
            entries = token_logprobs(logits[wanted], [result.tokens[i] for i in wanted], top)
            for i, (logprob, tops) in zip(wanted, entries):
                result.logprobs[i] = (logprob, tops[: seqs[i].params.logprobs])
        return result

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence], errors: dict[int, str]) -> list[int]:
        """Tokens for every row of ``logits`` [n, V]; rows that cannot be sampled go to ``errors``.
        Leaves ``logits`` and every row's state untouched."""
        processed = self._process(logits, seqs, errors)  # [n, V], a copy when anything applies
        # One pass finds the greedy tokens and the broken rows: the max is NaN if any logit is NaN (max
        # propagates it), +inf if one is +inf, and -inf if every token is masked. (A [n, V] isfinite()
        # costs several passes; the 0-2 broken rows are examined alone.)
        best, tokens = processed.max(dim=-1)  # [n] each: greedy rows are done
        for i in (~torch.isfinite(best)).nonzero()[:, 0].tolist():
            if i not in errors:
                errors[i] = ("the model produced non-finite logits for this request (check the task's "
                             "prefix values)" if not torch.isfinite(logits[i]).all() else
                             "no token is allowed here (min_tokens, logit_bias or the grammar exclude them "
                             "all)")
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
            self._penalise(out, penalised, seqs)
        if banned:
            rows, ids = zip(*banned)
            out[self._long(rows), self._long(ids)] = float("-inf")
        if guided:
            assert self.grammars is not None, "admission refuses structured outputs without grammars"
            mask = self._masks([seqs[i] for i in guided], [i for i in guided], errors)  # [g, ceil(V / 32)]
            guided_logits = out[guided]
            self.grammars.apply_mask(guided_logits, mask)
            out[guided] = guided_logits
        return out

    # -- grammar masks, overlapped with the forward -------------------------------------------------------

    def prefetch_masks(self, seqs: list[Sequence]) -> None:
        """Start filling the grammar masks of the guided requests among ``seqs`` on a helper thread, so that
        they are computed while the forward runs instead of after it. A matcher moves only when its row's
        token is committed after sampling, so a mask computed before the forward is the one sampling needs.
        (llguidance computes masks in native code; the helper runs no torch kernels, so it never starts a
        second OpenMP team.)"""
        guided = [seq for seq in seqs if seq.params.structured is not None and seq.id in self._rows]
        self._prefetched = None
        if not guided:
            return
        grammars = self.grammars
        assert grammars is not None, "admission refuses structured outputs without grammars"
        matchers = [self._rows[seq.id].matcher for seq in guided]
        mask = grammars.allocate_mask(len(guided))  # [g, ceil(V / 32)]

        def fill() -> dict[int, str]:
            failed = {}
            for j, matcher in enumerate(matchers):
                try:
                    assert matcher is not None, "admission made every guided row's matcher"
                    grammars.fill_mask(matcher, mask, j)
                except Exception as exc:  # noqa: BLE001 - this row's grammar failed: that request fails, not the step
                    failed[j] = str(exc)
            return failed

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefix-serve-grammar")
        self._prefetched = ({seq.id: j for j, seq in enumerate(guided)}, mask, self._pool.submit(fill))

    def _masks(self, seqs: list[Sequence], rows: list[int], errors: dict[int, str]) -> torch.Tensor:
        """[len(seqs), ceil(V / 32)] masks of the guided ``seqs`` (at ``rows``): the prefetched ones when
        every row was prefetched, else computed here. A row whose grammar fails goes to ``errors``."""
        if self._prefetched is not None and all(seq.id in self._prefetched[0] for seq in seqs):
            index, mask, pending = self._prefetched
            failed = pending.result()
            picks = [index[seq.id] for seq in seqs]
            for row, j in zip(rows, picks):
                if j in failed:
                    errors[row] = failed[j]
            return mask[picks]
        assert self.grammars is not None, "admission refuses structured outputs without grammars"
        mask = self.grammars.allocate_mask(len(seqs))
        for j, (seq, row) in enumerate(zip(seqs, rows)):
            try:
                matcher = self._rows[seq.id].matcher
                assert matcher is not None, "admission made every guided row's matcher"
                self.grammars.fill_mask(matcher, mask, j)
            except Exception as exc:  # noqa: BLE001 - this row's grammar failed: that request fails, not the step
                errors[row] = str(exc)
        return mask

    def _penalise(self, out: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
        """Penalties on ``out`` [n, V] in place, for ``rows`` (indices into ``seqs``).

        Only the ids a row has seen change, so the edit is sparse: one gather/scatter over every (row, id)
        pair of the batch rather than dense [n, V] count tensors. Repetition (CTRL / Hugging Face, over
        prompt and output ids) comes first, then OpenAI's frequency and presence penalties (output ids).
        """
        seen_rows: list[int] = []
        seen_ids: list[int] = []
        seen_penalty: list[float] = []
        hit_rows: list[int] = []
        hit_ids: list[int] = []
        hit_deltas: list[float] = []
        for i in rows:
            params, counts = seqs[i].params, Counter(seqs[i].output_ids)
            if params.repetition_penalty != 1.0:
                seen = self._rows[seqs[i].id].prompt | counts.keys()
                seen_rows += [i] * len(seen)
                seen_ids += seen
                seen_penalty += [params.repetition_penalty] * len(seen)
            if params.frequency_penalty or params.presence_penalty:
                hit_rows += [i] * len(counts)
                hit_ids += counts.keys()
                hit_deltas += [-(params.frequency_penalty * c + params.presence_penalty)
                               for c in counts.values()]
        if seen_rows:
            index = (self._long(seen_rows), self._long(seen_ids))
            values, penalty = out[index], torch.tensor(seen_penalty, device=out.device)  # [s] each
            out[index] = torch.where(values > 0, values / penalty, values * penalty)
        if hit_rows:
            out.index_put_((self._long(hit_rows), self._long(hit_ids)),
                           torch.tensor(hit_deltas, device=out.device), accumulate=True)

    def _draw(self, logits: torch.Tensor, params: list[Sampling],
              generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits: [m, V] of the sampled rows -> [m] token ids: temperature, top-k, top-p, one draw each.

        Each row draws by inverting its cumulative distribution at one uniform number from its own generator
        (so its tokens do not depend on its neighbours). Rows that cut the distribution (top-k, top-p) work
        on their best ``K`` logits sorted best first, where both cuts are masks by rank; ``K`` is the largest
        top-k among them, or the whole vocabulary (a full sort, the costly case) when one has top-p alone.
        """
        device, vocab = logits.device, logits.shape[-1]
        uniform = torch.stack([torch.rand((), generator=g, device=device, dtype=torch.float64)
                               for g in generators])  # [m]
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [m, 1]
        logits = logits / temperature
        tokens = torch.empty(len(params), dtype=torch.long, device=device)
        cut = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1]
        plain = [i for i, p in enumerate(params) if not (p.top_k or p.top_p < 1)]
        if plain:
            tokens[plain] = _invert(torch.softmax(logits[plain], dim=-1), uniform[plain])
        if cut:
            top_k = [params[i].top_k or vocab for i in cut]
            ordered, order = torch.topk(logits[cut], min(max(top_k), vocab), dim=-1)  # [c, K], best first
            ranks = torch.arange(ordered.shape[-1], device=device)[None]
            ordered.masked_fill_(ranks >= torch.tensor(top_k, device=device)[:, None], float("-inf"))
            probs = torch.softmax(ordered, dim=-1)
            top_p = torch.tensor([params[i].top_p for i in cut], device=device)[:, None]  # [c, 1]
            # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
            probs.masked_fill_(torch.cumsum(probs, dim=-1) - probs >= top_p, 0.0)
            tokens[cut] = order.gather(1, _invert(probs, uniform[cut])[:, None])[:, 0]
        return tokens

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
