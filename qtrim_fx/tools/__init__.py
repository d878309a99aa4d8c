"""User-facing tools: the ``qtrim`` CLI, ``inspect`` tables, graph pictures and plots."""
