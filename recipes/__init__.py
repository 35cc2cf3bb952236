"""Runnable transfer-learning recipes with offline defaults (python -m recipes.<name>)."""
