"""Tokenizer files for an HF export that encode exactly like the training tokenizer.

- byte-level BPE (`tokenizer.json`): written as it is (a `PreTrainedTokenizerFast`).
- sentencepiece (`.model`): converted here into a `tokenizer.json` that reproduces the model's
  own `normalizer_spec` (its precompiled normalisation rule such as nmt_nfkc or identity, the
  dummy `▁` prefix, whitespace collapsing) and its model (BPE merges in score order, or Unigram
  scores; byte fallback). transformers' `LlamaTokenizer` is *not* used: it assumes LLaMA's
  settings, and even then differs from sentencepiece on text with leading spaces. Strings of
  the control pieces (`<s>`, `</s>`, ...) in text are encoded as text, as sentencepiece does
  (`split_special_tokens`). The `.model` is copied alongside as `tokenizer.model`.

Every export is then VERIFIED: the exported directory is loaded back with
`AutoTokenizer.from_pretrained` and compared id for id with our tokenizer on sample texts (the
run's training documents when its data is at hand, plus a built-in probe set with newlines,
runs of spaces, tabs, digits, unicode and leading/trailing spaces). A difference raises
`TokenizerMismatchError` naming the first differing text, unless the mismatch is allowed
(`allow_mismatch=True` or `PONDER_PT_ALLOW_TOKENIZER_MISMATCH=1`), which only warns. The result is
recorded in `ponder_pt_tokenizer_check.json` in the export.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from typing import Iterable, Optional, Sequence

ALLOW_ENV = "PONDER_PT_ALLOW_TOKENIZER_MISMATCH"
CHECK_FILE = "ponder_pt_tokenizer_check.json"
SPACE = "\u2581"  # sentencepiece's escaped space

# (name, text): what differs between tokenizer implementations shows up here.
PROBE_TEXTS: tuple[tuple[str, str], ...] = (
    ("plain", "Return the value of the file."),
    ("newlines", "First line.\nSecond line.\n\nAfter a blank line.\n"),
    ("indented code", "def f(x):\n    if x:\n        return [x, 1]\n    return None\n"),
    ("runs of spaces", "a  b   c    d     e" + " " * 9 + "f"),
    ("tabs", "col1\tcol2\t\tcol3\n\tindented\t"),
    ("leading spaces", "   three leading spaces"),
    ("leading space", " one leading space"),
    ("leading newline", "\nstarts with a newline"),
    ("trailing spaces", "ends with spaces   "),
    ("only whitespace", " \n\t  \n"),
    ("single space", " "),
    ("empty", ""),
    ("digits", "In 2024, 3.14159 x 1000000 = 3141590; 007 and 0x1F."),
    ("crlf", "windows\r\nline endings\r\n"),
    ("accents", "Café naïve résumé Zürich Ångström façade"),
    ("compatibility chars", "ｆｕｌｌｗｉｄｔｈ ﬁﬂ ① ² ½ Ⅻ ＡＢＣ　ideographic space"),
    ("cjk and emoji", "日本語のテキスト 中文 한국어 😀🚀 👩‍💻"),
    ("combining marks", "e\u0301 a\u0308 n\u0303 (decomposed)"),
    ("unusual spaces", "nbsp\u00a0here, thin\u2009space, zero\u200bwidth, em\u2003space"),
    ("punctuation", "«quotes» “curly” ‘single’ — dash – en … ellipsis ¿¡"),
    ("space symbol", f"a literal {SPACE} lower one-eighth block {SPACE}{SPACE}x"),
    ("markup", "<div class=\"x\">&amp; {json: [1, 2]}</div> `code` **bold** #tag @user"),
    ("control chars", "bell\x07 escape\x1b[0m form\x0cfeed"),
    ("mixed", "  Mixed:\n\t- item 1\n\t- item  2 \n\nend  "),
)


# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


class TokenizerMismatchError(ValueError):
    """The exported HF tokenizer does not encode like the training tokenizer."""


# --------------------------------------------------------------------------------------------
# sentencepiece .model -> tokenizers.Tokenizer

def _load_model_proto(model_file: str):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as exc:  # protobuf missing
        raise ImportError("reading a sentencepiece .model's settings needs the `protobuf` "
                          f"package (pip install protobuf): {exc}") from exc
    proto = pb.ModelProto()
    with open(model_file, "rb") as fh:
        proto.ParseFromString(fh.read())
    return proto


def _bpe_merges(pieces: Sequence[tuple[str, float, int]], mergeable: set) -> list[tuple[str, str]]:
    """sentencepiece BPE merges two adjacent symbols when their concatenation is a piece, the
    highest-scoring one first; as HF BPE merges: every split of a piece into two pieces, ranked
    by the score of the merged piece."""
    vocab = {p for p, _, _ in pieces}
    ranked = []
    for idx, (piece, score, ptype) in enumerate(pieces):
        if ptype not in mergeable or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, idx, i, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def sentencepiece_to_tokenizers(model_file: str):
    """A `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor(model_file)`.

    Raises ValueError for settings with no equivalent here (WORD/CHAR models, whitespace as
    suffix, unescaped whitespace); whatever else differs is caught by the export check."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _load_model_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{model_file}: treat_whitespace_as_suffix=true has no HF equivalent here")
    if norm.HasField("escape_whitespaces") and not norm.escape_whitespaces:
        raise ValueError(f"{model_file}: escape_whitespaces=false has no HF equivalent here")
    unk_ids = [i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN]
    unk_id = unk_ids[0] if unk_ids else None
    byte_fallback = bool(trainer.byte_fallback)
    model_type = trainer.model_type  # 1 unigram, 2 bpe, 3 word, 4 char
    if model_type == 2:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = _bpe_merges(pieces, {NORMAL, UNUSED})
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=byte_fallback,
                           unk_token=pieces[unk_id][0] if unk_id is not None else None)
    elif model_type == 1:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id, byte_fallback)
    else:
        raise ValueError(f"{model_file}: sentencepiece model_type {model_type} (word/char) is not "
                         "supported for export; use bpe or unigram")
    tok = Tokenizer(model)

    # normalizer_spec, in sentencepiece's order: the precompiled rule (nmt_nfkc, ... ; empty for
    # identity), whitespace removal (leading, trailing, runs -> one), the dummy prefix, ' ' -> ▁
    steps = []
    charsmap = norm.precompiled_charsmap
    if charsmap:
        precompiled = normalizers.Precompiled(charsmap)
        # tokenizers applies the rule per grapheme and maps "\r\n" (one grapheme) by its "\r"
        # entry alone; sentencepiece maps each character: map "\r" first, as sentencepiece would
        cr = precompiled.normalize_str("\r")
        if cr != "\r":
            steps.append(normalizers.Replace("\r", cr))
        steps.append(precompiled)
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None

    dec = [decoders.Replace(SPACE, " ")]
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, t in pieces if t in (UNKNOWN, CONTROL)])
    user = [AddedToken(p, special=False, normalized=True) for p, _, t in pieces if t == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


# --------------------------------------------------------------------------------------------
# building the HF tokenizer, checking it

def _hf_from_ours(ours, staging: str, allow_mismatch: bool = False):
    """The PreTrainedTokenizerFast that will be saved for `ours` (our Tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    eos = ours.id_to_token(ours.eod_id)
    if ours.kind == "bpe":
        kw = {"eos_token": eos, "bos_token": eos, "unk_token": eos}
        if ours.pad_id is not None:
            kw["pad_token"] = ours.id_to_token(ours.pad_id)
        return PreTrainedTokenizerFast(tokenizer_file=ours.path, **kw)
    sp = ours._tok
    kw = {"eos_token": eos}
    if sp.bos_id() >= 0:
        kw["bos_token"] = sp.id_to_piece(sp.bos_id())
    if sp.unk_id() >= 0:
        kw["unk_token"] = sp.id_to_piece(sp.unk_id())
    if ours.pad_id is not None:
        kw["pad_token"] = sp.id_to_piece(ours.pad_id)
    try:
        converted = sentencepiece_to_tokenizers(ours.path)
    except ValueError as exc:
        if not allow_mismatch:
            raise TokenizerMismatchError(
                f"cannot export the sentencepiece tokenizer {ours.path} exactly: {exc}. To export "
                f"it anyway as transformers' LlamaTokenizer (which assumes LLaMA's settings and "
                f"will encode differently), set {ALLOW_ENV}=1.") from exc
        from transformers import LlamaTokenizer

        warnings.warn(f"{exc}; falling back to transformers' LlamaTokenizer", stacklevel=3)
        shutil.copy(ours.path, os.path.join(staging, "tokenizer.model"))
        return LlamaTokenizer.from_pretrained(staging, add_bos_token=False, add_eos_token=False)
    # sentencepiece encodes "</s>" in text as text: so does the export
    return PreTrainedTokenizerFast(tokenizer_object=converted, split_special_tokens=True, **kw)


def compare_encodings(ours, hf, samples: Iterable[tuple[str, str]]) -> dict:
    """Encode each (name, text) with both; counts and the first mismatches (up to 5)."""
    checked = same = 0
    mismatches = []
    for name, text in samples:
        a = ours.encode(text)
        b = hf.encode(text, add_special_tokens=False)
        checked += 1
        if a == b:
            same += 1
            continue
        if len(mismatches) < 5:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mismatches.append({
                "name": name, "text": text, "position": at,
                "ours": a[max(0, at - 2):at + 4], "hf": b[max(0, at - 2):at + 4],
                "ours_tokens": [ours.id_to_token(i) for i in a[max(0, at - 2):at + 4]],
                "hf_tokens": hf.convert_ids_to_tokens(b[max(0, at - 2):at + 4]),
            })
    return {"checked": checked, "matching": same, "mismatches": mismatches}


def _snippet(text: str, limit: int = 160) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def mismatch_message(tok_path: str, kind: str, report: dict) -> str:
    m = report["mismatches"][0]
    lines = [
        f"the exported HF tokenizer does not encode like the training tokenizer {tok_path} "
        f"({kind}): {report['checked'] - report['matching']} of {report['checked']} sample texts "
        f"differ. First: {m['name']} {_snippet(m['text'])}",
        f"  from token {m['position']}: training {m['ours']} {m['ours_tokens']}",
        f"  {'':>{len(str(m['position'])) + 11}}  export {m['hf']} {m['hf_tokens']}",
    ]
    if len(report["mismatches"]) > 1:
        lines.append("  also: " + ", ".join(x["name"] for x in report["mismatches"][1:]))
    lines.append(
        "  A model evaluated or prompted through this export would see token sequences it was "
        "never trained on. Tokenizers trained with `ponder-pt tokenizer train` export exactly; "
        "settings of a user-supplied sentencepiece model may have no HF equivalent. "
        f"To export anyway (with this warning), set {ALLOW_ENV}=1.")
    return "\n".join(lines)


def training_samples(cfg, tokenizer, max_docs: int = 200, max_tokens: int = 4096) -> list:
    """(name, text) for the first documents of the run's training data (`data.train`), decoded
    with the training tokenizer; [] when the data is not at hand (e.g. exporting elsewhere)."""
    try:
        from ..config.schema import parse_blend

        prefixes = [p for p, _ in parse_blend(list(cfg.data.train))]
    except Exception:  # noqa: BLE001 - a sample source only
        return []
    out = []
    for prefix in prefixes:
        if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
            continue
        try:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            ds = IndexedDataset(prefix)
            docs = ds.document_indices
            for d in range(min(len(docs) - 1, max_docs)):
                ids = [int(i) for i in ds[int(docs[d])][:max_tokens]]
                ids = [i for i in ids if i != tokenizer.eod_id]
                out.append((f"training document {d} of {prefix}", tokenizer.decode(ids)))
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"tokenizer export check: could not read {prefix}: {exc}")
        if len(out) >= max_docs:
            break
    return out[:max_docs]


def _allowed(allow_mismatch: Optional[bool]) -> bool:
    if allow_mismatch is not None:
        return bool(allow_mismatch)
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def save_tokenizer(tok_path: str, out: str, pause_id: Optional[int] = None,
                   samples: Sequence[tuple[str, str]] = (),
                   allow_mismatch: Optional[bool] = None) -> dict:
    """Write HF tokenizer files for our tokenizer at `tok_path` into `out` and verify them.

    A `<pause>` token is added when its id lands on `pause_id`. `samples`: extra (name, text)
    checked with the built-in probes (e.g. `training_samples(cfg, ...)`). Returns the check
    report (also written to `out/ponder_pt_tokenizer_check.json`); raises
    TokenizerMismatchError on a difference unless allowed (then warns)."""
    from transformers import AutoTokenizer

    from ..tokenizer import PAUSE_TOKEN, load_tokenizer

    os.makedirs(out, exist_ok=True)
    allowed = _allowed(allow_mismatch)
    ours = load_tokenizer(tok_path)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=out)  # nothing lands in out unchecked
    try:
        hf = _hf_from_ours(ours, staging, allowed)
        if pause_id is not None and ours.own_pause_id is None and len(hf) == pause_id:
            hf.add_tokens([PAUSE_TOKEN], special_tokens=True)
        hf.save_pretrained(staging)
        if ours.kind == "sentencepiece":
            shutil.copy(ours.path, os.path.join(staging, "tokenizer.model"))

        loaded = AutoTokenizer.from_pretrained(staging)  # what eval / generate / users will get
        report = compare_encodings(ours, loaded, list(samples) + list(PROBE_TEXTS))
        report.update(kind=ours.kind, tokenizer=os.path.abspath(ours.path),
                      hf_class=type(loaded).__name__, exact=not report["mismatches"])
        if report["mismatches"]:
            msg = mismatch_message(tok_path, ours.kind, report)
            if not allowed:
                raise TokenizerMismatchError(msg)
            warnings.warn(msg, stacklevel=2)
            print(f"WARNING: {msg}", file=sys.stderr)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with open(os.path.join(out, CHECK_FILE), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, ensure_ascii=False)
    return report
