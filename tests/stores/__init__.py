"""Stores against real Redis servers."""
