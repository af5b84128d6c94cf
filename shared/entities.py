"""Who and what an alert is about: hosts, users, IPs, files, processes, mailboxes, URLs, portal links
and the ATT&CK techniques Defender actually observed, taken from each wire format's raw record.

Pure functions over a :class:`NormalizedEvent` (its attributes and its raw record) returning a
JSON-ready dict. Values are deduplicated (case-insensitively; a bare ``fin-ws-017`` or ``j.doe``
folds into a qualified ``fin-ws-017.contoso.local`` or ``CONTOSO\\j.doe``), every text is cut to a
length cap, every kind to ``MAX_PER_KIND`` values, and the whole to ``MAX_ENTITIES_BYTES`` encoded;
a kind that lost values is listed in ``truncated``. Extraction never raises: a record of an
unexpected shape yields what could be read (an extra must never lose the alert).

Shape (every key always present)::

    {"hosts": ["fin-ws-017.contoso.local"], "users": ["CONTOSO\\\\j.doe"], "ips": ["10.0.0.4"],
     "files": [{"name": "upd.exe", "path": "C:\\\\Users\\\\Public", "sha1": "...", "sha256": "...", "md5": "..."}],
     "processes": [{"commandLine": "schtasks.exe /create ...", "name": "schtasks.exe", "pid": 4242}],
     "mailboxes": ["j.doe@contoso.com"], "urls": ["http://evil.example/x"],
     "links": ["https://security.microsoft.com/alerts/<id>?tid=<tenant>"],
     "techniques": [{"id": "T1053.005", "name": "Scheduled Task"}], "truncated": []}
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import orjson

from .normalize import NormalizedEvent
from .values import TextMemo

log = logging.getLogger(__name__)

KINDS = ("hosts", "users", "ips", "files", "processes", "mailboxes", "urls", "links", "techniques")
MAX_PER_KIND = 10  # values per kind: an incident card stays readable and the state small
MAX_TECHNIQUES = 20  # technique ids are short; alerts list up to a dozen
MAX_TEXT = 256  # host, user, path, mailbox text
MAX_LONG_TEXT = 1024  # command lines and URLs
MAX_ENTITIES_BYTES = 8 * 1024  # encoded entities of one incident (kept in its group state and in every snapshot)
PORTAL = "https://security.microsoft.com"

_TECHNIQUE = re.compile(r"^T\d{4}(?:\.\d{3})?$")
_NAMED_TECHNIQUE = re.compile(r"^(.*?)\s*\((T\d{4}(?:\.\d{3})?)\)\s*$")
_HASH_KEYS = ("sha1", "sha256", "md5")
_HEX_HASH = re.compile(r"[0-9A-Fa-f]{32,128}")
_USER_SEP = re.compile(r"[\\@]")


def empty() -> dict[str, Any]:
    """Entities with nothing in them (the shape every snapshot carries), in ``KINDS`` order."""
    return {
        "hosts": [],
        "users": [],
        "ips": [],
        "files": [],
        "processes": [],
        "mailboxes": [],
        "urls": [],
        "links": [],
        "techniques": [],
        "truncated": [],
    }


def compact(ents: Mapping[str, Any]) -> dict[str, Any]:
    """Only the kinds that hold values: what state and outbox store (an alert often has two kinds)."""
    return {k: v for k, v in ents.items() if v}


def copied(ents: Mapping[str, Any] | None) -> dict[str, Any]:
    """``compact(expand(ents))`` with lists and dicts of its own (sharing nothing with ``ents``)."""
    out: dict[str, Any] = {}
    if ents:
        for kind in _ORDER:
            values = ents.get(kind)
            if values and isinstance(values, list):
                out[kind] = [dict(x) if type(x) is dict else x for x in values]
    return out


_ORDER = (*KINDS, "truncated")  # the keys of empty(), in order


def expand(ents: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full shape back from :func:`compact` (every kind, in order): ``expand(compact(e)) == e``."""
    out = empty()
    if ents:
        for key, value in ents.items():
            if key in out and isinstance(value, list):
                out[key] = value
    return out


def _cut(value: Any, limit: int = MAX_TEXT) -> str | None:
    if type(value) is str:  # the common case first (a record's texts): called dozens of times per event
        text = value.strip()
        if not text:
            return None
        return text if len(text) <= limit else text[: limit - 1] + "\u2026"
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


