"""Benchmarks: the graph against a bare vLLM OpenAI server, with vLLM's own load client."""
