"""Other LoRA packages' APIs on loralib's layers: `microsoft` (Microsoft's loralib 0.1.2, whose names
the top-level `loralib` also exports)."""
