"""The offline Multitask Prompt Tuning trainer: teach → distill → adapt → evaluate.

Every stage is a CLI subcommand (``rankone train <stage>`` or ``python -m trainer <stage>``)
that reads text-to-text JSONL and writes rankone artifacts (``shared/``, ``tasks/``,
``run.json``, plots). Only prompt parameters train; the backbone stays frozen.
"""
