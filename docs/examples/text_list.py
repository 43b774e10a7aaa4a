"""Samples for a transformer text classifier from a list of texts: `mqtool ... --data text_list.py:samples`.

TEXT_FILE holds one example per line, `label<TAB>text` with an integer class label, or just `text` for
unlabelled data. The tokenizer below is a whole-word lookup in a BERT-style vocab.txt (one token per line,
its line number is its id) so that the example runs anywhere; with Hugging Face use your model's own:

    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
    yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "y": labels}
"""

import re

import numpy as np

TEXT_FILE = "texts.tsv"  # relative to the folder you run mqtool in
VOCAB_FILE = "vocab.txt"
MAX_LEN = 32  # the model's sequence length
BATCH = 64  # texts tokenised per yield (any size: mqtool re-batches)


def tokenize(text: str, vocab: dict[str, int]) -> list[int]:
    """[CLS] word ids [SEP], truncated to MAX_LEN; unknown words are [UNK]."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    ids = [vocab.get(w, vocab["[UNK]"]) for w in words][: MAX_LEN - 2]
    return [vocab["[CLS]"], *ids, vocab["[SEP]"]]


def samples():
    """Yield batches {"input_ids": [B, MAX_LEN], "attention_mask": [B, MAX_LEN], "y": [B]} (int64)."""
    with open(VOCAB_FILE, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    with open(TEXT_FILE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        ids = np.full((len(chunk), MAX_LEN), vocab["[PAD]"], np.int64)
        mask = np.zeros((len(chunk), MAX_LEN), np.int64)
        for i, row in enumerate(chunk):
            tokens = tokenize(row[-1], vocab)
            ids[i, : len(tokens)] = tokens
            mask[i, : len(tokens)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if len(chunk[0]) == 2:  # labelled file
            feed["y"] = np.array([int(row[0]) for row in chunk], np.int64)
        yield feed
