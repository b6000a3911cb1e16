"""The run config's vocabulary-dependent fields, filled from its tokenizer in one place.

`model.vocab_size` (the padded embedding rows) and `pause.token_id` (the <pause> row) follow
from the tokenizer and the config's padding rule (`model.make_vocab_size_divisible_by` x
`parallel.tp`); every command that resolves a run config against a tokenizer -- train,
config show, data inspect, the data sets, convert from-hf, the dry run's data report -- goes
through `fill_vocab`, so they cannot disagree about either.
"""

from __future__ import annotations

from ..tokenizer import VocabLayout
from .schema import Config


def fill_vocab(cfg: Config, tok) -> VocabLayout:
    """Fill `cfg`'s unset vocabulary fields from the loaded tokenizer `tok`, in place:
    model.vocab_size = the tokenizer's vocabulary padded to a multiple of
    make_vocab_size_divisible_by x tp (one multiple more when pauses are on and no padded
    row is free); pause.token_id (only with pauses: pause.rate > 0 or mode every_token) = the
    tokenizer's own <pause> token, else its first padded row. Values already set win, so a
    second call changes nothing. Returns the tokenizer's layout under the config's rule (for
    reports)."""
    pauses = cfg.pause.rate > 0 or cfg.pause.every_token > 0
    layout = tok.layout(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp,
                        need_pause=pauses)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = layout.padded_vocab_size
    if pauses and cfg.pause.token_id is None:
        cfg.pause.token_id = layout.pause_id
    return layout