_DICT_KINDS = frozenset(("files", "processes", "techniques"))  # kinds whose values are dicts (copied out)


MAX_IP_CACHE = 4096  # address texts whose parsed form is remembered (a feed repeats a few thousand)
_IPS: dict[str, str | None] = {}


def _ip_shown(text: str) -> str | None:
    """An address as shown, or None when it is no address or says nothing about an alert."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast:
        return None  # noise on every device: says nothing about this alert
    return str(addr)


class EntityBag:
    """Accumulates entities with deduplication and caps; :meth:`to_dict` gives the JSON form.

    ``values`` and the dedup keys hold only the kinds seen so far (a bag is made per group and
    trigger, and most alerts carry two or three kinds)."""

    __slots__ = ("_keys", "truncated", "values")

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}
        self._keys: dict[str, dict[str, int]] = {}
        self.truncated: set[str] = set()

    # -- generic --------------------------------------------------------------------------------

    def _append(self, kind: str, key: str, value: Any) -> int | None:
        """Index of the value under ``key`` (added if new and room is left)."""
        keys = self._keys.get(kind)
        if keys is None:
            keys = self._keys[kind] = {}
            self.values[kind] = []
        index = keys.get(key)
        if index is not None:
            return index
        values = self.values[kind]
        if len(values) >= (MAX_TECHNIQUES if kind == "techniques" else MAX_PER_KIND):
            self.truncated.add(kind)
            return None
        keys[key] = index = len(values)
        values.append(value)
        return index

    def _add_name(self, kind: str, value: Any, short: str) -> None:
        """Hosts and users: a bare name folds into a qualified one with the same short name."""
        text = _cut(value)
        if text is None:
            return
        folded = text.casefold()
        keys = self._keys.get(kind) or {}
        if folded in keys:
            return
        bare = folded == short
        if bare and f"short:{short}" in keys:
            return  # a qualified form of this name is already there
        if not bare and short in keys:  # replace the bare form by the qualified one
            bare_index = keys.pop(short)
            self.values[kind][bare_index] = text
            keys[folded] = bare_index
            keys.setdefault(f"short:{short}", bare_index)
            return
        added = self._append(kind, folded, text)
        if added is not None and not bare:
            self._keys[kind].setdefault(f"short:{short}", added)

    # -- kinds ----------------------------------------------------------------------------------

    def host(self, name: Any) -> None:
        text = _cut(name)
        if text is not None:
            self._add_name("hosts", text, text.split(".", 1)[0].casefold())

    def user(self, name: Any, domain: Any = None, upn: Any = None) -> None:
        name_text, domain_text, upn_text = _cut(name), _cut(domain), _cut(upn)
        if upn_text and "@" in upn_text:
            self._add_name("users", upn_text, upn_text.split("@", 1)[0].casefold())
            return
        if name_text is None:
            return
        if "\\" in name_text or "@" in name_text:
            short = _USER_SEP.split(name_text)[1 if "\\" in name_text else 0]
            self._add_name("users", name_text, short.casefold())
        elif domain_text:
            self._add_name("users", f"{domain_text}\\{name_text}", name_text.casefold())
        else:
            self._add_name("users", name_text, name_text.casefold())

    def ip(self, value: Any) -> None:
        text = _cut(value, 64)
        if text is None:
            return
        shown = _IPS.get(text, "")
        if shown == "":
            shown = _ip_shown(text)
            if len(_IPS) >= MAX_IP_CACHE:
                _IPS.clear()  # addresses are input: the cache must not grow with them
            _IPS[text] = shown
        if shown is not None:
            self._append("ips", shown, shown)

    def file(self, name: Any = None, path: Any = None, **hashes: Any) -> None:
        entry: dict[str, Any] = {}
        name_text, path_text = _cut(name), _cut(path)
        if name_text:
            entry["name"] = name_text
        if path_text:
            entry["path"] = path_text
        for key in _HASH_KEYS:
            h = _cut(hashes.get(key), 128)
            if h and _HEX_HASH.fullmatch(h):
                entry[key] = h.lower()
        if not entry.get("name") and not any(k in entry for k in _HASH_KEYS):
            return
        key = entry.get("sha256") or entry.get("sha1") or entry.get("md5") or f"{path_text or ''}\\{name_text}".casefold()
        index = self._append("files", key, entry)
        if index is not None:  # the same file seen again may bring what the first sighting lacked
            known = self.values["files"][index]
            for k, v in entry.items():
                known.setdefault(k, v)

    def process(self, command_line: Any = None, name: Any = None, pid: Any = None) -> None:
        cmd, name_text = _cut(command_line, MAX_LONG_TEXT), _cut(name)
        if cmd is None and name_text is None:
            return
        entry: dict[str, Any] = {}
        if cmd:
            entry["commandLine"] = cmd
        if name_text:
            entry["name"] = name_text
        if type(pid) is int or (isinstance(pid, str) and pid.isdigit()):
            entry["pid"] = int(pid)
        key = (cmd or "").casefold() + "\x1f" + (name_text or "").casefold()
        index = self._append("processes", key, entry)
        if index is not None:
            known = self.values["processes"][index]
            for k, v in entry.items():
                known.setdefault(k, v)

    def mailbox(self, address: Any) -> None:
        text = _cut(address)
        if text and "@" in text:
            self._append("mailboxes", text.casefold(), text)

    def url(self, value: Any) -> None:
        text = _cut(value, MAX_LONG_TEXT)
        if text:
            self._append("urls", text, text)

    def link(self, value: Any) -> None:
        text = _cut(value, MAX_LONG_TEXT)
        if text and text.startswith("https://"):  # only portal pages; evidence URLs are never links
            self._append("links", text, text)

    def technique(self, tid: Any, name: Any = None) -> None:
        found: tuple[str, str | None] | None
        if type(tid) is str and len(tid) <= 64 and (name is None or type(name) is str):  # remembered: the same few come back
            found = _TECHNIQUE_OF((tid, name), len(name or ""))
        else:
            found = _technique(tid, name)
        if found is not None:
            self._technique(*found)

    def _technique(self, text: str, name_text: str | None) -> None:
        """A technique as :func:`_technique` reads it."""
        entry: dict[str, Any] = {"id": text}
        if name_text:
            entry["name"] = name_text
        index = self._append("techniques", text, entry)
        if index is not None and name_text:
            self.values["techniques"][index].setdefault("name", name_text)

    # -- whole dicts ----------------------------------------------------------------------------

    def add(self, entities: Mapping[str, Any] | None) -> None:
        """Fold another entities dict (e.g. the incident's so far) into this bag."""
        if entities is None or not isinstance(entities, Mapping):  # (None first: the common case, no ABC check)
            return
        get = entities.get  # a kind that is absent (or not a list) adds nothing
        if isinstance(hosts := get("hosts"), list):
            for h in hosts:
                self.host(h)
        if isinstance(users := get("users"), list):
            for u in users:
                self.user(u)
        if isinstance(ips := get("ips"), list):
            for i in ips:
                self.ip(i)
        if isinstance(files := get("files"), list):
            for f in files:
                if isinstance(f, Mapping):
                    self.file(f.get("name"), f.get("path"), **{k: f.get(k) for k in _HASH_KEYS})
        if isinstance(processes := get("processes"), list):
            for p in processes:
                if isinstance(p, Mapping):
                    self.process(p.get("commandLine"), p.get("name"), p.get("pid"))
        if isinstance(mailboxes := get("mailboxes"), list):
            for m in mailboxes:
                self.mailbox(m)
        if isinstance(urls := get("urls"), list):
            for url in urls:
                self.url(url)
        if isinstance(links := get("links"), list):
            for link in links:
                self.link(link)
        if isinstance(techniques := get("techniques"), list):
            for t in techniques:
                if isinstance(t, Mapping):
                    self.technique(t.get("id"), t.get("name"))
        truncated = get("truncated")
        if isinstance(truncated, list):
            self.truncated.update(k for k in truncated if k in KINDS)

    def to_dict(self, copy: bool = True) -> dict[str, Any]:
        """The JSON form; ``copy=False`` hands over the bag's own lists and dicts (for a bag that is
        dropped right after, so nothing can change them behind the result)."""
        out = empty()
        if not self.values and not self.truncated:
            return out  # nothing to cut: the empty shape is far under MAX_ENTITIES_BYTES
        for kind, values in self.values.items():
            out[kind] = ([dict(v) for v in values] if kind in _DICT_KINDS else list(values)) if copy else values
        if self.truncated:
            out["truncated"] = [k for k in KINDS if k in self.truncated]
        return _fit(out)


def _technique(tid: Any, name: Any) -> tuple[str, str | None] | None:
    """``(id, name)`` of a technique as kept (cut, upper-cased id), or None when ``tid`` is no technique id."""
    text = _cut(tid, 16)
    if text is None:
        return None
    text = text.upper()
    if not _TECHNIQUE.match(text):
        return None
    return text, _cut(name, 128)


_TECHNIQUE_OF: TextMemo[tuple[str, str | None], tuple[str, str | None] | None] = TextMemo(lambda key: _technique(*key))


def _items(entities: Mapping[str, Any], kind: str) -> list[Any]:
    values = entities.get(kind)
    return values if isinstance(values, list) else []


def _fit(out: dict[str, Any]) -> dict[str, Any]:
    """Drop the last values of the largest kinds until the encoded entities fit ``MAX_ENTITIES_BYTES``."""
    size = len(orjson.dumps(out))
    while size > MAX_ENTITIES_BYTES:
        kind = max(KINDS, key=lambda k: len(orjson.dumps(out[k])))
        if not out[kind]:
            break
        out[kind].pop()
        if kind not in out["truncated"]:
            out["truncated"].append(kind)
        size = len(orjson.dumps(out))
    return out


# -- per format ------------------------------------------------------------------------------------


def _graph(bag: EntityBag, rec: Mapping[str, Any]) -> None:
    bag.link(rec.get("alertWebUrl"))
    bag.link(rec.get("incidentWebUrl"))
    for tid in _list(rec.get("mitreTechniques")):
        bag.technique(tid)
    for item in _list(rec.get("evidence")):
        if isinstance(item, Mapping):
            _graph_evidence(bag, item)


def _account(bag: EntityBag, account: Any) -> None:
    if isinstance(account, Mapping):
        bag.user(account.get("accountName"), account.get("domainName"), account.get("userPrincipalName"))


def _graph_file(bag: EntityBag, details: Any) -> None:
    if isinstance(details, Mapping):
        bag.file(details.get("fileName"), details.get("filePath"), **{k: details.get(k) for k in _HASH_KEYS})


def _graph_evidence(bag: EntityBag, item: Mapping[str, Any]) -> None:
    otype = str(item.get("@odata.type", "")).rsplit(".", 1)[-1]
    if otype == "deviceEvidence":
        bag.host(item.get("deviceDnsName") or item.get("hostName"))
        bag.ip(item.get("lastExternalIpAddress"))
        bag.ip(item.get("lastIpAddress"))
        for addr in _list(item.get("ipInterfaces")):
            bag.ip(addr)
        for logged_on in _list(item.get("loggedOnUsers")):
            _account(bag, logged_on)
    elif otype == "processEvidence":
        image = item.get("imageFile")
        name = image.get("fileName") if isinstance(image, Mapping) else None
        bag.process(item.get("processCommandLine"), name, item.get("processId"))
        _graph_file(bag, image)
    elif otype == "fileEvidence":
        _graph_file(bag, item.get("fileDetails"))
    elif otype == "mailboxEvidence":
        bag.mailbox(item.get("primaryAddress"))
    elif otype == "analyzedMessageEvidence":
        bag.mailbox(item.get("recipientEmailAddress"))
        for sender in ("p1Sender", "p2Sender"):
            s = item.get(sender)
            if isinstance(s, Mapping):
                bag.mailbox(s.get("emailAddress"))
        bag.ip(item.get("senderIp"))
    elif otype == "networkConnectionEvidence":
        for side in ("sourceAddress", "destinationAddress"):
            addr = item.get(side)
            if isinstance(addr, Mapping):
                bag.ip(addr.get("ipAddress"))
    elif otype == "hostLogonSessionEvidence":
        host = item.get("host")
        if isinstance(host, Mapping):
            bag.host(host.get("deviceDnsName") or host.get("hostName"))
        account = item.get("account")
        if isinstance(account, Mapping):
            _account(bag, account.get("userAccount"))
    # Shapes shared by many evidence types (user, ip, url, blob, ...).
    _account(bag, item.get("userAccount"))
    bag.ip(item.get("ipAddress"))
    bag.url(item.get("url"))


def _mde(bag: EntityBag, rec: Mapping[str, Any]) -> None:
    bag.host(rec.get("computerDnsName"))
    related = rec.get("relatedUser")
    if isinstance(related, Mapping):
        bag.user(related.get("userName"), related.get("domainName"))
    for tid in _list(rec.get("mitreTechniques")):
        bag.technique(tid)
    evidence = rec.get("evidence")
    for item in [evidence] if isinstance(evidence, Mapping) else _list(evidence):  # Elastic splits one per line
        if not isinstance(item, Mapping):
            continue
        bag.user(item.get("accountName"), item.get("domainName"), item.get("userPrincipalName"))
        bag.ip(item.get("ipAddress"))
        bag.url(item.get("url"))
        kind = str(item.get("entityType", "")).lower()
        if kind == "process":
            bag.process(item.get("processCommandLine"), item.get("fileName"), item.get("processId"))
        if kind in ("file", "process"):
            bag.file(item.get("fileName"), item.get("filePath"), sha1=item.get("sha1"), sha256=item.get("sha256"))
    alert_id = _cut(rec.get("id"))
    if alert_id:
        bag.link(_alert_link(alert_id, _cut(rec.get("aadTenantId"))))


def _siem(bag: EntityBag, rec: Mapping[str, Any]) -> None:
    bag.host(rec.get("ComputerDnsName") or rec.get("MachineName"))
    bag.user(rec.get("UserName"), rec.get("UserDomain"))
    for logged_on in _split(rec.get("LogOnUsers")):
        bag.user(logged_on)
    bag.file(rec.get("FileName"), rec.get("FilePath"), sha1=rec.get("Sha1"), sha256=rec.get("Sha256"), md5=rec.get("Md5"))
    bag.process(rec.get("CommandLine"))
    bag.ip(rec.get("IpAddress"))
    for addr in [*_split(rec.get("InternalIPv4List")), *_split(rec.get("InternalIPv6List"))]:
        bag.ip(addr)
    bag.url(rec.get("Url"))
    bag.link(rec.get("LinkToMTP") or rec.get("LinkToWDATP"))
    bag.link(rec.get("IncidentLinkToMTP"))


def _streaming(bag: EntityBag, rec: Mapping[str, Any]) -> None:
    props = rec.get("properties")
    if not isinstance(props, Mapping):
        return
    get = props.get
    extra = get("AdditionalFields")
    if isinstance(extra, str) and extra.startswith("{"):
        try:
            extra = orjson.loads(extra)
        except orjson.JSONDecodeError:
            extra = None
    extra = extra if isinstance(extra, Mapping) else {}
    # A column that is absent (None) adds nothing: such calls are not made (an AlertInfo row has few of these columns).
    device = get("DeviceName")
    if device is not None:
        bag.host(device)
    entity = str(get("EntityType", "")).lower()
    upn, account = get("AccountUpn"), get("AccountName")
    if entity in ("mailbox", "mailmessage"):
        bag.mailbox(upn)
    if upn is not None or account is not None:  # a domain alone names no user
        bag.user(account, get("AccountDomain"), upn)
    for column in ("RemoteIP", "LocalIP"):
        address = get(column)
        if address is not None:
            bag.ip(address)
    url = get("RemoteUrl")
    if url is not None:
        bag.url(url)
    if get("FileName") or get("SHA1") or get("SHA256"):
        bag.file(get("FileName"), get("FolderPath"), sha1=get("SHA1"), sha256=get("SHA256"))
    command = get("ProcessCommandLine")
    if command is not None:  # no command line: no name either, so no process
        bag.process(command, get("FileName") if entity == "process" and command else None, extra.get("ProcessId"))
    for tid, name in _streaming_techniques(get("AttackTechniques")):
        bag._technique(tid, name)
    alert_id = _cut(get("AlertId"))
    if alert_id:
        bag.link(_alert_link(alert_id, _cut(rec.get("tenantId"))))


def _normalized(bag: EntityBag, rec: Mapping[str, Any]) -> None:
    bag.host(rec.get("hostName") or rec.get("destName") or rec.get("srcName"))
    bag.user(rec.get("user"))
    for key in ("srcIpAddr", "destIpAddr", "hostIpAddr"):
        bag.ip(rec.get(key))
    bag.file(
        rec.get("fileName"), rec.get("filePath"), sha1=rec.get("hashSHA1"), sha256=rec.get("hashSHA256") or rec.get("hashCode")
    )
    bag.process(rec.get("command"), rec.get("procName"))
    bag.url(rec.get("url"))
    bag.link(rec.get("alertWebUrl"))
    techniques = rec.get("attackTechniqueId")
    for tid in [techniques] if isinstance(techniques, str) else _list(techniques):
        bag.technique(tid)


_EXTRACTORS = {"graph": _graph, "mde": _mde, "siem": _siem, "streaming": _streaming, "normalized": _normalized}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _split(value: Any) -> list[str]:
    """SIEM API list columns: ``;`` or ``,`` separated text."""
    if not isinstance(value, str):
        return []
    return [part.strip() for part in re.split(r"[;,]", value) if part.strip()]


def _streaming_techniques(value: Any) -> tuple[tuple[str, str | None], ...]:
    """``(id, name)`` of each technique of ``AttackTechniques`` (``"Name (T1234)"`` or a bare id)
    as :func:`_technique` reads it (invalid ones left out); remembered per text (a feed repeats a few)."""
    if type(value) is str:
        return _TECHNIQUES_OF(value, len(value))
    return _read_techniques(value)


def _read_techniques(value: Any) -> tuple[tuple[str, str | None], ...]:
    out = []
    for text in _technique_texts(value):
        named = _NAMED_TECHNIQUE.match(text)
        found = _technique(named.group(2), named.group(1)) if named else _technique(text, None)
        if found is not None:
            out.append(found)
    return tuple(out)


_TECHNIQUES_OF: TextMemo[str, tuple[tuple[str, str | None], ...]] = TextMemo(_read_techniques)


def _technique_texts(value: Any) -> list[str]:
    """``AttackTechniques``: a JSON list in a string (``["Name (T1234.001)"]``), a list, or ``""``."""
    if isinstance(value, str):
        if value.startswith("["):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                return []
        else:
            value = [value]
    return [v for v in _list(value) if isinstance(v, str)]


_UNQUOTED = re.compile(r"[A-Za-z0-9_.~-]*")  # the characters quote() never escapes


def _quoted(text: str) -> str:
    return text if _UNQUOTED.fullmatch(text) else quote(text, safe="")


def _alert_link(alert_id: str, tenant: str | None) -> str:
    link = f"{PORTAL}/alerts/{_quoted(alert_id)}"
    return link + (f"?tid={_quoted(tenant)}" if tenant else "")


# -- entry points ----------------------------------------------------------------------------------


def collect(bag: EntityBag, event: NormalizedEvent) -> None:
    """Add what ``event`` says about hosts, users, ... to ``bag``; never raises."""
    attrs = event.attrs
    host, user = attrs.get("hostName"), attrs.get("user")
    if host is not None:
        bag.host(host)
    if user is not None:
        bag.user(user)
    extractor = _EXTRACTORS.get(event.format)
    if extractor is None or not isinstance(event.raw, Mapping):
        return
    try:
        extractor(bag, event.raw)
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:  # odd shapes deep inside
        log.warning("entities of %s at %s: %s: %s", event.format, event.position, type(exc).__name__, exc)


def extract(event: NormalizedEvent) -> dict[str, Any]:
    """The entities of one event."""
    bag = EntityBag()
    collect(bag, event)
    return bag.to_dict(copy=False)


def merge(*parts: Mapping[str, Any] | None, events: Iterable[NormalizedEvent] = ()) -> dict[str, Any]:
    """Entities dicts and events folded into one (first sightings first), deduplicated and capped."""
    bag = EntityBag()
    for part in parts:
        bag.add(part)
    for event in events:
        collect(bag, event)
    return bag.to_dict(copy=False)


def first(entities: Mapping[str, Any] | None, kind: str) -> str:
    """The first value of a kind as text (``""`` when none): hosts, users, links."""
    values = _items(entities or {}, kind)
    if not values:
        return ""
    value = values[0]
    if isinstance(value, Mapping):
        return str(value.get("id") or value.get("name") or value.get("commandLine") or "")
    return str(value)
