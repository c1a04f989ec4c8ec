"""Timelines of plans: PNG Gantt charts and Chrome/Perfetto traces."""
