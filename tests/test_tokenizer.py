import hashlib

from blipcore.model.tokenizer import BERT_VOCAB_SHA256, VOCAB_DIR, load_tokenizer, special_ids, tokenize_captions


def test_shipped_vocabulary_is_bert_base_uncased():
    data = (VOCAB_DIR / "vocab.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == BERT_VOCAB_SHA256
    assert len(data.decode().splitlines()) == 30522


def test_ids_match_bert_base_uncased():
    assert load_tokenizer()("a man riding a horse").input_ids == [101, 1037, 2158, 5559, 1037, 3586, 102]
    assert load_tokenizer()("A Man RIDING a horse").input_ids == [101, 1037, 2158, 5559, 1037, 3586, 102]


def test_blip_special_tokens():
    ids = special_ids()
    assert ids == {"pad": 0, "cls": 101, "sep": 102, "dec": 30522, "enc": 30523}
    assert len(load_tokenizer()) == 30524


def test_captions_truncated_and_padded():
    out = tokenize_captions(["a dog", "word " * 100], max_len=40)
    assert out["input_ids"].shape == (2, 40)
    assert out["input_ids"][1, -1].item() == 102  # [SEP] kept at the end after truncation
    assert out["attention_mask"][0].sum().item() == 4 and out["input_ids"][0, 4].item() == 0
