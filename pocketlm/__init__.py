"""pocketlm: run, shrink, specialize and evaluate small language models on a CPU."""

__version__ = "0.1.0"
