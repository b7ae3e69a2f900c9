"""Trainers: one file per algorithm over the shared loop (``loop.py``)."""
