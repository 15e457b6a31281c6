"""The shared core of diffusion-fleet: contract, errors, settings, storage, Celery config.

No torch and no worker or producer code: both sides import this package and nothing of each
other (import-linter contracts in pyproject.toml).
"""
