"""A model's vocabulary: all of bert-base-uncased's word pieces, or only those of its training captions.

A model trained from scratch on a few thousand captions meets a few thousand of bert-base-uncased's 30,524 word
pieces. The others are rows of the word embedding (and of the LM head tied to it) that no caption ever trains, a
softmax that spends its normaliser (and label smoothing its mass) on words the model never saw, and, at the
flickr8k-cpu preset's size, a fifth of every training step. `model.vocabulary = "captions"` keeps only the word
pieces of the training captions, the prompt's and the special tokens.

Everything outside the model still speaks bert-base-uncased ids: the tokenizer, the datasets, decoding, the
run files. `CompactEmbedding` looks them up through a map (a piece the model does not have reads as [UNK]), and
`expand` puts the LM head's logits back on the full vocabulary (a piece the model does not have can never be
chosen), so a compact model decodes, evaluates and explains like any other. The map is two buffers of the
embedding, saved with its weights: a checkpoint knows its own vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .config import VOCAB_SIZE
from .tokenizer import load_tokenizer, special_ids


def caption_word_pieces(captions: Iterable[str], prompt: str) -> list[int]:
    """The bert-base-uncased ids that a "captions" vocabulary keeps, ascending: every word piece of `captions`
    and of the decoder prompt, and the special tokens ([PAD] is id 0, so it stays first)."""
    tokenizer = load_tokenizer()
    kept = {*special_ids().values(), tokenizer.unk_token_id}
    kept.update(tokenizer(prompt, add_special_tokens=False).input_ids)
    for ids in tokenizer(list(captions), add_special_tokens=False).input_ids:
        kept.update(ids)
    return sorted(kept)


def training_word_pieces(train_set: object, prompt: str) -> list[int]:
    """caption_word_pieces of a training set's captions (a folder dataset: streamed shards have no list of them)."""
    records = getattr(train_set, "records", None)
    if records is None:
        raise ValueError("model.vocabulary = 'captions' reads the training captions before training: it needs a "
                         "folder dataset (data.kind coco or shapes), not streamed WebDataset shards")
    return caption_word_pieces((caption for record in records for caption in record.captions), prompt)


class CompactEmbedding(nn.Embedding):
    """Word embeddings of the word pieces a model keeps, looked up by bert-base-uncased id.

    `word_pieces` are the kept ids, ascending (see caption_word_pieces); a size alone builds the first that
    many ids, a skeleton for a checkpoint's weights and map to be loaded into.
    """

    def __init__(self, word_pieces: Sequence[int] | int, width: int, padding_idx: int) -> None:
        unk = load_tokenizer().unk_token_id
        if isinstance(word_pieces, int):  # a skeleton (maybe on the meta device): no values to check
            size, unknown = word_pieces, unk if unk < word_pieces else 0
        else:
            ids = [int(i) for i in word_pieces]
            ascending = all(a < b for a, b in zip(ids, ids[1:], strict=False))
            if len(ids) < 2 or ids[0] != 0 or ids[-1] >= VOCAB_SIZE or not ascending:
                raise ValueError(f"word pieces must be ascending bert-base-uncased ids from 0 ([PAD]) below "
                                 f"{VOCAB_SIZE}")
            size, unknown = len(ids), ids.index(unk) if unk in ids else 0
        super().__init__(size, width, padding_idx=padding_idx)
        pieces = torch.arange(size) if isinstance(word_pieces, int) else torch.tensor(ids)
        to_compact = torch.full((VOCAB_SIZE,), unknown, dtype=torch.long)
        to_compact[pieces] = torch.arange(len(pieces))
        self.register_buffer("to_full", pieces.long())  # (size,): compact id -> bert-base-uncased id
        self.register_buffer("to_compact", to_compact)  # (VOCAB_SIZE,): bert-base-uncased id -> compact id

    def compact(self, ids: Tensor) -> Tensor:
        """bert-base-uncased ids -> this vocabulary's ([UNK] for a piece it lacks); -100 (no label) stays."""
        return torch.where(ids < 0, ids, self.to_compact[ids.clamp_min(0)])

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(self.compact(ids))

    def expand(self, logits: Tensor) -> Tensor:
        """Logits over this vocabulary (..., size) -> over bert-base-uncased's (..., VOCAB_SIZE). A piece it lacks
        gets half the dtype's lowest value, not -inf: its probability is exactly 0, yet log-probabilities stay
        finite, so an entropy (p log p) is 0 there, not NaN, and a repetition penalty cannot overflow it."""
        full = logits.new_full((*logits.shape[:-1], VOCAB_SIZE), torch.finfo(logits.dtype).min / 2)
        full[..., self.to_full] = logits
        return full
