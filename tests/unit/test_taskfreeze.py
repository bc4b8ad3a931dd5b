"""Which cgroups the user-space freeze stops, and the record any thaw path reads back."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.taskfreeze import PARK, FrozenState, Level, ancestors, join, plan
from kjumpd.errors import KjumpError

DAEMON, SHELL = 700, 701


def parent(cg: str) -> str:
    return cg.rsplit("/", 1)[0] if "/" in cg else ""


def levels_of(tree: dict[str, tuple[list[int], bool]]) -> dict[str, Level]:
    """{cgroup: (procs, frozen)} -> a Level for every cgroup (children from the paths)."""
    return {
        cg: Level(
            {c.rsplit("/", 1)[-1]: tree[c][1] for c in tree if c and parent(c) == cg}, tuple(procs)
        )
        for cg, (procs, _) in tree.items()
    }


SYSTEMD = {
    "": ([2, 3], False),  # kernel threads only
    "init.scope": ([1], False),
    "system.slice": ([], False),
    "system.slice/kjumpd.service": ([DAEMON], False),
    "system.slice/dbus.service": ([300], False),
    "system.slice/systemd-journald.service": ([250], False),
    "user.slice": ([], False),
    "user.slice/user-1000.slice": ([], False),
    "user.slice/user-1000.slice/session-2.scope": ([1200, 1201], False),
}


def test_a_systemd_machine_freezes_every_unit_but_kjumpd_and_pid_1():
    p = plan(
        ["init.scope", "system.slice/kjumpd.service"],
        levels_of(SYSTEMD),
        keep={1, DAEMON},
        kthreads={2, 3},
    )
    assert set(p.freeze) == {
        "system.slice/dbus.service",
        "system.slice/systemd-journald.service",
        "user.slice",
    }
    assert p.park == ()  # the kernel threads in the root stay where they are


def test_without_a_service_manager_everything_in_the_root_is_parked():
    tree = {"": ([1, 2, 3, DAEMON, 400, 401, 402], False)}
    p = plan([""], levels_of(tree), keep={1, DAEMON}, kthreads={2, 3})
    assert p.freeze == ()
    assert p.park == (("", (400, 401, 402)),)


def test_a_daemon_started_by_hand_parks_the_shell_beside_it_and_freezes_the_rest():
    tree = {
        "": ([2], False),
        "init.scope": ([1], False),
        "user.slice": ([], False),
        "user.slice/s1.scope": ([DAEMON, SHELL], False),
        "user.slice/s2.scope": ([9], False),
        "system.slice": ([], False),
        "system.slice/cron.service": ([50], False),
    }
    p = plan(["init.scope", "user.slice/s1.scope"], levels_of(tree), keep={1, DAEMON}, kthreads={2})
    assert set(p.freeze) == {"user.slice/s2.scope", "system.slice"}
    assert p.park == (("user.slice/s1.scope", (SHELL,)),)


def test_a_cgroup_someone_froze_is_left_to_them_and_a_leftover_park_is_not_frozen_twice():
    tree = {
        "": ([1, DAEMON], False),
        "frozen-by-admin": ([5], True),
        "app": ([6], False),
        PARK: ([7], True),
    }
    p = plan([""], levels_of(tree), keep={1, DAEMON}, kthreads=set())
    assert p.freeze == ("app",) and p.already_frozen == ("frozen-by-admin",)


@st.composite
def trees(draw):
    """A random hierarchy, processes spread over it, a daemon somewhere and PID 1."""
    names = ["a", "b", "c"]
    paths = [""]
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(paths))
        child = join(parent, draw(st.sampled_from(names)) + str(len(paths)))
        paths.append(child)
    procs: dict[str, list[int]] = {p: [] for p in paths}
    for pid in range(10, 10 + draw(st.integers(0, 30))):
        procs[draw(st.sampled_from(paths))].append(pid)
    daemon_cg = draw(st.sampled_from(paths))
    procs[daemon_cg].append(DAEMON)
    init_cg = draw(st.sampled_from(paths))
    procs[init_cg].append(1)
    frozen = {
        p: draw(st.booleans())
        if p and p not in ancestors(daemon_cg) + ancestors(init_cg)
        else False
        for p in paths
    }
    tree = {p: (procs[p], frozen[p]) for p in paths}
    return tree, daemon_cg, init_cg


@given(trees())
def test_every_process_but_the_kept_ones_is_stopped_and_no_kept_one_is(t):
    tree, daemon_cg, init_cg = t
    p = plan([daemon_cg, init_cg], levels_of(tree), keep={1, DAEMON}, kthreads=set())
    stopped_cgroups = set(p.freeze) | set(p.already_frozen)

    def stopped(cg: str) -> bool:
        return any(a in stopped_cgroups for a in ancestors(cg))

    parked = {pid for _, pids in p.park for pid in pids}
    for cg, (procs, _) in tree.items():
        for pid in procs:
            if pid in (1, DAEMON):
                assert not stopped(cg) and pid not in parked
            else:
                assert stopped(cg) or pid in parked, (cg, pid, p)
    # nothing is frozen twice: no frozen cgroup lies inside another
    for c in p.freeze:
        assert not any(a in stopped_cgroups for a in ancestors(c)[:-1])


# -- the record -------------------------------------------------------------------------------
cg_names = st.text("abc.-_@0123456789", min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..")
)
states = st.builds(
    FrozenState,
    cgroup_root=st.sampled_from(["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]),
    cgroups=st.lists(st.lists(cg_names, min_size=1, max_size=3).map("/".join), max_size=5),
    parks=st.lists(
        st.tuples(
            st.lists(cg_names, max_size=3).map("/".join),
            st.lists(st.integers(2, 1 << 22), max_size=5),
        ),
        max_size=3,
    ),
    mounts=st.lists(
        st.tuples(
            st.sampled_from(["/", "/home", "/var/lib/x y"]),
            st.sampled_from(["254:1", "8:3"]),
            st.sampled_from(["ext4", "xfs", "btrfs"]),
        ),
        max_size=4,
    ),
    pid=st.integers(1, 1 << 22),
)


@given(states)
def test_the_record_round_trips(state):
    back = FrozenState.from_json(state.to_json())
    assert back == FrozenState(
        state.cgroup_root,
        list(state.cgroups),
        [(c, list(p)) for c, p in state.parks],
        [tuple(m) for m in state.mounts],
        state.pid,
    )


@given(states, st.data())
def test_a_damaged_record_is_refused_by_name_never_misread(state, data):
    text = state.to_json()
    cut = data.draw(st.integers(0, len(text) - 1))
    damaged = data.draw(
        st.sampled_from(
            [
                text[:cut],
                text[:cut] + "\x00" + text[cut + 1 :],
                text.replace('"version": 1', '"version": 2'),
            ]
        )
    )
    try:
        back = FrozenState.from_json(damaged)
    except KjumpError as e:
        assert e.fix
    else:
        assert damaged == text or back.to_json() == FrozenState.from_json(damaged).to_json()


@pytest.mark.parametrize(
    "bad",
    [
        {"version": 1, "cgroup_root": "/sys/fs/cgroup", "cgroups": ["../../etc"]},
        {"version": 1, "cgroup_root": "/sys/fs/cgroup", "cgroups": ["a//b"]},
        {"version": 1, "cgroup_root": "/sys/fs/cgroup", "parks": [["a/..", [5]]]},
        {"version": 1, "cgroup_root": "relative"},
        {"version": 1, "cgroup_root": "/sys/fs/cgroup", "parks": [["a", ["x"]]]},
        [1, 2, 3],
    ],
)
def test_a_record_that_would_leave_the_cgroup_tree_is_refused(bad):
    with pytest.raises(KjumpError) as e:
        FrozenState.from_json(json.dumps(bad))
    assert e.value.fix
