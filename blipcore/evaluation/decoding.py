"""Caption decoding: greedy, beam search and sampling, with the logits rules that fight collapse.

Every strategy returns one `Caption` per image with the per-step evidence the dashboard plots: the
model's log-probability and entropy at each step and, on request, the decoder's cross-attention over
the image tokens for each generated token.

    from blipcore.evaluation.decoding import DecodingConfig, generate
    captions = generate(model, images, "beam")               # a preset name ...
    captions = generate(model, images, "nucleus", seed=1)    # ... with overrides
    captions = generate(model, images, DecodingConfig(strategy="sample", top_k=20, temperature=0.7))

Conventions (HF `generate`'s unless said otherwise):
- The decoder reads [DEC] + BLIP's prompt 'a picture of ' ([DEC] alone with use_prompt=False). The
  prompt is not part of a caption's tokens or text, but the logits rules see it, as HF's processors
  see all input_ids: the repetition penalty also penalises 'a', 'picture', 'of', and the no-repeat
  rule also counts n-grams that overlap the prompt.
- The rules act on the raw logits in HF's order: repetition penalty, no-repeat n-gram, min length,
  then, for sampling only, temperature, top-k, top-p.
- A step is one decoder call. The step that emits [SEP] is a step but [SEP] is not a token, so the
  per-step fields of a `Caption` have len(tokens) + 1 entries when `finished`, len(tokens) otherwise.
- Beam search ranks hypotheses by the log-softmax of the processed logits. (HF's beam search applies
  the rules to log-softmaxed scores instead; that differs only for the repetition penalty and in not
  renormalising after a ban. Ours keeps beam search with one beam identical to greedy decoding.)
- precision "auto" (the default) decodes with a bf16 copy of the weights where this machine's bf16
  matmuls win (blipcore.speed), in fp32 elsewhere; the
  per-step evidence (log-probabilities, entropies, cross-attention) is always float32.
- min_length / max_length count new tokens (HF's min_new_tokens / max_new_tokens): min_length
  tokens come before [SEP] may; max_length bounds the steps, [SEP] included (so a caption that
  reaches max_length tokens has no [SEP] and is not `finished`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.blip import BLIP
from ..model.tokenizer import load_tokenizer
from ..speed import PRECISIONS, autocast_dtype, inference_copy

STRATEGIES = ("greedy", "beam", "sample")
_SAMPLING_ONLY = {"top_k": 0, "top_p": 1.0, "temperature": 1.0}  # field -> its 'off' value


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode. Immutable: derive variants with `decoding_config(cfg, **overrides)`."""

    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 3  # beam only
    length_penalty: float = 1.0  # beam only: hypotheses rank by sum log p / length ** length_penalty
    # beam only. True: an image is done once num_beams hypotheses have ended (HF's True). False: only
    # when no running beam can beat the worst kept hypothesis any more, an exact bound (like HF's "never").
    early_stopping: bool = True
    top_k: int = 0  # sample only; 0 = off
    top_p: float = 1.0  # sample only; 1 = off
    temperature: float = 1.0  # sample only
    repetition_penalty: float = 1.0  # CTRL's; 1 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    min_length: int = 0  # new tokens before [SEP] may be emitted
    max_length: int = 30  # new tokens; also capped so that prefix + new <= model max_text_len
    use_prompt: bool = True
    use_cache: bool = True  # False re-runs the whole sequence every step (a check on the KV cache)
    seed: int | None = None  # sampling: a private torch.Generator; None uses the global RNG
    return_cross_attention: bool = False
    # auto: a bf16 copy of the weights where this machine's bf16 matmuls win (blipcore.speed), else fp32
    precision: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (math.isfinite(self.length_penalty), f"length_penalty must be finite, got {self.length_penalty}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"),
            (self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (
                0 <= self.min_length <= self.max_length,
                f"min_length must be in [0, max_length={self.max_length}], got {self.min_length}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.strategy != "sample":
            changed = [name for name, off in _SAMPLING_ONLY.items() if getattr(self, name) != off]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to strategy='sample', not {self.strategy!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecodingConfig:
        return decoding_config(cls(), **values)


# Named strategies for the CLI, the dashboard and evaluation. Sampling presets fix seed=0 so that
# evaluations are reproducible; pass seed=None for fresh draws.
STRATEGY_PRESETS: dict[str, DecodingConfig] = {
    "greedy": DecodingConfig(),
    "beam": DecodingConfig(strategy="beam", num_beams=3),
    "top-k": DecodingConfig(strategy="sample", top_k=50, seed=0),
    "nucleus": DecodingConfig(strategy="sample", top_p=0.9, seed=0),
    "repetition-penalty": DecodingConfig(repetition_penalty=1.5),
    "no-repeat-ngram": DecodingConfig(no_repeat_ngram_size=3),
    "beam-no-repeat": DecodingConfig(strategy="beam", num_beams=3, no_repeat_ngram_size=3),
}


def check_strategy_names(names: Any) -> None:
    """ValueError naming the unknown ones, if any of `names` is not a preset of STRATEGY_PRESETS."""
    unknown = [name for name in names if name not in STRATEGY_PRESETS]
    if unknown:
        raise ValueError(f"unknown decoding strategies {unknown}; known: {', '.join(STRATEGY_PRESETS)}")


def decoding_config(cfg: DecodingConfig | str = "greedy", **overrides: Any) -> DecodingConfig:
    """A preset name or a config, with field overrides applied (and validated)."""
    if isinstance(cfg, str):
        if cfg not in STRATEGY_PRESETS:
            raise ValueError(f"unknown decoding strategy {cfg!r}; presets: {', '.join(STRATEGY_PRESETS)}")
        cfg = STRATEGY_PRESETS[cfg]
    known = {f.name for f in dataclasses.fields(DecodingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown decoding field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(cfg, **overrides)


@dataclass
class Caption:
    """One generated caption and the per-step evidence behind it (see the module's step convention)."""

    tokens: list[int]  # generated word pieces: no [DEC], prompt, final [SEP] or padding
    text: str
    logprobs: list[float]  # per step: log p(chosen) under the model's raw distribution (temperature 1, no rules)
    processed_logprobs: list[float]  # per step: log p(chosen) under the distribution it was chosen from
    entropies: list[float]  # per step: entropy (nats) of the model's raw next-token distribution
    # greedy / sample: sum(logprobs), the model's log-probability of the caption;
    # beam: the ranking score, sum(processed_logprobs) / steps ** length_penalty
    score: float
    finished: bool  # ended with [SEP] (else it hit max_length)
    cross_attention: Tensor | None = None  # per step (layers, heads, image tokens), float32 on CPU


# --- logits rules: pure functions on (rows, vocab) logits ------------------------------------------
def repetition_penalty(logits: Tensor, input_ids: Tensor, penalty: float) -> Tensor:
    """CTRL's rule (HF's RepetitionPenaltyLogitsProcessor): the logit of every token in input_ids is
    divided by `penalty` when positive and multiplied by it when negative."""
    seen = logits.gather(1, input_ids)
    return logits.scatter(1, input_ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def no_repeat_ngram(logits: Tensor, input_ids: Tensor, n: int) -> Tensor:
    """Ban each token that would complete an n-gram already in input_ids (HF's NoRepeatNGramLogitsProcessor)."""
    length, vocab = input_ids.shape[1], logits.shape[1]
    if length < n:
        return logits
    windows = input_ids.unfold(1, n, 1)  # (rows, length - n + 1, n)
    matches = (windows[..., :-1] == input_ids[:, length - n + 1 :].unsqueeze(1)).all(-1)
    # Windows that do not match ban a spare column past the vocabulary.
    banned = torch.zeros(len(logits), vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)
    return logits.masked_fill(banned[:, :vocab], float("-inf"))


def ban_token(logits: Tensor, token: int) -> Tensor:
    """Make `token` impossible (min_length bans [SEP])."""
    return logits.index_fill(1, torch.tensor([token], device=logits.device), float("-inf"))


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits (ties with the k-th included), as HF's TopKLogitsWarper."""
    kth = logits.topk(min(k, logits.shape[1]), dim=1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most probable tokens whose probability reaches p, as HF's TopPLogitsWarper."""
    ascending, order = logits.sort(dim=1)
    drop = ascending.softmax(dim=1).cumsum(dim=1) <= 1 - p
    drop[:, -1] = False  # the most probable token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def process_logits(logits: Tensor, input_ids: Tensor, num_new: int, cfg: DecodingConfig, sep_id: int) -> Tensor:
    """All of cfg's rules, in HF's order, for rows that read input_ids and generated num_new tokens.
    Returns `logits` itself when no rule applies."""
    if cfg.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, input_ids, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        logits = no_repeat_ngram(logits, input_ids, cfg.no_repeat_ngram_size)
    if num_new < cfg.min_length:
        logits = ban_token(logits, sep_id)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return logits


# --- the decoder's running rows --------------------------------------------------------------------
class _DecoderRows:
    """The rows being decoded: full token sequences, image tokens and the KV cache, kept in step."""

    def __init__(self, model: BLIP, image_embeds: Tensor, prefix: Tensor, cfg: DecodingConfig) -> None:
        self.model, self.image_embeds = model, image_embeds
        self.seqs = self.new = prefix  # everything read so far / not yet fed to the decoder
        self.cache = model.new_cache() if cfg.use_cache else None
        self.need_weights = cfg.return_cross_attention

    def next_logits(self) -> tuple[Tensor, Tensor | None]:
        """Next-token logits (rows, vocab) in float32 and, when asked for, the last position's
        cross-attention (rows, layers, heads, image tokens) in float32 on the CPU."""
        inputs = self.seqs if self.cache is None else self.new
        logits, attn = self.model.decode_step(
            inputs, self.image_embeds, cache=self.cache, need_weights=self.need_weights
        )
        cross = None if attn is None else torch.stack([a[:, :, -1] for a in attn], dim=1).float().cpu()
        return logits[:, -1].float(), cross

    def advance(self, rows: Tensor | None, tokens: Tensor) -> None:
        """Continue rows `rows` of the current ones (dropped, reordered or repeated; None = all, in
        order) with one token each."""
        if rows is not None:
            self.seqs, self.image_embeds = self.seqs[rows], self.image_embeds[rows]
            if self.cache is not None:
                self.cache.reorder(rows)
        self.new = tokens[:, None]
        self.seqs = torch.cat([self.seqs, self.new], dim=1)


class _Distributions:
    """The model's raw and processed next-token log-probabilities of all rows at one step."""

    def __init__(self, logits: Tensor, processed: Tensor, cross: Tensor | None) -> None:
        self.logp = F.log_softmax(logits, dim=-1)
        self.processed_logp = self.logp if processed is logits else F.log_softmax(processed, dim=-1)
        self.entropy = -(self.logp.exp() * self.logp).sum(-1)
        self.cross = cross

    def pick(self, rows: Tensor, tokens: Tensor) -> _History:
        """The one-step history that gives token tokens[i] to row rows[i]."""
        return _History(
            tokens[:, None].cpu(),
            self.logp[rows, tokens][:, None].cpu(),
            self.processed_logp[rows, tokens][:, None].cpu(),
            self.entropy[rows][:, None].cpu(),
            None if self.cross is None else self.cross[rows.cpu()][:, None],
        )


@dataclass
class _History:
    """The steps taken by each row so far (CPU): what becomes a Caption."""

    tokens: Tensor  # (rows, steps)
    logprobs: Tensor
    processed: Tensor
    entropies: Tensor
    cross: Tensor | None  # (rows, steps, layers, heads, N)

    @classmethod
    def empty(cls, rows: int, cross_shape: tuple[int, ...] | None) -> _History:
        values = torch.zeros(rows, 0)
        cross = None if cross_shape is None else torch.zeros(rows, 0, *cross_shape)
        return cls(values.long(), values, values, values, cross)

    def _parts(self) -> tuple[Tensor | None, ...]:
        return self.tokens, self.logprobs, self.processed, self.entropies, self.cross

    def select(self, rows: Tensor) -> _History:
        return _History(*(None if t is None else t[rows.cpu()] for t in self._parts()))

    def append(self, step: _History) -> _History:
        """These rows followed by the steps of `step` (same rows)."""
        pairs = zip(self._parts(), step._parts(), strict=True)
        return _History(*(None if t is None else torch.cat([t, u], 1) for t, u in pairs))

    def caption(self, row: int, finished: bool, score: float | None = None) -> Caption:
        """Row `row` as a Caption; score defaults to the sum of its raw log-probabilities."""
        tokens = self.tokens[row].tolist()[: -1 if finished else None]
        logprobs = self.logprobs[row].tolist()
        return Caption(
            tokens=tokens,
            text=load_tokenizer().decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip(),
            logprobs=logprobs,
            processed_logprobs=self.processed[row].tolist(),
            entropies=self.entropies[row].tolist(),
            score=sum(logprobs) if score is None else score,
            finished=finished,
            cross_attention=None if self.cross is None else self.cross[row].clone(),
        )


# --- strategies ------------------------------------------------------------------------------------
def generate(model: BLIP, images: Tensor, cfg: DecodingConfig | str = "greedy", **overrides: Any) -> list[Caption]:
    """Caption each image of `images` (B, 3, S, S) with a strategy preset name or a DecodingConfig,
    plus field overrides. The model runs in eval mode and is put back in its previous mode."""
    cfg = decoding_config(cfg, **overrides)
    if not model.use_lm:
        raise ValueError("this model has no text decoder (model.lm_weight is 0): it cannot caption")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, images, cfg)
    finally:
        model.train(was_training)


def encode_for_decoding(model: BLIP, images: Tensor, precision: str = DecodingConfig.precision
                        ) -> tuple[BLIP, Tensor]:
    """The model that decodes in `precision` (itself, or its cached bf16 copy where that wins here) and the image
    tokens (B, 1+N, vision_width) it decodes from: what every strategy runs before its first token."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, precision)
    if dtype is not None:
        model = inference_copy(model, dtype)
    image_embeds, _ = model.encode_image(images.to(device, dtype or images.dtype))
    return model, image_embeds


@torch.inference_mode()
def _generate(model: BLIP, images: Tensor, cfg: DecodingConfig) -> list[Caption]:
    model, image_embeds = encode_for_decoding(model, images, cfg.precision)
    device = image_embeds.device
    prefix = model.decoder_prefix(len(images), device)
    if not cfg.use_prompt:
        prefix = prefix[:, :1]
    max_new = min(cfg.max_length, model.cfg.max_text_len - prefix.shape[1])
    rows = _DecoderRows(model, image_embeds, prefix, cfg)
    cross_shape = (model.cfg.text_decoder_depth, model.cfg.text_heads, image_embeds.shape[1])
    history = _History.empty(len(images), cross_shape if cfg.return_cross_attention else None)
    search = _beam_search if cfg.strategy == "beam" else _greedy_or_sample
    return search(rows, history, cfg, max_new, model.ids["sep"])


def _greedy_or_sample(
    rows: _DecoderRows, history: _History, cfg: DecodingConfig, max_new: int, sep: int
) -> list[Caption]:
    """One row per image; a row leaves the batch when it emits [SEP] or reaches max_new tokens."""
    device = rows.seqs.device
    generator = None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)
    owner = list(range(len(rows.seqs)))  # image of each row
    captions: list[Caption | None] = [None] * len(owner)
    for step in range(max_new):
        logits, cross = rows.next_logits()
        processed = process_logits(logits, rows.seqs, step, cfg, sep)
        if cfg.strategy == "greedy":
            tokens = processed.argmax(dim=-1)
        else:
            tokens = torch.multinomial(processed.softmax(dim=-1), 1, generator=generator).squeeze(1)
        everyone = torch.arange(len(tokens), device=device)
        history = history.append(_Distributions(logits, processed, cross).pick(everyone, tokens))
        is_sep = tokens == sep
        ended = is_sep | (step == max_new - 1)
        for row, finished in zip(ended.nonzero().flatten().tolist(), is_sep[ended].tolist(), strict=True):
            captions[owner[row]] = history.caption(row, finished=finished)
        live = (~ended).nonzero().flatten()
        if len(live) == 0:
            break
        if len(live) == len(tokens):
            rows.advance(None, tokens)
        else:
            history, owner = history.select(live), [owner[i] for i in live.tolist()]
            rows.advance(live, tokens[live])
    return captions  # type: ignore[return-value]  # every row ends by max_new


def _beam_search(
    rows: _DecoderRows, history: _History, cfg: DecodingConfig, max_new: int, sep: int
) -> list[Caption]:
    """Beam search, as HF's: each step scores every continuation of every running beam, takes the
    2K best (K = num_beams); those among the top K that end ([SEP], or any at the last step) become
    finished hypotheses, scored sum log p / steps ** length_penalty and the K best kept per image;
    the K best that do not end run on. An image is done per `early_stopping`, and leaves the batch."""
    k, penalty = cfg.num_beams, cfg.length_penalty
    device = rows.seqs.device
    images = len(rows.seqs)
    owner = list(range(images))  # image of each group of running beams
    scores = torch.zeros(images, 1, device=device)  # (groups, beams): running sums of processed log p
    hypotheses: list[list[Caption]] = [[] for _ in range(images)]  # finished, best first, at most K
    for step in range(max_new):
        logits, cross = rows.next_logits()
        dist = _Distributions(logits, process_logits(logits, rows.seqs, step, cfg, sep), cross)
        groups, beams = scores.shape
        vocab = logits.shape[-1]
        totals = (scores[:, :, None] + dist.processed_logp.view(groups, beams, vocab)).view(groups, -1)
        best, index = totals.topk(2 * k, dim=1)  # (groups, 2K), best first
        source = (index // vocab + torch.arange(groups, device=device)[:, None] * beams).flatten()  # row
        tokens = (index % vocab).flatten()
        last = step == max_new - 1
        token_list = tokens.tolist()
        ends, runs = _split_candidates(token_list, k, sep, last)

        if ends:
            ends_t = torch.tensor(ends, dtype=torch.long, device=device)
            ended = history.select(source[ends_t]).append(dist.pick(source[ends_t], tokens[ends_t]))
            for i, (position, value) in enumerate(zip(ends, best.flatten()[ends_t].tolist(), strict=True)):
                found = hypotheses[owner[position // (2 * k)]]
                score = value / (step + 1) ** penalty
                found.append(ended.caption(i, finished=token_list[position] == sep, score=score))
                found.sort(key=lambda c: c.score, reverse=True)
                del found[k:]
        if last:
            break

        runs_t = torch.tensor(runs, dtype=torch.long, device=device)
        running = best.flatten()[runs_t].view(groups, k)
        # The best score a running beam could still reach: its log p only falls, and its length is
        # at least step + 2 and at most max_new.
        reach = (running[:, 0] / (max_new if penalty > 0 else step + 2) ** penalty).tolist()
        live = [
            g for g in range(groups)
            if len(hypotheses[owner[g]]) < k or (not cfg.early_stopping and reach[g] > hypotheses[owner[g]][-1].score)
        ]
        if not live:
            break
        keep = torch.tensor([g * k + b for g in live for b in range(k)], dtype=torch.long, device=device)
        chosen, chosen_tokens = source[runs_t[keep]], tokens[runs_t[keep]]
        history = history.select(chosen).append(dist.pick(chosen, chosen_tokens))
        rows.advance(chosen, chosen_tokens)
        scores, owner = running[live], [owner[g] for g in live]
    return [found[0] for found in hypotheses]


def _split_candidates(tokens: list[int], k: int, sep: int, last: bool) -> tuple[list[int], list[int]]:
    """Positions in the flattened (groups, 2K) best-first candidate tokens: those that end a hypothesis
    (rank below K and [SEP], or any at the last step) and, per group, the K best that run on."""
    ends, runs = [], []
    for start in range(0, len(tokens), 2 * k):
        kept = 0
        for rank in range(2 * k):
            if last or tokens[start + rank] == sep:
                if rank < k:
                    ends.append(start + rank)
            elif kept < k:
                runs.append(start + rank)
                kept += 1
    return ends, runs
