"""The state store contract: every StateStore implementation must pass these.

Subclass ``StoreContract`` and provide a ``store`` fixture (a fresh, empty store).
"""

from __future__ import annotations

import pytest

from shared.state import Change, GroupKey, GroupState, Incident, KeysConflict, OutboxRecord, StateStore

NOW = 1_800_000_000_000  # epoch ms, past 2**31 on purpose (Int64 territory)


def state_for(key: GroupKey, n: int = 1) -> GroupState:
    st = GroupState(key)
    st.entries = [[NOW + i, -(2**62) + i, "v", [1, 2]] for i in range(n)]
    st.newest = NOW + n - 1
    st.incident = Incident("inc-1", 2, NOW, NOW + 5, NOW + 5, NOW, 1, {"alertName": "Task", "incidentCount": n})
    return st


class StoreContract:
    def test_absent_keys_load_as_none_without_token(self, store: StateStore) -> None:
        key = GroupKey("R", ("a",))
        loaded = store.load([key], NOW)
        assert loaded[key].state is None and loaded[key].token is None

    def test_saved_state_round_trips_exactly(self, store: StateStore) -> None:
        key = GroupKey("R", ("Alert A", "da1_1", "tenant/with#bad?chars\\"))
        st = state_for(key, 3)
        store.save([Change(key, st, None, NOW + 60_000)])
        got = store.load([key], NOW)[key]
        assert got.state is not None
        assert got.state.to_bytes() == st.to_bytes()
        assert got.token is not None

    def test_keys_compare_case_insensitively(self, store: StateStore) -> None:
        store.save([Change(GroupKey("R", ("Host1",)), state_for(GroupKey("R", ("Host1",))), None, NOW + 60_000)])
        got = store.load([GroupKey("R", ("HOST1",))], NOW)
        assert next(iter(got.values())).state is not None

    def test_rules_and_tenants_never_share_state(self, store: StateStore) -> None:
        a, b, c = GroupKey("R1", ("x", "t1")), GroupKey("R2", ("x", "t1")), GroupKey("R1", ("x", "t2"))
        store.save([Change(a, state_for(a), None, NOW + 60_000)])
        loaded = store.load([a, b, c], NOW)
        assert loaded[a].state is not None
        assert loaded[b].state is None and loaded[c].state is None

    def test_create_over_an_existing_state_conflicts(self, store: StateStore) -> None:
        key = GroupKey("R", ("a",))
        store.save([Change(key, state_for(key), None, NOW + 60_000)])
        with pytest.raises(KeysConflict) as info:
            store.save([Change(key, state_for(key, 2), None, NOW + 60_000)])
        assert info.value.keys == [key]
        assert store.load([key], NOW)[key].state.to_bytes() == state_for(key).to_bytes()  # type: ignore[union-attr]

    def test_update_with_a_stale_token_conflicts_and_fresh_token_wins(self, store: StateStore) -> None:
        key = GroupKey("R", ("a",))
        store.save([Change(key, state_for(key), None, NOW + 60_000)])
        first = store.load([key], NOW)[key]
        store.save([Change(key, state_for(key, 2), first.token, NOW + 60_000)])
        with pytest.raises(KeysConflict):
            store.save([Change(key, state_for(key, 3), first.token, NOW + 60_000)])
        fresh = store.load([key], NOW)[key]
        assert fresh.state is not None and len(fresh.state.entries) == 2
        store.save([Change(key, state_for(key, 4), fresh.token, NOW + 60_000)])
        assert len(store.load([key], NOW)[key].state.entries) == 4  # type: ignore[union-attr]

    def test_a_conflict_on_one_key_still_writes_the_others(self, store: StateStore) -> None:
        a, b = GroupKey("R", ("a",)), GroupKey("R", ("b",))
        store.save([Change(a, state_for(a), None, NOW + 60_000)])
        with pytest.raises(KeysConflict) as info:
            store.save([Change(a, state_for(a, 2), None, NOW + 60_000), Change(b, state_for(b), None, NOW + 60_000)])
        assert info.value.keys == [a]
        assert store.load([b], NOW)[b].state is not None

    def test_expired_state_is_ignored_on_read_and_can_be_overwritten(self, store: StateStore) -> None:
        key = GroupKey("R", ("a",))
        store.save([Change(key, state_for(key), None, NOW + 1000)])
        later = store.load([key], NOW + 1000)[key]
        assert later.state is None
        store.save([Change(key, state_for(key, 2), later.token, NOW + 90_000)])
        assert len(store.load([key], NOW + 2000)[key].state.entries) == 2  # type: ignore[union-attr]

    def test_purge_deletes_only_expired_states(self, store: StateStore) -> None:
        keys = [GroupKey("R", (f"k{i}",)) for i in range(5)]
        store.save([Change(k, state_for(k), None, NOW + (1000 if i < 3 else 10**9)) for i, k in enumerate(keys)])
        assert store.purge_expired(NOW + 5000) == 3
        loaded = store.load(keys, NOW)
        assert [loaded[k].state is not None for k in keys] == [False, False, False, True, True]
        assert store.purge_expired(NOW + 5000) == 0

    def test_delete_change_removes_state(self, store: StateStore) -> None:
        key = GroupKey("R", ("a",))
        store.save([Change(key, state_for(key), None, NOW + 60_000)])
        token = store.load([key], NOW)[key].token
        store.save([Change(key, None, token, 0)])
        assert store.load([key], NOW)[key].state is None

    def test_the_outbox_and_eviction_mark_are_written_with_the_state(self, store: StateStore) -> None:
        key = GroupKey("R", ("a", "t1"), "t1")
        st = state_for(key, 2)
        st.mark = [NOW - 5, 7]
        st.add_record(OutboxRecord([1, -2], [{"incidentId": "inc-1", "revision": 2, "action": "created"}]).encode())
        st.add_record(OutboxRecord([3], [{"incidentId": "inc-1", "revision": 3, "action": "updated"}]).encode())
        store.save([Change(key, st, None, NOW + 60_000)])
        got = store.load([key], NOW)[key].state
        assert got is not None and got.to_bytes() == st.to_bytes() and got.outbox_bytes() == st.outbox_bytes()
        assert (got.mark, got.key.tenant) == ([NOW - 5, 7], "t1")
        assert [OutboxRecord.decode(r).ids for r in got.outbox] == [[1, -2], [3]]

    def test_load_due_lists_groups_whose_due_time_has_passed_and_forgets_it_when_cleared(self, store: StateStore) -> None:
        keys = [GroupKey("R", (f"d{i}",)) for i in range(4)]
        dues = [NOW - 5, NOW, NOW + 5, None]
        store.save([Change(k, state_for(k), None, NOW + 60_000, due) for k, due in zip(keys, dues, strict=True)])
        due = store.load_due(NOW, NOW, 100)
        assert sorted(k.values[0] for k in due) == ["d0", "d1"]
        loaded = due[keys[0]]
        assert loaded.state is not None and loaded.state.to_bytes() == state_for(keys[0]).to_bytes()
        # saving with the token it came with clears the due time; the token guards it like load()'s
        store.save([Change(keys[0], loaded.state, loaded.token, NOW + 60_000, None)])
        assert sorted(k.values[0] for k in store.load_due(NOW, NOW, 100)) == ["d1"]
        with pytest.raises(KeysConflict):
            store.save([Change(keys[0], loaded.state, loaded.token, NOW + 60_000, None)])

    def test_load_due_skips_expired_groups_and_honours_the_limit(self, store: StateStore) -> None:
        keys = [GroupKey("R", (f"e{i}",)) for i in range(3)]
        store.save([Change(k, state_for(k), None, NOW + (10 if i == 0 else 60_000), NOW) for i, k in enumerate(keys)])
        assert keys[0] not in store.load_due(NOW, NOW + 10, 100)
        assert len(store.load_due(NOW, NOW + 10, 1)) == 1

    def test_partition_progress_round_trips_and_stays_out_of_group_state(self, store: StateStore) -> None:
        assert store.load_progress() == {}
        store.save_progress("0", NOW, NOW + 7)
        store.save_progress("1/x", NOW - 5, NOW + 8)
        store.save_progress("0", NOW + 1, NOW + 9)  # the newest report replaces the older one
        assert store.load_progress() == {"0": (NOW + 1, NOW + 9), "1/x": (NOW - 5, NOW + 8)}
        assert store.purge_expired(NOW + 10**12) == 0 and store.load_due(NOW + 10**12, NOW, 100) == {}

    def test_a_loaded_state_is_the_callers_own(self, store: StateStore) -> None:
        """The engine changes the states it loads in place: that never shows in what the store hands
        out next (from load or load_due). (A state given to ``save`` is the store's from then on.)"""
        key = GroupKey("R", ("a", "t"), "t")
        st = _rich_state(key)
        expected = st.to_bytes()
        store.save([Change(key, st, None, NOW + 60_000, NOW)])
        for _ in range(2):
            got = store.load([key], NOW)[key].state
            due = store.load_due(NOW, NOW, 10)[key].state
            assert got is not None and due is not None and got is not due
            assert got.to_bytes() == expected and due.to_bytes() == expected
            _scribble(got)
            _scribble(due)


