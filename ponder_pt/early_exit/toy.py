"""A small local classification task and tiny random-initialised backbones, for tests,
benchmarks and the miniature study (nothing is downloaded).

The task ("polarity"): a sentence of filler words with some positive and some negative words,
some of them negated ("not good" counts as negative); the label is 1 when positive meanings
outnumber negative ones. The margin varies from 1 to 4 and negations need context, so some
samples are easy (a bag of words decides them, early) and some are hard — what early exit
needs to show a trade-off.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

POSITIVE = ["good", "great", "fine", "happy", "bright", "calm", "kind", "warm", "clean", "sweet"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dark", "angry", "cruel", "cold", "dirty", "bitter"]
FILLER = ["the", "a", "day", "was", "and", "it", "room", "food", "of", "very", "we", "they",
          "saw", "felt", "this", "that", "place", "time", "people", "quite"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def polarity_rows(n: int, seed: int, negation: float = 0.3) -> list[dict]:
    """Rows {idx, sentence, label, margin, negations}: each sentiment word is preceded by
    "not" with probability `negation`, which flips it; label = 1 when the flipped count of
    positive words exceeds the negative ones (by `margin` >= 1)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randint(0, 1)
        margin = rng.randint(1, 4)
        minority = rng.randint(0, 3)
        pos, neg = (minority + margin, minority) if label else (minority, minority + margin)
        phrases, negations = [], 0
        for polarity, count in ((1, pos), (0, neg)):
            for _ in range(count):
                flip = rng.random() < negation
                word = rng.choice(POSITIVE if (polarity == 1) != flip else NEGATIVE)
                phrases.append(f"not {word}" if flip else word)
                negations += flip
        phrases += [rng.choice(FILLER) for _ in range(rng.randint(3, 10))]
        rng.shuffle(phrases)
        rows.append({"idx": i, "sentence": " ".join(phrases), "label": label, "margin": margin,
                     "negations": negations})
    return rows


def write_polarity_task(out_dir: str, n_train: int = 2000, n_valid: int = 400,
                        seed: int = 0, negation: float = 0.3) -> str:
    """train.jsonl, validation.jsonl and task.json (SST-2-shaped fields). negation=0 gives
    the easy bag-of-words version (for quick tests)."""
    os.makedirs(out_dir, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("validation", n_valid, seed + 1)):
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for row in polarity_rows(n, s, negation):
                fh.write(json.dumps(row) + "\n")
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as fh:
        json.dump({"name": "polarity", "text_keys": ["sentence"], "num_labels": 2,
                   "metric": "accuracy", "extra_metrics": ["f1"]}, fh, indent=1)
    return out_dir


def word_tokenizer(words: Optional[list[str]] = None, max_length: int = 64):
    """A word-level BERT-style tokenizer ([CLS] a [SEP] b [SEP]) over `words` (default: the
    polarity task's words); ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if words is None:
        words = sorted(set(POSITIVE + NEGATIVE + FILLER + ["not"]))
    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)


def tiny_encoder(arch: str, out_dir: str, *, layers: int = 6, hidden: int = 64,
                 seed: int = 0) -> str:
    """Save a random-initialised ALBERT / BERT / RoBERTa with the word tokenizer."""
    import torch
    from transformers import (AlbertConfig, AlbertModel, BertConfig, BertModel, RobertaConfig,
                              RobertaModel)

    tok = word_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, intermediate_size=2 * hidden,
                  max_position_embeddings=72, pad_token_id=tok.pad_token_id,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    if arch == "albert":
        model = AlbertModel(AlbertConfig(embedding_size=hidden // 2, **common))
    elif arch == "bert":
        model = BertModel(BertConfig(**common))
    elif arch == "roberta":
        common["max_position_embeddings"] += tok.pad_token_id + 1  # RoBERTa offsets positions
        model = RobertaModel(RobertaConfig(bos_token_id=tok.cls_token_id,
                                           eos_token_id=tok.sep_token_id, **common))
    else:
        raise ValueError(f"tiny_encoder: arch {arch!r} is not albert, bert or roberta")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
