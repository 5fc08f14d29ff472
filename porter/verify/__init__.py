"""`porter verify`: numerical parity of a port against its HF original on random weights."""
