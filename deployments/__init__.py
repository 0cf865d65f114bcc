"""One module per graph stage, plus the wire protocol and inter-stage messages."""
