"""Ordered registry of every transport the benchmark knows about."""

from __future__ import annotations

from .peers import PEERS
from .pybinder_transport import PybinderLoanTransport, PybinderTransport
from .transports import BASELINES, Transport

ORDER: list[type[Transport]] = [*BASELINES, *PEERS, PybinderTransport, PybinderLoanTransport]
REGISTRY: dict[str, type[Transport]] = {cls.name: cls for cls in ORDER}


def get(name: str) -> Transport:
    """Instantiate the transport called ``name``."""
    return REGISTRY[name]()


def names() -> list[str]:
    """All transport names in report order."""
    return [cls.name for cls in ORDER]
