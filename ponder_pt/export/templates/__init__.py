"""Files copied verbatim into a pondering model's HF export (remote code, trust_remote_code).

They import only torch and transformers, so the export directory is self-contained.
"""
