"""Early exit with pondering heads (PALBERT, PonderNet, PABEE, DeeBERT) on Hugging Face
backbones: see DESIGN.md "Early exit with pondering heads"."""