def _rich_state(key: GroupKey) -> GroupState:
    """A state with every part filled: entries with values, a mark, an incident with entities,
    pending entities, join links, correlator fields and an outbox."""
    st = state_for(key, 3)
    st.mark = [NOW - 5, 7]
    assert st.incident is not None
    st.incident.entities = {"hosts": ["h1"], "files": [{"name": "a.exe"}], "techniques": [{"id": "T1053"}]}
    st.pending = {"users": ["u1"], "files": [{"name": "b.exe"}]}
    st.links = [["R2", ["x", "t"], "t"]]
    st.ext = {"c": 5, "p": [1, 2, [3, {"k": ["v"]}]], "t": [1, 2]}
    st.add_record(OutboxRecord([1, -2], [{"incidentId": "inc-1"}]).encode())
    return st


def _scribble(st: GroupState) -> None:
    """Change every part of ``st`` in place, the ways the engine and the correlator do and more."""
    st.entries[0][2] = "changed"
    st.entries.append([NOW + 99, 99])
    assert st.mark is not None and st.incident is not None and st.incident.entities is not None and st.pending is not None
    st.mark[0] += 1
    st.incident.revision += 1
    st.incident.attributes["alertName"] = "changed"
    st.incident.entities["hosts"].append("h2")
    st.incident.entities["files"][0]["name"] = "changed"
    st.pending["users"].append("u2")
    st.links[0][1].append("y")
    assert st.ext is not None
    st.ext["p"][2][1]["k"].append("w")
    st.ext["c"] = 6
    st.outbox.append(b"x")
