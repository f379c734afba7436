"""Fakes of the outside world. Each speaks the real wire format of what it stands in for."""
