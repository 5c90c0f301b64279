"""bert-base-uncased word pieces, loaded offline from the copy shipped in blipcore/assets.

BLIP's conventions: [CLS] begins text-encoder input (ITC), [ENC] replaces it for the multimodal
encoder (ITM), [DEC] replaces it as the decoder's begin token, [SEP] ends a caption, [PAD] = 0.
"""

from __future__ import annotations

import functools

from transformers import BertTokenizerFast

from ..paths import ASSETS_DIR

VOCAB_DIR = ASSETS_DIR / "bert-base-uncased"
BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> BertTokenizerFast:
    """The bert-base-uncased tokenizer plus [DEC] (id 30522, as bos_token) and [ENC] (id 30523).

    `from_pretrained(<folder>)` reads vocab.txt with the right special tokens; building it from
    `vocab_file=` instead silently gives a 5-token vocabulary in transformers 5.x.
    """
    if not (VOCAB_DIR / "vocab.txt").is_file():
        raise FileNotFoundError(f"tokenizer vocabulary missing: {VOCAB_DIR / 'vocab.txt'} (reinstall blipcore)")
    tokenizer = BertTokenizerFast.from_pretrained(str(VOCAB_DIR), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    if len(tokenizer) != 30524:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected 30,524; {VOCAB_DIR} is damaged")
    return tokenizer


def special_ids() -> dict[str, int]:
    """Ids of the tokens the model uses by name."""
    tok = load_tokenizer()
    return {
        "pad": tok.pad_token_id,
        "cls": tok.cls_token_id,
        "sep": tok.sep_token_id,
        "dec": tok.convert_tokens_to_ids(DEC_TOKEN),
        "enc": tok.convert_tokens_to_ids(ENC_TOKEN),
    }


def tokenize_captions(captions: list[str], max_len: int) -> dict:
    """[CLS] caption [SEP], padded to the longest in the batch and truncated to `max_len` tokens."""
    return load_tokenizer()(
        list(captions), padding="longest", truncation=True, max_length=max_len, return_tensors="pt"
    )
