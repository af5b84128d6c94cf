"""Teams and Slack payloads put who and where (host, user, Defender link) in their first lines."""

from __future__ import annotations

import json

from shared.webhook import slack_payload, teams_payload
from tests.test_views import snap


def test_teams_card_opens_with_host_user_and_the_defender_link() -> None:
    card = json.loads(teams_payload(snap()))["attachments"][0]["content"]
    facts = card["body"][1]["facts"]
    assert [f["title"] for f in facts[:4]] == ["Host", "User", "Defender", "Tenant"]
    assert facts[0]["value"] == "fin-ws-017.contoso.local" and facts[1]["value"] == "CONTOSO\\j.doe"
    assert facts[2]["value"] == "[Open the alert](https://security.microsoft.com/alerts/da1?tid=t1)"
    observed = next(f["value"] for f in facts if f["title"] == "Observed techniques")
    assert observed == "T1053.005 Scheduled Task"
    assert next(f["value"] for f in facts if f["title"] == "Rule techniques") == "T1053.002"


def test_slack_message_opens_with_host_user_and_the_defender_link() -> None:
    message = json.loads(slack_payload(snap()))
    who = message["blocks"][1]["text"]["text"]
    link = "<https://security.microsoft.com/alerts/da1?tid=t1|Open in Defender>"
    assert who == f"Host fin-ws-017.contoso.local \u00b7 User CONTOSO\\j.doe \u00b7 {link}"
    assert "fin-ws-017.contoso.local" in message["text"] and "CONTOSO\\j.doe" in message["text"]  # the notification text


def test_slack_message_never_lets_alert_data_mention_the_channel_or_add_a_link() -> None:
    hostile = snap(host="<!channel> <https://evil.example/reset|Reset your password>", user="a&b>c")
    hostile["attributes"]["alertName"] = "x <!here>"
    hostile["entities"]["links"] = ["https://security.microsoft.com/alerts/da1|<!everyone>"]
    message = json.loads(slack_payload(hostile))
    who = message["blocks"][1]["text"]["text"]
    fields = [f["text"] for f in message["blocks"][2]["fields"]]
    for text in [who, message["text"], *fields]:
        assert "<!" not in text and "<https://evil" not in text
    assert who.startswith("Host &lt;!channel&gt; &lt;https://evil.example/reset|Reset your password&gt; \u00b7 User a&amp;b&gt;c")
    assert who.endswith("<https://security.microsoft.com/alerts/da1%7C%3C!everyone%3E|Open in Defender>")
    assert "x &lt;!here&gt;" in "".join(fields)


def test_teams_card_never_renders_a_markdown_link_from_alert_data() -> None:
    hostile = snap(host="[Reset your password](https://evil.example/reset)", user="u")
    hostile["attributes"]["alertName"] = "see [here](https://evil.example)"
    card = json.loads(teams_payload(hostile))["attachments"][0]["content"]
    texts = [card["body"][0]["text"], *(f["value"] for f in card["body"][1]["facts"] if f["title"] != "Defender")]
    assert not any("](" in t for t in texts)
    assert card["body"][1]["facts"][0]["value"] == "[Reset your password]\u200b(https://evil.example/reset)"
    defender = next(f["value"] for f in card["body"][1]["facts"] if f["title"] == "Defender")
    assert defender == "[Open the alert](https://security.microsoft.com/alerts/da1?tid=t1)"  # our own link stays a link


def test_cards_without_entities_still_name_host_and_user_from_the_attributes() -> None:
    old = snap()
    del old["entities"]
    old["attributes"].update(hostName="legacy-ws-03", user="b.jones")
    facts = json.loads(teams_payload(old))["attachments"][0]["content"]["body"][1]["facts"]
    assert (facts[0]["value"], facts[1]["value"]) == ("legacy-ws-03", "b.jones")


def test_receiver_prints_host_user_link_and_the_other_entities_of_a_delivery() -> None:
    import io
    import threading

    import orjson

    from shared.receiver import serve
    from shared.webhook import Forwarder, MemoryDeliveryLog, WebhookTarget

    out = io.StringIO()
    receiver = serve("127.0.0.1", 0, "s3cret", out)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/incidents"
    try:
        target = WebhookTarget.model_validate({"url": url, "secret": "s3cret", "allow_http": True, "retries": 0})
        assert Forwarder([target], MemoryDeliveryLog()).handle(orjson.dumps(snap())).delivered == ["default"]
    finally:
        receiver.shutdown()
        receiver.server_close()
    first, *rest = out.getvalue().splitlines()
    assert "host=fin-ws-017.contoso.local user=CONTOSO\\j.doe" in first
    assert first.endswith("https://security.microsoft.com/alerts/da1?tid=t1")
    assert "techniques=[observed T1053.005 Scheduled Task; rule T1053.002]" in first
    assert "    ips: 10.0.0.4" in rest and "    process: schtasks /create /tn x /tr upd.exe" in rest
