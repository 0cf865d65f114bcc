"""Graph wiring: typed app arguments, builders and the Serve config files."""
