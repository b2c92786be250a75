"""Listeners and death notifications: a hub calls back the listeners its clients
pass it, and a client learns when the hub's process exits.

    python examples/listeners.py

Starts a broker, a hub server and a client, each a real process. The client passes
a local ``IListener`` object to the hub (it arrives there as an ``IListener.Proxy``)
and links a death recipient to the hub; the hub calls the listener a few times from
its own thread, then exits, and the client's recipient fires. Everything is stopped
when it ends. (This one file plays all three roles: ``listeners.py server SOCKET``
and ``listeners.py client SOCKET`` are what it starts.)
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from launch import Demo

import pybinder

HUB = "example.hub"
TIMEOUT = 10.0


class IListener(pybinder.Interface):
    """What a hub's clients implement to hear from it."""

    DESCRIPTOR = "example.IListener"

    @pybinder.method
    def on_event(self, event: str) -> None:
        """Called by the hub for each event."""


class IHub(pybinder.Interface):
    """Keeps listeners and tells them about events."""

    DESCRIPTOR = "example.IHub"

    @pybinder.method
    def add_listener(self, listener: IListener) -> int:
        """Remember ``listener`` (an ``IListener.Proxy`` here); how many there are."""


# -- the server --------------------------------------------------------------------------


class Hub(IHub.Stub):
    def __init__(self) -> None:
        self.listeners: list[IListener] = []
        self.lock = threading.Lock()
        self.first = threading.Event()

    def add_listener(self, listener: IListener) -> int:
        caller = pybinder.get_calling_pid()
        print(f"add_listener got an {type(listener).__qualname__} from pid {caller}", flush=True)
        with self.lock:
            self.listeners.append(listener)
            self.first.set()
            return len(self.listeners)

    def publish(self, event: str) -> None:
        with self.lock:
            listeners = list(self.listeners)
        for listener in listeners:
            try:
                listener.on_event(event)
            except pybinder.DeadObjectError:
                with self.lock:
                    self.listeners.remove(listener)


def serve(socket_path: str) -> None:
    with pybinder.connect(socket_path) as proc:
        hub = Hub()
        proc.add_service(HUB, hub)
        proc.start_thread_pool(2)
        print(f'registered "{HUB}"', flush=True)
        if not hub.first.wait(TIMEOUT):
            raise SystemExit("no listener came")
        for number in range(1, 4):
            time.sleep(0.2)
            hub.publish(f"tick {number}")
        print("published 3 ticks; exiting", flush=True)


# -- the client --------------------------------------------------------------------------


class PrintingListener(IListener.Stub):
    def on_event(self, event: str) -> None:
        print(f"listener got {event!r} from pid {pybinder.get_calling_pid()}", flush=True)


def client(socket_path: str) -> None:
    with pybinder.connect(socket_path) as proc:
        proc.start_thread_pool(2)  # the hub calls the listener from its own thread
        hub = proc.get_service(HUB, IHub, timeout=TIMEOUT)
        # get_service is typed to return an IHub; the hub is in another process, so it
        # is an IHub.Proxy, a ProxyBase too (link_to_death, is_binder_alive, binder).
        assert isinstance(hub, pybinder.ProxyBase)
        died = threading.Event()

        def on_hub_death(proxy: pybinder.ProxyBase) -> None:
            print(f"death recipient: the hub in pid {proxy.binder.owner_pid} died", flush=True)
            died.set()

        hub.link_to_death(on_hub_death)
        print(f"hub alive: {hub.is_binder_alive()}", flush=True)
        count = hub.add_listener(PrintingListener())
        print(f"added a listener; the hub has {count}", flush=True)
        if not died.wait(TIMEOUT):
            raise SystemExit("the death recipient never fired")
        print(f"hub alive: {hub.is_binder_alive()}", flush=True)


# -- the example: a broker, the server and the client -------------------------------------


def main() -> int:
    me = str(Path(__file__).resolve())
    python = sys.executable
    with Demo("listeners") as demo:
        server = demo.start("server", [python, me, "server", demo.socket], "registered")
        client_code = demo.run("client", [python, me, "client", demo.socket])
        codes = [server.wait(TIMEOUT), client_code]
        if codes != [0, 0]:
            print(f"exit codes (server, client): {codes}")
            return 1
    print("done: the client saw the hub's events and its death")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("server", "client"):
        (serve if sys.argv[1] == "server" else client)(sys.argv[2])
    else:
        sys.exit(main())
