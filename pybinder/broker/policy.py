"""Who may add, find and call which service-manager names: the broker's access policy.

It plays the part of D-Bus's system bus policy (``<policy>`` with ``own``,
``send_destination``) and of Android servicemanager's access checks
(``Access::canAdd`` / ``canFind``, which ask SELinux), with Unix uids and groups as
the principals. The broker asks :meth:`Policy.allows` before it serves a request and
answers a refusal with :meth:`Policy.describe_denial`.

A policy file is TOML::

    [[service]]            # the first entry whose pattern matches a name decides
    name = "camera.*"      # an fnmatch pattern (fnmatch.fnmatchcase)
    add  = ["user:robot"]  # principals: "uid:N", "user:NAME", "gid:N", "group:NAME", "*"
    find = ["*"]
    call = ["group:video", "uid:1000"]

Entries are numbered from 1 in messages. ``"*"`` matches every caller, ``uid:N`` and
``user:NAME`` the caller's uid, ``gid:N`` and ``group:NAME`` the caller's primary gid
or any of its supplementary groups. Names are resolved to numbers when the file is
loaded, so a user or group that does not exist is an error then, not a silent deny.

The rules, in order, for a request ``action`` on ``name`` by ``caller`` while the
name is held by ``owner_uid`` (``None``: nobody holds it):

1. root (uid 0) may do anything;
2. ``add`` of a name held by another uid is refused: only its holder and root may
   replace it (so a rule cannot let one user take over another's live service);
3. ``find`` and ``call`` by the holder's own uid are allowed;
4. the first entry whose ``name`` pattern matches decides, if it lists ``action``:
   the caller must match one of the principals (an empty list allows nobody else).
   Later entries are not consulted even when the first match leaves ``action`` out;
5. otherwise the default, in the spirit of the D-Bus system bus: anyone may add a
   name nobody holds (and its holder may re-add it); anyone may look up a name
   nobody holds (the lookup reports it missing); nobody else may find or call a
   held name; nobody but root may call a name nobody holds.

Listing an action reserves it: ``add = ["user:robot"]`` lets only robot (and root)
add the name, even while nobody holds it.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: The actions a policy decides.
ACTIONS: Final = ("add", "find", "call")

_ANY: Final = "any"
_UID: Final = "uid"
_GID: Final = "gid"


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, as the kernel reported it (SO_PEERCRED) plus ``/proc``.

    Attributes:
        uid: the caller's effective uid.
        gid: the caller's effective (primary) gid.
        groups: the caller's supplementary group ids; may be empty.
    """

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @classmethod
    def of_pid(cls, pid: int, uid: int, gid: int) -> Caller:
        """The caller with process id ``pid``, uid ``uid`` and gid ``gid``.

        The supplementary groups are read from the ``Groups:`` line of
        ``/proc/<pid>/status``. When that cannot be read or parsed (the process has
        gone, no ``/proc``, a malformed line) the groups are just ``{gid}``. Read it
        while the caller's connection is open, so the pid cannot have been reused.

        Never raises.
        """
        try:
            groups = _groups_from_status(_read_status(pid))
        except (OSError, ValueError):
            groups = frozenset((gid,))
        return cls(uid, gid, groups)


def _read_status(pid: int) -> bytes:
    return Path(f"/proc/{int(pid)}/status").read_bytes()


def _groups_from_status(status: bytes) -> frozenset[int]:
    """The ids on the ``Groups:`` line of a ``/proc/<pid>/status``; ValueError if none."""
    for line in status.splitlines():
        if line.startswith(b"Groups:"):
            return frozenset(int(word) for word in line[len(b"Groups:") :].split())
    raise ValueError("no Groups: line in the process status")


