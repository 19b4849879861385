"""Checkpoints the core serves: the locally generated default and users' own Hugging Face directories."""
