"""Thin programs over the library: benchmarks, upcycling, Hugging Face import and export."""
