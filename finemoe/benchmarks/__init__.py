"""Benchmarks measured side by side in one process (torch only, no CLI code)."""
