"""The contract both sides import: trainer config models, the DreamBoothJob manifest, the launcher contract.

Torch-free and kopf-free (pydantic and PyYAML only): the operator imports nothing else of the trainer's, and the
trainer nothing of the operator's. docs/design.md describes each contract and where it lives.
"""
