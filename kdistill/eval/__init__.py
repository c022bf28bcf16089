"""Evaluation: speed and size of teacher and student, measured the same way."""
