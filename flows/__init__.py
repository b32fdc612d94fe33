"""Prefect flows that orchestrate the headstart stages (see flows/pipeline.py)."""
