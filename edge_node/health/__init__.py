"""The node's health checks (issue 6): small probes, each with a remedy, run by one
monitor thread that journals every fault episode and reports it as node events.

- :mod:`.base` -- :class:`Finding`, :class:`Check`, :class:`HealError`
- :mod:`.monitor` -- :class:`Monitor`: probes at each check's interval, heals, journals
- :mod:`.journal` -- :class:`FaultJournal`: the ``faults`` table in node.db

The catalogue of faults and what the node does about each is docs/faults.md.
"""

from .base import Check, Finding, FunctionCheck, HealError
from .journal import FaultJournal
from .monitor import Monitor

__all__ = ["Check", "Finding", "FunctionCheck", "HealError", "FaultJournal", "Monitor"]
