"""Tokenizers: train (HF byte-level BPE or sentencepiece) and load either behind one interface.

The loaded `Tokenizer` also answers the model-side vocabulary questions: the padded vocabulary
size (a multiple of make_vocab_size_divisible_by x TP, like Megatron) and which padded row is
reserved for `<pause>`; and what its ids mean (`identity()`: a hash of the token strings in id
order and of the file it was read from), which `data prepare` records beside the data and
`train` compares with data.tokenizer.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

PAUSE_TOKEN = "<pause>"
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def pad_vocab_size(n: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Round n up to a multiple of divisible_by x tp (Megatron's padded vocab)."""
    multiple = divisible_by * tp
    return ((n + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class VocabLayout:
    """Embedding-table rows implied by a tokenizer, the padding rule and the pause reservation."""

    vocab_size: int
    padded_vocab_size: int
    pause_id: Optional[int]

    @classmethod
    def build(cls, vocab_size: int, divisible_by: int = 128, tp: int = 1,
              pause_id: Optional[int] = None, need_pause: bool = False) -> "VocabLayout":
        """pause_id: the tokenizer's own <pause> token if it has one; otherwise, when a pause
        is needed, the first padded row (growing the padding by one multiple if there is none)."""
        padded = pad_vocab_size(vocab_size, divisible_by, tp)
        if pause_id is None and padded > vocab_size:
            pause_id = vocab_size
        elif pause_id is None and need_pause:
            pause_id = vocab_size
            padded = pad_vocab_size(vocab_size + 1, divisible_by, tp)
        return cls(vocab_size, padded, pause_id)


class Tokenizer:
    """Common face of an HF `tokenizers` tokenizer.json and a sentencepiece .model."""

    kind: str
    path: str

    def __init__(self, path: str, eod_token: Optional[str] = None):
        self.path = _resolve_tokenizer_file(path)
        self._eod_token = eod_token
        self._vocab_sha256: Optional[str] = None
        self._files_sha256: Optional[dict] = None
        if self.path.endswith(".json"):
            from tokenizers import Tokenizer as HFTokenizer

            self.kind = "bpe"
            self._tok = HFTokenizer.from_file(self.path)
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self.eod_id = self._find_special(eod_token, self._tok.token_to_id)
            self.pad_id = self._tok.token_to_id("<|padding|>")
            own_pause = self._tok.token_to_id(PAUSE_TOKEN)
        else:
            import sentencepiece as spm

            self.kind = "sentencepiece"
            self._tok = spm.SentencePieceProcessor(model_file=self.path)
            self.vocab_size = self._tok.get_piece_size()
            if eod_token is not None:
                self.eod_id = self._find_special(eod_token, self._sp_piece_id)
            else:
                self.eod_id = self._tok.eos_id()
                if self.eod_id < 0:
                    raise ValueError(f"{self.path}: sentencepiece model has no eos piece; "
                                     "pass eod_token= to name the end-of-document piece")
            self.pad_id = self._tok.pad_id() if self._tok.pad_id() >= 0 else None
            own_pause = self._sp_piece_id(PAUSE_TOKEN)
        self.own_pause_id = own_pause

    def _sp_piece_id(self, piece: str) -> Optional[int]:
        pid = self._tok.piece_to_id(piece)
        return None if pid == self._tok.unk_id() and piece != self._tok.id_to_piece(pid) else pid

    def _find_special(self, eod_token: Optional[str], lookup) -> int:
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        for name in names:
            tid = lookup(name)
            if tid is not None:
                return tid
        raise ValueError(f"{self.path}: no end-of-document token among {names}; "
                         "pass --eod-token with the tokenizer's EOD token")

    def encode(self, text: str) -> list[int]:
        if self.kind == "bpe":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return self._tok.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids)

    def id_to_token(self, tid: int) -> str:
        if not 0 <= tid < self.vocab_size:
            return PAUSE_TOKEN if tid == self.vocab_size else f"<pad:{tid}>"
        if self.kind == "bpe":
            return self._tok.id_to_token(tid)
        return self._tok.id_to_piece(tid)

    def vocab_sha256(self) -> str:
        """sha256 of the token strings in id order: equal for a re-saved or copied tokenizer
        with the same vocabulary, different as soon as any id means another token."""
        if self._vocab_sha256 is None:
            lookup = self._tok.id_to_token if self.kind == "bpe" else self._tok.id_to_piece
            tokens = [lookup(i) for i in range(self.vocab_size)]
            blob = json.dumps(tokens, ensure_ascii=False).encode("utf-8")
            self._vocab_sha256 = hashlib.sha256(blob).hexdigest()
        return self._vocab_sha256

    def identity(self) -> dict:
        """What the ids of this tokenizer mean, as recorded beside prepared data: the vocabulary
        hash decides whether two tokenizers agree; the file hashes only tell copies apart."""
        if self._files_sha256 is None:
            self._files_sha256 = {os.path.basename(self.path): file_sha256(self.path)}
        return {"path": os.path.abspath(self.path), "kind": self.kind,
                "vocab_size": self.vocab_size, "vocab_sha256": self.vocab_sha256(),
                "files_sha256": dict(self._files_sha256), "eod_id": self.eod_id}

    def layout(self, divisible_by: int = 128, tp: int = 1, need_pause: bool = False) -> VocabLayout:
        """The embedding rows under a padding rule. A run config's fields come from it through
        `ponder_pt.config.fill_vocab`, the one place that applies the config's rule."""
        return VocabLayout.build(self.vocab_size, divisible_by, tp, self.own_pause_id, need_pause)

    @property
    def pause_row(self) -> int:
        """The id <pause> takes when a model needs one: the tokenizer's own <pause> token, else
        the first row past its vocabulary. Any padding rule gives the same row (`layout`);
        without a run config (an HF export's tokenizer, `data inspect --tokenizer`) this is
        the pause id."""
        return self.layout(need_pause=True).pause_id

    def describe(self, divisible_by: int = 128, tp: int = 1) -> dict:
        lay = self.layout(divisible_by, tp, need_pause=True)
        return {"path": self.path, "kind": self.kind, "vocab_size": self.vocab_size,
                "eod_id": self.eod_id, "pad_id": self.pad_id,
                "padded_vocab_size": lay.padded_vocab_size, "pause_id": lay.pause_id,
                "padding_multiple": divisible_by * tp}

    # picklable by path, so worker processes can rebuild it cheaply
    def __reduce__(self):
        return (Tokenizer, (self.path, self._eod_token))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return candidate
        models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
        if models:
            return os.path.join(path, models[0])
        raise FileNotFoundError(f"{path}: no tokenizer.json or sentencepiece .model inside")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist")
    if not path.endswith((".json", ".model")):
        raise ValueError(f"{path}: expected a tokenizer.json (HF BPE) or a sentencepiece .model")
    return path


def load_tokenizer(path: str, eod_token: Optional[str] = None) -> Tokenizer:
    return Tokenizer(path, eod_token=eod_token)


class _TextSeen:
    """What tokenizer training read: texts per file and the keys of jsonl records that lacked
    the text key (to suggest --text-key when nothing was usable)."""

    def __init__(self, files: Sequence[str]):
        self.texts = dict.fromkeys(files, 0)
        self.keys: collections.Counter = collections.Counter()


def text_lines(files: Sequence[str], text_key: str = "text",
                rejects: Optional[list] = None, seen: Optional[_TextSeen] = None
                ) -> Iterable[str]:
    """Training text from .txt (lines) or .jsonl (`text_key`) files. A .jsonl line that is not
    JSON or has no string `text_key` is skipped (tokenizer training only samples text) and
    noted in `rejects` as (file, line number, reason); `train_tokenizer` reports them."""
    for path in files:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                line = raw.decode("utf-8", errors="replace")
                if path.endswith((".jsonl", ".json")):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        if rejects is not None:
                            rejects.append((path, number, f"not JSON ({err.msg})"))
                        continue
                    text = rec.get(text_key) if isinstance(rec, dict) else None
                    if isinstance(text, str):
                        if text:  # an empty document has nothing to learn from
                            if seen is not None:
                                seen.texts[path] += 1
                            yield text
                    else:
                        if rejects is not None:
                            rejects.append((path, number, f"no string {text_key!r} field"))
                        if seen is not None and isinstance(rec, dict) and text_key not in rec:
                            seen.keys.update(k for k, v in rec.items() if isinstance(v, str))
                elif line.strip():
                    if seen is not None:
                        seen.texts[path] += 1
                    yield line


def _no_text_error(files: Sequence[str], text_key: str, rejects: list, seen: _TextSeen
                   ) -> ValueError:
    """Why tokenizer training got no text, per file, with the --text-key to try."""
    why = []
    for path in files:
        skipped = sum(1 for p, _, _ in rejects if p == path)
        if os.path.getsize(path) == 0:
            why.append(f"{path}: empty file")
        elif skipped:
            why.append(f"{path}: {skipped} line(s) skipped, none with text under {text_key!r}")
        else:
            why.append(f"{path}: only blank lines or empty texts")
    hint = ""
    if seen.keys:
        best = seen.keys.most_common(1)[0][0]
        hint = (f"; string keys seen: {', '.join(k for k, _ in seen.keys.most_common(8))}"
                f" - did you mean --text-key {best}?")
    return ValueError(f"tokenizer train: no training text in the input(s) ({'; '.join(why)})"
                      f"{hint}")


def sentence_chunks(texts: Iterable[str], max_bytes: int) -> Iterable[str]:
    """Texts cut into pieces of at most max_bytes UTF-8 bytes, at line ends where possible,
    else at the last space, else anywhere between characters. sentencepiece's trainer drops
    every "sentence" longer than its max_sentence_length (4192 bytes) without a word, which
    for whole-document jsonl would drop most of a corpus."""
    for text in texts:
        if len(text.encode("utf-8")) <= max_bytes:
            yield text
            continue
        for line in text.splitlines(keepends=True):
            while len(line.encode("utf-8")) > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                cut = head.rfind(" ") + 1 or len(head)
                yield line[:cut]
                line = line[cut:]
            if line:
                yield line


SENTENCEPIECE_MAX_BYTES = 4192  # sentencepiece's default max_sentence_length


# LLaMA's sentencepiece settings (its tokenizer.model's trainer/normalizer spec): BPE, unk=0,
# bos=1, eos=2, byte fallback so nothing is ever unknown, digits split, whitespace-only pieces,
# and *identity* normalisation with whitespace kept as it is (no NFKC, no collapsing of runs of
# spaces, newlines and tabs stay themselves): the text a model is trained on is exactly the text
# it is given, decode(encode(text)) == text, and the export's tokenizer.json reproduces it.
SENTENCEPIECE_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    hard_vocab_limit=False,
)


