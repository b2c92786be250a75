"""The client's view of the service manager at handle 0 (IServiceManager).

The methods are declared in the order of the codes in :mod:`pybinder.protocol`
(SM_CHECK_SERVICE = 1 ...), which the broker's service manager serves.
"""

from __future__ import annotations

from typing import Any

from pybinder import protocol
from pybinder.runtime.interface import Interface, method


class IServiceManager(Interface):
    """Name -> binder registry (Android's IServiceManager)."""

    DESCRIPTOR = protocol.SERVICE_MANAGER_DESCRIPTOR

    @method
    def check_service(self, name: str) -> Any:
        """The binder registered as ``name``, or None."""

    @method
    def wait_for_service(self, name: str, timeout: float | None) -> Any:
        """The binder registered as ``name``, waiting up to ``timeout`` seconds.

        Raises:
            ServiceNotFoundError: it did not appear in time.
        """

    @method
    def add_service(self, name: str, binder: Any) -> None:
        """Register ``binder`` as ``name``."""

    @method
    def list_services(self, start: int = 0) -> list[str]:
        """A page of the sorted names the caller may find, from index ``start``;
        empty past the end."""

    @method
    def status(self) -> dict[str, Any]:
        """The broker's counters and connected processes."""

    @method
    def register_for_notifications(self, name: str, callback: Any) -> None:
        """Call ``callback`` (a pybinder.IServiceCallback node) with (name, binder)
        whenever ``name`` is added, and now if it exists."""

    @method
    def unregister_for_notifications(self, name: str, callback: Any) -> None:
        """Undo :meth:`register_for_notifications` for ``callback``."""
