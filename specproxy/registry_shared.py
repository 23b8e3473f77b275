"""Compatibility alias: the shared-warm records and the mirror moved to :mod:`specproxy.registry.shared`."""

from specproxy.registry.shared import Mirror, SharedWarm, announcement, from_record, new_warm, note, to_record

__all__ = ["Mirror", "SharedWarm", "announcement", "from_record", "new_warm", "note", "to_record"]