def train_tokenizer(files: Sequence[str], vocab_size: int, out_dir: str, kind: str = "bpe",
                    text_key: str = "text", show_progress: bool = True) -> str:
    """Train a tokenizer on text/jsonl files; returns the written file path. Skipped .jsonl
    lines are counted and the first few named (file:line) on stderr; inputs that hold no text
    at all are refused (ValueError naming them) before anything is written, and an input
    without text beside others that have some is named on stderr."""
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"tokenizer training input(s) not found: {', '.join(missing)}")
    folders = [p for p in files if os.path.isdir(p)]
    if folders:
        raise ValueError(f"tokenizer training input(s) are directories, not .txt/.jsonl files: "
                         f"{', '.join(folders)}")
    if not files:
        raise ValueError("tokenizer train: no --input files")
    rejects: list = []
    seen = _TextSeen(files)
    try:
        texts = iter(text_lines(files, text_key, rejects, seen))
        first = next(texts, None)
        if first is None:
            raise _no_text_error(files, text_key, rejects, seen)
        os.makedirs(out_dir, exist_ok=True)
        out = _train(itertools.chain([first], texts), vocab_size, out_dir, kind, show_progress)
        empty = [p for p, n in seen.texts.items() if n == 0]
        if empty:
            print(f"tokenizer train: no text in {', '.join(empty)} (trained on the other "
                  "input(s))", file=sys.stderr)
        return out
    finally:
        if rejects:
            shown = "; ".join(f"{p}:{n}: {why}" for p, n, why in rejects[:5])
            more = f" (and {len(rejects) - 5} more)" if len(rejects) > 5 else ""
            print(f"tokenizer train: skipped {len(rejects)} unusable line(s): {shown}{more}",
                  file=sys.stderr)


def _train(texts: Iterable[str], vocab_size: int, out_dir: str, kind: str,
           show_progress: bool) -> str:
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors, trainers

        # GPT-NeoX-20B style: byte-level BPE, <|endoftext|> = 0, <|padding|> = 1.
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        out = os.path.join(out_dir, "tokenizer.json")
        tok.save(out)
        return out
    if kind == "sentencepiece":
        import sentencepiece as spm

        prefix = os.path.join(out_dir, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentence_chunks(texts, SENTENCEPIECE_MAX_BYTES)),
            model_prefix=prefix, vocab_size=vocab_size, **SENTENCEPIECE_SETTINGS,
            max_sentence_length=SENTENCEPIECE_MAX_BYTES,
            minloglevel=2, num_threads=max(1, os.cpu_count() or 1),
        )
        return prefix + ".model"
    raise ValueError(f"--type {kind!r}: expected 'bpe' or 'sentencepiece'")
