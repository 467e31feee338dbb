"""Foundations every layer may use: value checks, atomic output folders, signal handling."""
