"""Orchestration: the CLI (and Prefect flows) wiring ``tokenizer`` and ``storage`` together."""
