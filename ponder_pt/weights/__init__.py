"""What a checkpoint is: the one place that knows how ponder-pt's weights are laid out on disk.

* `layout`: how each parameter splits over tensor-parallel ranks (`tp_spec`, `shard`,
  `unshard`, `merge_tp`), the pipeline engine's names for our parameters (`full_name`),
  vocabulary padding (`pad_vocab`);
* `files`: the files of a native `checkpoint.dir` -- tags, `ponder_meta.json`, `latest`,
  `run_config.yaml`'s place, atomic writes (standard library only);
* `native`: its tensors -- the safe unpickler (`load_checkpoint_file`), TP shards written
  (`write_tp_shards`) and the full weights of any TP / PP / ZeRO layout (`read_weights`);
* `hf_config`: a Hugging Face directory's config.json as our model shape (no torch);
* `hf_weights`: its weights, and HF's parameter names for ours.

The config, the training engine and the HF export all build on this package, and it imports
no other part of ponder-pt, so none of them has to import another to read a checkpoint.
Model and run configs reach it as arguments (anything with the fields of `ponder_pt.config`'s
dataclasses). Import the modules themselves: this file imports nothing, so `files` and
`hf_config` stay free of torch.

ponder-pt's layers, bottom up (`tools/check_layers.py` enforces them):

    weights, tokenizer, sdpa_backends  <  config  <  data  <  models  <  engine  <  export
    <  inference  <  early_exit, sft  <  train, demo  <  cli

A layer imports only from its own layer and the ones below it, at top level or in a function.
"""

