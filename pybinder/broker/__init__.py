"""The broker: the daemon that plays the binder driver.

Nothing here imports :mod:`pybinder.runtime`; the two sides share only the wire
(:mod:`pybinder.protocol`, :mod:`pybinder.parcel`, :mod:`pybinder.region`).
"""

from pybinder.broker.daemon import Broker
from pybinder.errors import BrokerAlreadyRunningError

__all__ = ["Broker", "BrokerAlreadyRunningError"]