@dataclass(frozen=True, slots=True)
class Principal:
    """One entry of an action's list, resolved to a number.

    Attributes:
        kind: ``"any"``, ``"uid"`` or ``"gid"`` (``user:`` and ``group:`` resolve to
            the last two).
        number: the uid or gid; -1 for ``"any"``.
        text: the principal as the file wrote it, for messages.
    """

    kind: str
    number: int
    text: str

    def matches(self, caller: Caller) -> bool:
        """Whether ``caller`` is this principal."""
        if self.kind == _ANY:
            return True
        if self.kind == _UID:
            return caller.uid == self.number
        return caller.gid == self.number or self.number in caller.groups


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[service]]`` entry.

    Attributes:
        index: the entry's position in the file, from 1.
        pattern: the fnmatch pattern its ``name`` gave.
        allowed: per action it lists, the principals allowed; an action it leaves
            out is not a key.
    """

    index: int
    pattern: str
    allowed: Mapping[str, tuple[Principal, ...]] = field(default_factory=dict)

    def matches(self, name: str) -> bool:
        """Whether the pattern matches ``name`` (case-sensitively)."""
        return fnmatch.fnmatchcase(name, self.pattern)

    def allows(self, action: str, caller: Caller) -> bool:
        """Whether one of the principals listed for ``action`` (which must be listed)
        is ``caller``."""
        return any(principal.matches(caller) for principal in self.allowed[action])

    def describe(self, action: str, source: str) -> str:
        """``policy <source> entry <index>: <action> = [...]``, as the file wrote it."""
        texts = [principal.text for principal in self.allowed[action]]
        return f"policy {source} entry {self.index}: {action} = {texts!r}"


class Policy:
    """The access policy for service-manager names, like D-Bus's system bus policy.

    It mirrors servicemanager's ``Access::canAdd`` / ``canFind`` checks (which Android
    asks SELinux) with uids and groups, and D-Bus's ``own`` / ``send_destination``
    rules; see the module docstring for the rules.

    Args:
        rules: the ``[[service]]`` entries, first match wins.
        source: where they came from (a path, ``"<string>"``, ``"<default>"``), for
            messages.
    """

    def __init__(self, rules: tuple[Rule, ...] = (), source: str = "<default>") -> None:
        self.rules = tuple(rules)
        self.source = source

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, rules={len(self.rules)})"

    @classmethod
    def default(cls) -> Policy:
        """The policy with no entries: the defaults alone (module docstring, rule 5)."""
        return cls((), "<default>")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read the policy file at ``path`` (UTF-8 TOML).

        Raises:
            OSError: the file cannot be read.
            PolicyError: it is not valid UTF-8 or TOML, or not a valid policy; the
                message names the file and, when it can, the entry.
        """
        source = os.fspath(path)
        data = Path(source).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{source}: not UTF-8 text: {exc}") from None
        return cls.from_toml(text, source)

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> Policy:
        """Parse a policy from TOML ``text``; ``source`` names it in messages.

        User and group names are resolved to numbers now (``pwd``, ``grp``).

        Raises:
            PolicyError: ``text`` is not TOML or not a valid policy.
        """
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: not valid TOML: {exc}") from None
        return cls(_parse_document(document, source), source)

    def allows(self, action: str, name: str, caller: Caller, owner_uid: int | None) -> bool:
        """Whether ``caller`` may ``action`` (add, find or call) the service ``name``.

        Args:
            action: ``"add"``, ``"find"`` or ``"call"``.
            name: the service-manager name.
            caller: who asks.
            owner_uid: the uid that holds ``name`` now; ``None`` if nobody does.

        Raises:
            ValueError: ``action`` is not one of :data:`ACTIONS`.
        """
        return self._decide(action, name, caller, owner_uid)[0]

    def describe_denial(self, action: str, name: str, caller: Caller, owner_uid: int | None) -> str:
        """A readable reason for the answer :meth:`allows` gives to the same question.

        For example ``uid 65534 may not find service 'camera.front' (policy
        /etc/x.toml entry 2: find = ['group:video'])``. Asked about a request that is
        allowed, it says so (``uid 0 may add service ... (root may do anything)``).

        Raises:
            ValueError: ``action`` is not one of :data:`ACTIONS`.
        """
        allowed, reason = self._decide(action, name, caller, owner_uid)
        verb = "may" if allowed else "may not"
        return f"uid {caller.uid} {verb} {action} service {name!r} ({reason})"

    def rule_for(self, name: str) -> Rule | None:
        """The first entry whose pattern matches ``name``, or ``None``."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def _decide(
        self, action: str, name: str, caller: Caller, owner_uid: int | None
    ) -> tuple[bool, str]:
        if action not in ACTIONS:
            raise ValueError(f"an action is one of {', '.join(ACTIONS)}, not {action!r}")
        if caller.uid == 0:
            return True, "root may do anything"
        if action == "add" and owner_uid is not None and owner_uid != caller.uid:
            return False, f"it is held by uid {owner_uid}: only that uid and root may replace it"
        if action != "add" and owner_uid == caller.uid:
            return True, f"uid {owner_uid} holds it"
        rule = self.rule_for(name)
        if rule is not None and action in rule.allowed:
            return rule.allows(action, caller), rule.describe(action, self.source)
        allowed, reason = _default(action, owner_uid)
        return allowed, f"default policy: {reason}"


def _default(action: str, owner_uid: int | None) -> tuple[bool, str]:
    """Rule 5 of the module docstring, for a caller who is not root."""
    if action == "add":
        if owner_uid is None:
            return True, "anyone may add a name nobody holds"
        return True, f"its holder uid {owner_uid} may add it again"
    if owner_uid is not None:
        return False, f"only its owner uid {owner_uid} and root may {action} it"
    if action == "find":
        return True, "anyone may look up a name nobody holds"
    return False, "nobody holds the name, so only root may call it"


# -- parsing ----------------------------------------------------------------------------


def _parse_document(document: dict[str, Any], source: str) -> tuple[Rule, ...]:
    unknown = sorted(set(document) - {"service"})
    if unknown:
        raise PolicyError(
            f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
            "a policy has only [[service]] entries"
        )
    entries = document.get("service", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PolicyError(f"{source}: 'service' must be an array of tables ([[service]])")
    return tuple(_parse_rule(entry, index, source) for index, entry in enumerate(entries, 1))


def _parse_rule(entry: dict[str, Any], index: int, source: str) -> Rule:
    where = f"{source}: [[service]] entry {index}"
    unknown = sorted(set(entry) - {"name", *ACTIONS})
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            "an entry has name, add, find and call"
        )
    pattern = entry.get("name")
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f"{where}: 'name' must be a non-empty string (an fnmatch pattern)")
    allowed: dict[str, tuple[Principal, ...]] = {
        action: _parse_principals(entry[action], f"{where}, {action!r}")
        for action in ACTIONS
        if action in entry
    }
    return Rule(index, pattern, allowed)


def _parse_principals(value: Any, where: str) -> tuple[Principal, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: must be a list of principals, not {value!r}")
    return tuple(_parse_principal(item, where) for item in value)


def _parse_principal(item: Any, where: str) -> Principal:
    if not isinstance(item, str):
        raise PolicyError(f"{where}: a principal is a string, not {item!r}")
    if item == "*":
        return Principal(_ANY, -1, item)
    kind, colon, value = item.partition(":")
    if not colon or not value:
        raise PolicyError(f"{where}: {item!r} is not KIND:VALUE or '*'")
    if kind in (_UID, _GID):
        return Principal(kind, _id_number(value, item, where), item)
    if kind == "user":
        return Principal(_UID, _resolve_user(value, where), item)
    if kind == "group":
        return Principal(_GID, _resolve_group(value, where), item)
    raise PolicyError(
        f"{where}: unknown principal kind {kind!r} in {item!r}; "
        "the kinds are uid, user, gid, group (or '*' for everyone)"
    )


def _id_number(value: str, item: str, where: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise PolicyError(f"{where}: {item!r} needs a non-negative decimal number")
    return int(value)


def _resolve_user(user: str, where: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        raise PolicyError(f"{where}: no user named {user!r} on this system") from None


def _resolve_group(group: str, where: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise PolicyError(f"{where}: no group named {group!r} on this system") from None
