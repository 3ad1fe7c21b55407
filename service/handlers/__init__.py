"""Handlers: what a route does, without HTTP (registry, generation, OpenAI completions)."""
