"""Hardware-aware neural architecture search in the spirit of MnasNet."""
