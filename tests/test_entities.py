"""Entities from every wire format's raw record, built against the real payloads in ../shared/samples/real."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from shared import entities
from shared.entities import MAX_ENTITIES_BYTES, MAX_PER_KIND, EntityBag, extract, merge
from shared.normalize import NormalizedEvent, Normalizer, iter_paths

NOW = datetime(2026, 11, 20, tzinfo=timezone.utc)


def events_of(path: Path) -> list[NormalizedEvent]:
    return [i for i in iter_paths(Normalizer(), [str(path)], lambda: NOW) if isinstance(i, NormalizedEvent)]


def one(samples: Path, name: str) -> dict[str, Any]:
    (event,) = events_of(samples / name)
    return extract(event)


def test_graph_live_alert_gives_its_device_user_processes_hashes_and_portal_links(samples: Path) -> None:
    ent = one(samples, "graph-alerts_v2__rknightion-graph2otel__securityalerts-live-alert.json")
    assert ent["hosts"] == ["alex-2"]
    assert ent["users"][0] == "rob@m7kni.io"  # the bare "rob" of the device's logged-on users folds into it
    assert "rob" not in ent["users"]
    assert ent["ips"][:2] == ["81.187.237.31", "10.0.0.4"]  # external and last IP first
    assert not {"127.0.0.1", "::1"} & set(ent["ips"]) and not [ip for ip in ent["ips"] if ip.startswith("fe80")]
    commands = [p["commandLine"] for p in ent["processes"]]
    assert "curl -fsSL https://openclaw.ai/install.sh" in commands
    curl = next(f for f in ent["files"] if f["name"] == "curl")
    assert curl["sha256"] == "f0ac12add62e2e981d9689f5f027a3fcb3edd8a0f31b0a0ca7709fb5e4969765" and curl["path"] == "/usr/bin/"
    assert ent["links"] == [
        "https://security.microsoft.com/alerts/da7d9031bd-68b8-4a8b-9a0a-e3789eba907d_1?tid=4b8c18bd-2f9f-4227-af55-9f1061cf9c32",
        "https://security.microsoft.com/incident2/8/overview?tid=4b8c18bd-2f9f-4227-af55-9f1061cf9c32",
    ]
    assert ent["techniques"] == [{"id": "T1119"}, {"id": "T1185"}]


def test_graph_alert_file_and_process_evidence_of_one_binary_give_one_file(samples: Path) -> None:
    ent = one(samples, "graph-alerts_v2__elastic-integrations__m365_defender-alert-test-alert.log")
    assert ent["hosts"] == ["tempDns"] and ent["users"] == ["NT AUTHORITY\\SYSTEM"] and ent["ips"] == ["1.1.1.1"]
    assert ent["files"] == [
        {
            "name": "MsSense.exe",
            "path": "C:\\Program Files\\temp",
            "sha1": "5f1e8acedc065031aad553b710838eb366cfee9a",
            "sha256": "8963a19fb992ad9a76576c5638fd68292cffb9aaac29eb8285f9abf6196a7dec",
        }
    ]
    assert ent["processes"] == [{"commandLine": '"MsSense.exe"', "name": "MsSense.exe", "pid": 4780}]
    assert ent["techniques"] == [{"id": "T1564.001"}]


def test_mde_api_alert_gives_host_users_process_file_and_a_portal_link(samples: Path) -> None:
    ent = one(samples, "mde-alerts-api__microsoftdocs-defender-docs__api-alerts.md-example.json")
    assert ent["hosts"] == ["temp123.middleeast.corp.microsoft.com"]
    assert ent["users"] == ["DOMAIN\\temp123", "temp123@microsoft.com"]
    assert ent["processes"][0]["commandLine"] == "rundll32.exe  c:\\temp\\suspicious.dll,RepeatAfterMe"
    assert {f["name"] for f in ent["files"]} == {"rundll32.exe", "suspicious.dll"}
    assert ent["links"] == [
        "https://security.microsoft.com/alerts/da637472900382838869_1364969609?tid=a839b112-1253-6432-9bf6-94542403f21c"
    ]
    assert [t["id"] for t in ent["techniques"]] == ["T1064", "T1085", "T1220"]


def test_mde_api_lines_split_per_evidence_merge_into_one_alert(samples: Path) -> None:
    events = events_of(samples / "mde-alerts-api__elastic-integrations__microsoft_defender_endpoint-log-test-defenderatp.log")
    same_alert = [e for e in events if e.attrs["alertIdStr"] == "da637291048912199236_1126926584"]
    ent = merge(events=same_alert)
    assert ent["hosts"] == ["testserver4"] and ent["users"] == ["TestServer4\\administrator1"]
    assert ent["processes"] == [{"commandLine": '"notepad.exe"', "name": "notepad.exe", "pid": 4104}]


def test_siem_api_detection_gives_host_file_with_md5_and_the_mtp_links(samples: Path) -> None:
    ent = one(samples, "mde-siem-api__microsoftdocs-windows-itpro-docs__pull-alerts-using-rest-api.md-example.json")
    assert ent["hosts"] == ["mymachine1.domain.com"]  # MachineName "mymachine1" is the same host
    assert ent["files"] == [
        {
            "name": "cmdParent.exe",
            "path": "C:\\WINDOWS\\SysWOW64\\boo3\\qwerty",
            "sha1": "aabbccddee1122334455aabbccddee1122334455",
            "md5": "854b85cbff2752fcb88606bca76f83c6",
        }
    ]
    assert ent["links"][0] == "https://security.microsoft.com/alert/da637370718981685665_16349121"


def test_streaming_alert_evidence_rows_give_ip_user_and_the_alert_link(samples: Path) -> None:
    ip = one(samples, "streaming-api__rknightion-graph2otel__alertevidence_test.go__liveRecord.json")
    user = one(samples, "streaming-api__rknightion-graph2otel__alertevidence_test.go__userRecord.json")
    info = one(samples, "streaming-api__rknightion-graph2otel__alertinfo_test.go__liveRecord.json")
    assert ip["ips"] == ["2001:67c:e60:c0c:192:42:116:55"]
    assert user["users"] == ["risk-synth-delete-me@m7kni.io"]
    assert info["hosts"] == [] and info["users"] == []  # AlertInfo rows carry no entities: the join brings them
    link = "https://security.microsoft.com/alerts/ad6450625369250ba3fc4b5752f34f474ec80b20ae?tid=4b8c18bd-2f9f-4227-af55-9f1061cf9c32"
    assert ip["links"] == user["links"] == info["links"] == [link]


def test_streaming_attack_techniques_keep_their_names(samples: Path) -> None:
    events = events_of(samples / "streaming-api__elastic-integrations__m365_defender-event-test-alert.log")
    evidence, info = events[0], events[1]
    assert extract(info)["techniques"] == [
        {"id": "T1078", "name": "Valid Accounts"},
        {"id": "T1078.004", "name": "Cloud Accounts"},
    ]
    ent = extract(evidence)
    assert ent["hosts"] == ["TestMachine1"] and ent["users"] == ["a-domain\\account name"] and ent["ips"] == ["81.2.69.192"]
    assert ent["files"][0]["sha256"] == "bd914e55d55a31b7bdc95fa617f9925ff3eba703afd7a8b70cea18dcae512345"


def test_every_real_record_yields_entities_of_the_documented_shape(samples: Path) -> None:
    for path in sorted(samples.iterdir()):
        if path.suffix == ".md":
            continue
        for event in events_of(path):
            ent = extract(event)
            assert list(ent) == [*entities.KINDS, "truncated"], path
            assert len(orjson.dumps(ent)) <= MAX_ENTITIES_BYTES


def test_bare_names_fold_into_qualified_ones_in_either_order() -> None:
    for order in ((["fin-ws-017", "FIN-WS-017.contoso.local"]), (["fin-ws-017.contoso.local", "fin-ws-017"])):
        bag = EntityBag()
        for h in order:
            bag.host(h)
        assert len(bag.to_dict()["hosts"]) == 1 and "." in bag.to_dict()["hosts"][0]
    bag = EntityBag()
    bag.user("j.doe")
    bag.user("j.doe", "CONTOSO")
    bag.user("J.DOE")
    bag.user("x", upn="x@contoso.com")
    assert bag.to_dict()["users"] == ["CONTOSO\\j.doe", "x@contoso.com"]


def test_two_qualified_hosts_with_the_same_short_name_stay_apart() -> None:
    bag = EntityBag()
    bag.host("web01.a.example")
    bag.host("web01.b.example")
    bag.host("web01")
    assert bag.to_dict()["hosts"] == ["web01.a.example", "web01.b.example"]


def test_only_https_links_are_kept_and_evidence_urls_are_never_links() -> None:
    bag = EntityBag()
    bag.link("javascript:alert(1)")
    bag.link("http://security.microsoft.com/x")
    bag.url("javascript:alert(1)")
    out = bag.to_dict()
    assert out["links"] == [] and out["urls"] == ["javascript:alert(1)"]


def test_a_flood_of_evidence_is_capped_per_kind_and_says_so() -> None:
    rec = {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": "a1",
        "createdDateTime": "2026-11-20T00:00:00Z",
        "mitreTechniques": [f"T{1000 + i}" for i in range(100)],
        "evidence": [
            {
                "@odata.type": "#microsoft.graph.security.processEvidence",
                "processCommandLine": f"cmd.exe /c {i} " + "x" * 5000,
                "imageFile": {"fileName": f"f{i}.exe", "sha256": f"{i:064x}"},
                "userAccount": {"accountName": f"user{i}", "domainName": "D"},
            }
            for i in range(5000)
        ]
        + [
            {"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": f"10.0.{i // 256}.{i % 256}"}
            for i in range(3000)
        ],
    }
    (event,) = [i for i in Normalizer().from_document(rec, "x", NOW) if isinstance(i, NormalizedEvent)]
    ent = extract(event)
    assert len(orjson.dumps(ent)) <= MAX_ENTITIES_BYTES
    assert all(len(ent[k]) <= MAX_PER_KIND for k in ("users", "ips", "files", "processes"))
    assert {"users", "ips", "files", "processes", "techniques"} <= set(ent["truncated"])
    assert all(len(p["commandLine"]) <= entities.MAX_LONG_TEXT for p in ent["processes"])


FIELDS = st.sampled_from(
    [
        "evidence", "userAccount", "imageFile", "fileDetails", "ipInterfaces", "loggedOnUsers", "relatedUser", "properties",
        "AdditionalFields", "AttackTechniques", "mitreTechniques", "@odata.type", "EntityType", "LogOnUsers", "accountName",
        "processCommandLine", "ipAddress", "url", "fileName", "sha256", "DeviceName", "alertWebUrl", "processId",
    ]
)  # fmt: skip
LEAVES = st.none() | st.booleans() | st.integers() | st.sampled_from(["", "10.0.0.1", "T1053.005", "{", "[", "x@y", "a\\b"])
JSON = st.recursive(
    LEAVES | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(FIELDS, children, max_size=4),
    max_leaves=12,
)


@given(fmt=st.sampled_from(["graph", "mde", "siem", "streaming", "normalized"]), raw=st.dictionaries(FIELDS, JSON, max_size=5))
@example(fmt="graph", raw={"evidence": [{"@odata.type": "deviceEvidence", "ipInterfaces": "10.0.0.1"}]})
@example(fmt="streaming", raw={"properties": {"AdditionalFields": "{not json", "AttackTechniques": "[1, 2]"}})
def test_extraction_never_raises_and_stays_within_its_caps_on_any_shape(fmt: str, raw: dict[str, Any]) -> None:
    event = NormalizedEvent({"hostName": ["not", "a", "string"], "user": 5}, "id", NOW, False, "alert", fmt, "p", raw)
    ent = extract(event)
    assert list(ent) == [*entities.KINDS, "truncated"]
    assert len(orjson.dumps(ent)) <= MAX_ENTITIES_BYTES
    assert merge(ent, ent) == merge(ent)  # folding the same entities twice changes nothing
    assert entities.expand(entities.compact(ent)) == ent  # what state and outbox store gives the snapshot back


# -- the streaming extractor against the straightforward reading it replaced ---------------------


def _reference_streaming(bag: EntityBag, rec: dict[str, Any]) -> None:
    """The streaming extractor as first written (every column passed on, techniques read each time)."""
    props = rec.get("properties")
    if not isinstance(props, dict):
        return
    extra = props.get("AdditionalFields")
    if isinstance(extra, str) and extra.startswith("{"):
        try:
            extra = orjson.loads(extra)
        except orjson.JSONDecodeError:
            extra = None
    extra = extra if isinstance(extra, dict) else {}
    bag.host(props.get("DeviceName"))
    entity = str(props.get("EntityType", "")).lower()
    upn = props.get("AccountUpn")
    if entity in ("mailbox", "mailmessage"):
        bag.mailbox(upn)
    bag.user(props.get("AccountName"), props.get("AccountDomain"), upn)
    bag.ip(props.get("RemoteIP"))
    bag.ip(props.get("LocalIP"))
    bag.url(props.get("RemoteUrl"))
    if props.get("FileName") or props.get("SHA1") or props.get("SHA256"):
        bag.file(props.get("FileName"), props.get("FolderPath"), sha1=props.get("SHA1"), sha256=props.get("SHA256"))
    name = props.get("FileName") if entity == "process" else None
    bag.process(props.get("ProcessCommandLine"), name if props.get("ProcessCommandLine") else None, extra.get("ProcessId"))
    for text in entities._technique_texts(props.get("AttackTechniques")):
        named = entities._NAMED_TECHNIQUE.match(text)
        if named:
            bag.technique(named.group(2), named.group(1))
        else:
            bag.technique(text)
    alert_id = entities._cut(props.get("AlertId"))
    if alert_id:
        link = f"{entities.PORTAL}/alerts/{entities.quote(alert_id, safe='')}"
        tenant = entities._cut(rec.get("tenantId"))
        bag.link(link + (f"?tid={entities.quote(tenant, safe='')}" if tenant else ""))


_COLUMN_VALUES = st.one_of(
    st.none(),
    st.just(""),
    st.just(0),
    st.integers(-5, 5),
    st.booleans(),
    st.sampled_from(["process", "Mailbox", "mailmessage", "File", "fin-ws-017.contoso.local", "CONTOSO\\j.doe"]),
    st.sampled_from(["10.0.0.4", "127.0.0.1", "fe80::1%3", "j.doe@contoso.com", "a" * 40, "https://evil.example/x"]),
    st.sampled_from(['{"ProcessId": 42}', '{"ProcessId": "7"}', "{bad", "[1]"]),
    st.sampled_from(
        [
            '["Scheduled Task/Job (T1053)","Scheduled Task (T1053.005)"]',
            '["t1059.001", " T1003 ", "Name (T99)", 5, null]',
            "Valid Accounts (T1078)",
            "[not json",
            "T1105",
        ]
    ),
    st.lists(st.sampled_from(["T1053", "Masquerading (T1036)", "x"]), max_size=3),
    st.text(max_size=12),
)
_COLUMNS = [
    "DeviceName", "EntityType", "AccountUpn", "AccountName", "AccountDomain", "RemoteIP", "LocalIP", "RemoteUrl",
    "FileName", "FolderPath", "SHA1", "SHA256", "ProcessCommandLine", "AdditionalFields", "AttackTechniques", "AlertId",
]  # fmt: skip


@given(
    props=st.dictionaries(st.sampled_from(_COLUMNS), _COLUMN_VALUES, max_size=10),
    tenant=st.one_of(st.none(), st.sampled_from(["tenant-0", "t/1 ü", ""])),
    alert_id=st.one_of(st.none(), st.sampled_from(["da0_7", "id with space/ü", "x~y.z-1"])),
)
@example(props={"ProcessCommandLine": 0, "FileName": "a.exe", "EntityType": "process"}, tenant=None, alert_id=None)
@example(props={"AccountDomain": "CONTOSO"}, tenant=None, alert_id=None)
def test_streaming_extractor_gives_what_the_straightforward_reading_gives(
    props: dict[str, Any], tenant: str | None, alert_id: str | None
) -> None:
    if alert_id is not None:
        props = {**props, "AlertId": alert_id}
    rec: dict[str, Any] = {"category": "AdvancedHunting-AlertEvidence", "properties": props}
    if tenant is not None:
        rec["tenantId"] = tenant
    expected, got = EntityBag(), EntityBag()
    _reference_streaming(expected, rec)
    for _ in range(2):  # the second reading of a technique text comes from memory
        got = EntityBag()
        entities._streaming(got, rec)
        assert got.to_dict() == expected.to_dict()


@given(st.text(max_size=20))
@example("a b/c")
@example("")
def test_alert_link_parts_are_quoted_as_quote_quotes_them(text: str) -> None:
    assert entities._quoted(text) == entities.quote(text, safe="")


def test_an_empty_bag_gives_the_empty_shape_and_a_new_one_each_time() -> None:
    bag = EntityBag()
    first, second = bag.to_dict(copy=False), bag.to_dict(copy=False)
    assert first == second == entities.empty() and first is not second and first["hosts"] is not second["hosts"]


@given(
    tid=st.one_of(st.sampled_from(["T1053", " t1059.001 ", "T99", "T1003.0011", "", "x" * 20]), st.text(max_size=18)),
    name=st.one_of(st.none(), st.just(""), st.just("  "), st.text(max_size=140)),
)
def test_a_remembered_technique_reading_is_the_fresh_reading(tid: str, name: str | None) -> None:
    expected = entities._technique(tid, name)
    for _ in range(2):  # the second call answers from memory
        bag = EntityBag()
        bag.technique(tid, name)
        assert bag.to_dict()["techniques"] == (
            [{"id": expected[0], **({"name": expected[1]} if expected[1] else {})}] if expected else []
        )
