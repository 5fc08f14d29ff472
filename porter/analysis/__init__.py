"""Read-only analysis of a modeling file: where it is, what its classes are, what they compute."""
