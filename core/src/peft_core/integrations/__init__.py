"""Integrations with the libraries users train with; each module imports its library on first use."""
