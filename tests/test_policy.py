"""The broker's access policy for service-manager names, on its own: no broker process."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from pathlib import Path

import pytest

from pybinder.broker import policy as policy_module
from pybinder.broker.policy import ACTIONS, Caller, Policy, PolicyError

ROOT = Caller(0, 0)
ALICE = Caller(1000, 1000)
BOB = Caller(1001, 1001)
NOBODY_UID = pwd.getpwnam("nobody").pw_uid
NOGROUP_GID = grp.getgrnam("nogroup").gr_gid
NOBODY = Caller(NOBODY_UID, NOGROUP_GID)


def toml(text: str) -> Policy:
    return Policy.from_toml(text, "test.toml")


# -- defaults ------------------------------------------------------------------------------


def test_default_add_lets_anyone_take_a_free_name_and_only_its_holder_keep_it():
    policy = Policy.default()
    assert policy.allows("add", "camera", ALICE, None)
    assert policy.allows("add", "camera", ALICE, 1000)
    assert not policy.allows("add", "camera", BOB, 1000)
    assert policy.allows("add", "camera", ROOT, 1000)


def test_default_find_is_for_root_and_the_owner_and_anyone_when_nobody_holds_it():
    policy = Policy.default()
    assert policy.allows("find", "camera", BOB, None)
    assert policy.allows("find", "camera", ALICE, 1000)
    assert not policy.allows("find", "camera", BOB, 1000)
    assert policy.allows("find", "camera", ROOT, 1000)


def test_default_call_is_for_root_and_the_owner_only():
    policy = Policy.default()
    assert policy.allows("call", "camera", ALICE, 1000)
    assert not policy.allows("call", "camera", BOB, 1000)
    assert policy.allows("call", "camera", ROOT, 1000)
    assert not policy.allows("call", "camera", BOB, None)
    assert policy.allows("call", "camera", ROOT, None)


def test_an_empty_file_is_the_default_policy():
    empty = toml("")
    default = Policy.default()
    for action in ACTIONS:
        for caller in (ROOT, ALICE, BOB):
            for owner in (None, 0, 1000):
                assert empty.allows(action, "x", caller, owner) == default.allows(
                    action, "x", caller, owner
                ), (action, caller, owner)
    assert empty.rules == ()


# -- entries -------------------------------------------------------------------------------


def test_the_first_matching_entry_decides():
    policy = toml(
        """
        [[service]]
        name = "camera.front"
        find = []
        [[service]]
        name = "camera.*"
        find = ["*"]
        """
    )
    assert not policy.allows("find", "camera.front", BOB, 1000)
    assert policy.allows("find", "camera.back", BOB, 1000)
    assert policy.rule_for("camera.front").index == 1
    assert policy.rule_for("camera.back").index == 2
    assert policy.rule_for("microphone") is None


def test_a_key_left_out_keeps_the_default_and_later_entries_are_not_consulted():
    policy = toml(
        """
        [[service]]
        name = "camera.*"
        call = ["*"]
        [[service]]
        name = "*"
        find = ["*"]
        call = []
        """
    )
    # camera.front: entry 1 matches and says nothing of find, so the default (owner only).
    assert not policy.allows("find", "camera.front", BOB, 1000)
    assert policy.allows("call", "camera.front", BOB, 1000)
    # anything else: entry 2.
    assert policy.allows("find", "microphone", BOB, 1000)
    assert not policy.allows("call", "microphone", BOB, 1000)
    # add is left out everywhere: the default.
    assert policy.allows("add", "camera.front", BOB, None)
    assert not policy.allows("add", "camera.front", BOB, 1000)


def test_patterns_are_fnmatch_and_case_sensitive():
    policy = toml('[[service]]\nname = "Camera.?"\nfind = ["*"]\n')
    assert policy.allows("find", "Camera.1", BOB, 1000)
    assert not policy.allows("find", "camera.1", BOB, 1000)
    assert not policy.allows("find", "Camera.12", BOB, 1000)


def test_an_add_list_reserves_a_name_for_one_user_even_while_nobody_holds_it():
    policy = toml('[[service]]\nname = "robot.*"\nadd = ["user:nobody"]\n')
    assert policy.allows("add", "robot.arm", NOBODY, None)
    assert not policy.allows("add", "robot.arm", ALICE, None)
    assert policy.allows("add", "robot.arm", ROOT, None)
    assert policy.allows("add", "robot.arm", NOBODY, NOBODY_UID)  # its holder adds it again
    # the list decides even for a holder it does not name (a name held from before a reload)
    assert not policy.allows("add", "robot.arm", ALICE, 1000)
    # other names keep the default
    assert policy.allows("add", "camera", ALICE, None)


def test_an_add_list_never_lets_one_uid_take_over_a_name_another_holds():
    policy = toml('[[service]]\nname = "*"\nadd = ["*", "uid:1001"]\n')
    assert policy.allows("add", "camera", BOB, None)
    assert not policy.allows("add", "camera", BOB, 1000)
    assert policy.allows("add", "camera", ALICE, 1000)
    assert policy.allows("add", "camera", ROOT, 1000)


def test_an_empty_list_leaves_only_root_and_the_owner():
    policy = toml('[[service]]\nname = "*"\nadd = []\nfind = []\ncall = []\n')
    assert not policy.allows("add", "x", ALICE, None)
    assert not policy.allows("find", "x", BOB, None)  # hides even whether it exists
    assert not policy.allows("find", "x", BOB, 1000)
    assert not policy.allows("call", "x", BOB, 1000)
    assert policy.allows("find", "x", ALICE, 1000)
    assert policy.allows("call", "x", ALICE, 1000)


def test_root_is_always_allowed_everything():
    policy = toml('[[service]]\nname = "*"\nadd = []\nfind = []\ncall = []\n')
    for action in ACTIONS:
        for owner in (None, 1000, NOBODY_UID):
            assert policy.allows(action, "anything", ROOT, owner), (action, owner)
            assert policy.allows(action, "anything", Caller(0, 1234), owner), (action, owner)


def test_uid_and_user_principals_match_the_callers_uid_only():
    policy = toml('[[service]]\nname = "*"\ncall = ["uid:1000", "user:nobody"]\n')
    assert policy.allows("call", "x", ALICE, 5)
    assert policy.allows("call", "x", NOBODY, 5)
    assert not policy.allows("call", "x", BOB, 5)
    # a gid of 1000 is not uid 1000
    assert not policy.allows("call", "x", Caller(1001, 1000, frozenset({1000})), 5)


def test_group_principals_match_the_primary_gid_or_a_supplementary_group():
    policy = toml('[[service]]\nname = "*"\ncall = ["group:nogroup", "gid:4242"]\n')
    assert policy.allows("call", "x", Caller(1001, 1001, frozenset({NOGROUP_GID})), 5)
    assert policy.allows("call", "x", Caller(1001, 1001, frozenset({7, 4242})), 5)
    assert policy.allows("call", "x", Caller(1001, NOGROUP_GID), 5)
    assert policy.allows("call", "x", Caller(1001, 4242, frozenset()), 5)
    assert not policy.allows("call", "x", Caller(1001, 1001, frozenset({7, 8})), 5)
    # a uid equal to the gid is not membership
    assert not policy.allows("call", "x", Caller(4242, 1001), 5)


def test_user_and_group_names_are_resolved_when_the_file_is_loaded():
    policy = toml(
        '[[service]]\nname = "*"\nadd = ["user:root", "user:nobody"]\n'
        'find = ["group:root", "group:nogroup", "uid:17", "gid:18", "*"]\n'
    )
    rule = policy.rules[0]
    assert [(p.kind, p.number) for p in rule.allowed["add"]] == [("uid", 0), ("uid", NOBODY_UID)]
    assert [(p.kind, p.number) for p in rule.allowed["find"]] == [
        ("gid", 0),
        ("gid", NOGROUP_GID),
        ("uid", 17),
        ("gid", 18),
        ("any", -1),
    ]
    assert "call" not in rule.allowed
    assert NOBODY_UID == 65534 and NOGROUP_GID == 65534  # as on Debian


def test_an_unknown_action_is_a_value_error():
    with pytest.raises(ValueError, match="'own'"):
        Policy.default().allows("own", "x", ALICE, None)
    with pytest.raises(ValueError, match="'list'"):
        Policy.default().describe_denial("list", "x", ALICE, None)


# -- messages ------------------------------------------------------------------------------


def test_a_denial_by_an_entry_names_the_file_the_entry_and_its_list(tmp_path: Path):
    path = tmp_path / "x.toml"
    path.write_text(
        '[[service]]\nname = "mic"\nfind = ["*"]\n'
        '[[service]]\nname = "camera.*"\nfind = ["group:video", "uid:7"]\n'
    )
    policy = Policy.load(path)
    message = policy.describe_denial("find", "camera.front", Caller(65534, 65534), 0)
    assert message == (
        f"uid 65534 may not find service 'camera.front' "
        f"(policy {path} entry 2: find = ['group:video', 'uid:7'])"
    )


def test_a_denial_by_the_default_says_who_may():
    policy = Policy.default()
    assert policy.describe_denial("find", "camera.front", Caller(65534, 65534), 0) == (
        "uid 65534 may not find service 'camera.front' "
        "(default policy: only its owner uid 0 and root may find it)"
    )
    assert policy.describe_denial("call", "camera.front", BOB, 1000) == (
        "uid 1001 may not call service 'camera.front' "
        "(default policy: only its owner uid 1000 and root may call it)"
    )
    assert "only root may call" in policy.describe_denial("call", "gone", BOB, None)


def test_a_denied_takeover_names_the_holder():
    message = Policy.default().describe_denial("add", "camera", BOB, 1000)
    assert message == (
        "uid 1001 may not add service 'camera' "
        "(it is held by uid 1000: only that uid and root may replace it)"
    )


def test_describing_an_allowed_request_says_it_is_allowed():
    policy = Policy.default()
    assert policy.describe_denial("add", "camera", ROOT, 1000) == (
        "uid 0 may add service 'camera' (root may do anything)"
    )
    assert policy.describe_denial("call", "camera", ALICE, 1000).startswith(
        "uid 1000 may call service 'camera'"
    )


# -- bad files -----------------------------------------------------------------------------

GOOD = '[[service]]\nname = "ok"\nfind = ["*"]\n'


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (GOOD + '[[service]]\nname = "x"\nown = ["*"]\n', ["entry 2", "'own'"]),
        ('[[service]]\nname = "x"\nadd = "user:root"\n', ["entry 1", "'add'", "list"]),
        ('[[service]]\nname = "x"\ncall = [1000]\n', ["entry 1", "'call'", "1000"]),
        (GOOD + '[[service]]\nname = "x"\nfind = ["role:admin"]\n', ["entry 2", "'role'"]),
        (
            GOOD + GOOD + '[[service]]\nname = "x"\nadd = ["user:no-such-user-x"]\n',
            ["entry 3", "no user named 'no-such-user-x'"],
        ),
        (
            '[[service]]\nname = "x"\ncall = ["group:no-such-group-x"]\n',
            ["entry 1", "no group named 'no-such-group-x'"],
        ),
        ('[[service]]\nfind = ["*"]\n', ["entry 1", "'name'"]),
        ("[[service]]\nname = 3\n", ["entry 1", "'name'"]),
        ('[[service]]\nname = ""\n', ["entry 1", "'name'"]),
        ('[[service]]\nname = "x"\nfind = ["uid:-1"]\n', ["entry 1", "'uid:-1'"]),
        ('[[service]]\nname = "x"\nfind = ["gid:12a"]\n', ["entry 1", "'gid:12a'"]),
        ('[[service]]\nname = "x"\nfind = ["uid:"]\n', ["entry 1", "'uid:'"]),
        ('[[service]]\nname = "x"\nfind = ["everyone"]\n', ["entry 1", "'everyone'"]),
        ('default = "deny"\n', ["top-level", "'default'"]),
        ("service = 3\n", ["[[service]]"]),
        ('service = ["x"]\n', ["[[service]]"]),
        ("[[service]\n", ["not valid TOML"]),
    ],
)
def test_a_bad_policy_is_a_policy_error_naming_the_file_and_entry(text, fragments):
    with pytest.raises(PolicyError) as caught:
        toml(text)
    message = str(caught.value)
    assert message.startswith("test.toml: ")
    for fragment in fragments:
        assert fragment in message


def test_policy_error_is_a_value_error():
    assert issubclass(PolicyError, ValueError)


def test_load_reads_a_file_and_names_it_in_errors(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text('[[service]]\nname = "robot.*"\nadd = ["user:nobody"]\n')
    policy = Policy.load(str(good))
    assert policy.source == str(good)
    assert not policy.allows("add", "robot.arm", ALICE, None)

    bad = tmp_path / "bad.toml"
    bad.write_text('[[service]]\nname = "x"\nfind = ["user:no-such-user-x"]\n')
    with pytest.raises(PolicyError, match=f"^{bad}: \\[\\[service\\]\\] entry 1"):
        Policy.load(bad)

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[[service]]\nname = "\xff"\n')
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(binary)

    with pytest.raises(FileNotFoundError):
        Policy.load(tmp_path / "missing.toml")


# -- callers -------------------------------------------------------------------------------


def test_caller_of_this_process_has_its_supplementary_groups():
    caller = Caller.of_pid(os.getpid(), 1234, 5678)
    assert caller.uid == 1234
    assert caller.gid == 5678
    assert caller.groups == frozenset(os.getgroups())


def test_caller_of_a_pid_that_cannot_exist_has_just_its_gid():
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    caller = Caller.of_pid(pid_max + 1, 1000, 4321)
    assert caller == Caller(1000, 4321, frozenset({4321}))


@pytest.mark.parametrize(
    "status",
    [b"Name:\tx\nUid:\t0\t0\t0\t0\n", b"Name:\tx\nGroups:\t4 seven\n"],
)
def test_caller_of_a_malformed_status_has_just_its_gid(monkeypatch, status):
    monkeypatch.setattr(policy_module, "_read_status", lambda pid: status)
    assert Caller.of_pid(1, 1000, 4321).groups == frozenset({4321})


def test_caller_reads_the_groups_line(monkeypatch):
    status = b"Name:\t\xffodd\nGroups:\t4 24 27 \nNgid:\t0\n"
    monkeypatch.setattr(policy_module, "_read_status", lambda pid: status)
    assert Caller.of_pid(1, 1000, 1000).groups == frozenset({4, 24, 27})
    monkeypatch.setattr(policy_module, "_read_status", lambda pid: b"Groups:\t\n")
    assert Caller.of_pid(1, 1000, 1000).groups == frozenset()


def test_a_caller_is_frozen_and_hashable():
    caller = Caller(1, 2, frozenset({3}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        caller.uid = 0  # type: ignore[misc]
    assert {caller, Caller(1, 2, frozenset({3}))} == {caller}
