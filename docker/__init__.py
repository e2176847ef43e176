"""Dockerfile templates the deploy stage renders into each bundle (see tasks/package.py)."""
