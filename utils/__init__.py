"""Helpers for the Gemma SFT + DPO course: profiles, models, chat, data, memory, evaluation, plots, reports."""

__version__ = "0.1.0"
