"""Where teacher targets come from: live local teachers (an offline cache and served teachers later)."""

from kdistill.signals.live import LiveTeachers

__all__ = ["LiveTeachers"]
