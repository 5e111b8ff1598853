"""The policy's QMP commands in-process, driven by qemu.qmp's own QMPClient: rules, gateway
services, their errors as QMP error objects, events, and the state file."""

import json
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from qemu_vpnnet.core import fwd as F
from tests.guestframes import ip
from tests.test_qmp_server import Env, error_of, run


async def execute(client: QMPClient, name: str, arguments: dict[str, object] | None = None) -> Any:
    return await client.execute(name, arguments)


def test_rules_added_and_removed_change_new_decisions(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        table = env.shell.stack.fwd
        assert table.route_from_guest(F.PROTO_TCP, ip("192.0.2.1"), 80).kind == F.DIRECT
        added = await execute(client, "policy-rule-add", {"rule": "refuse tcp 192.0.2.0/24:80 id=web"})
        assert added["id"] == "web" and added["action"] == "refuse" and added["ports"] == "80"
        assert table.route_from_guest(F.PROTO_TCP, ip("192.0.2.1"), 80).kind == F.REFUSE
        first = await execute(
            client,
            "policy-rule-add",
            {"action": "direct", "protocol": "tcp", "destination": "192.0.2.1", "position": 0},
        )
        assert first["id"].startswith("qmp")
        assert table.route_from_guest(F.PROTO_TCP, ip("192.0.2.1"), 80).kind == F.DIRECT  # first match wins
        policy = await execute(client, "query-policy")
        ids = [rule["id"] for rule in policy["rules"]]
        assert ids == ["metadata", "metadata6", first["id"], "web"]
        assert policy["counters"]["refused-by-rule-web"] == 1
        stats = await execute(client, "query-stats")
        assert stats["counters"]["route-refuse"] == 1
        await execute(client, "policy-rule-remove", {"id": first["id"]})
        assert table.route_from_guest(F.PROTO_TCP, ip("192.0.2.1"), 80).kind == F.REFUSE

    run(tmp_path, test)


def test_bad_rules_are_qmp_errors_and_change_nothing(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        cases: list[tuple[dict[str, object], str]] = [
            ({"rule": "block 10.0.0.0/8"}, "Invalid policy rule (unknown action 'block'"),
            ({"rule": "deny tcp 10.0.0.0/8", "action": "direct"}, "mutually exclusive"),
            ({"protocol": "tcp"}, "Parameter 'action' is missing"),
            ({"action": "forward", "destination": "*:80"}, "forward needs a target"),
            ({"action": "refuse", "destination": "10.0.0.300"}, "bad destination"),
            ({"rule": "deny tcp *", "position": -1}, "expects a position between 0 and 4096"),
            ({"rule": 7}, "Invalid parameter type for 'rule', expected: string"),
        ]
        for arguments, message in cases:
            error_class, desc = await error_of(client, "policy-rule-add", arguments)
            assert error_class == "GenericError" and message in desc, (arguments, desc)
        await execute(client, "policy-rule-add", {"rule": "deny tcp * id=a"})
        _cls, desc = await error_of(client, "policy-rule-add", {"rule": "deny udp * id=a"})
        assert "exists already" in desc
        _cls, desc = await error_of(client, "policy-rule-remove", {"id": "nope"})
        assert desc == "no rule with id 'nope'"
        _cls, desc = await error_of(client, "policy-rule-remove", {"id": "metadata"})
        assert "built in" in desc
        assert [rule["id"] for rule in (await execute(client, "query-policy"))["rules"]] == [
            "metadata",
            "metadata6",
            "a",
        ]

    run(tmp_path, test)


def test_policy_set_restrict_and_metadata(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        table = env.shell.stack.fwd
        result = await execute(client, "policy-set", {"restrict": True, "allow-metadata": True})
        assert result["restrict"] is True and result["allow-metadata"] is True
        assert table.route_from_guest(F.PROTO_TCP, ip("198.51.100.1"), 80).rule == "restrict"
        assert table.route_from_guest(F.PROTO_TCP, ip("169.254.169.254"), 80).rule == "restrict"
        await execute(client, "policy-set", {"restrict": False})
        assert table.route_from_guest(F.PROTO_TCP, ip("169.254.169.254"), 80).kind == F.DIRECT

    run(tmp_path, test)


def test_guestfwd_commands_events_and_errors(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        table = env.shell.stack.fwd
        added = await execute(client, "guestfwd-add", {"rule": "tcp:10.0.2.100:1234-tcp:127.0.0.1:5000"})
        assert (added["guest-addr"], added["guest-port"], added["target"]) == ("10.0.2.100", 1234, "tcp:127.0.0.1:5000")
        event = await client.events.get()
        assert event["event"] == "GUESTFWD_ADDED" and event["data"]["rule"] == added["rule"]
        structured = await execute(
            client,
            "guestfwd-add",
            {"protocol": "udp", "guest-addr": "10.0.2.2", "guest-port": 514, "target": "udp:127.0.0.1:5514"},
        )
        assert structured["rule"] == "udp:10.0.2.2:514-udp:127.0.0.1:5514"
        route = table.route_from_guest(F.PROTO_TCP, ip("10.0.2.100"), 1234)
        assert route.kind == F.FORWARD and route.target_text() == "tcp:127.0.0.1:5000"
        listed = await execute(client, "query-guestfwd")
        assert [g["rule"] for g in listed] == [added["rule"], structured["rule"]]
        for arguments, message in [
            ({"rule": "tcp:10.0.2.100:1234-cmd:cat"}, "exists already"),
            ({"rule": "tcp:10.0.2.3:80-cmd:cat"}, "not a free address"),
            ({"rule": "tcp:10.0.2.100:80-ftp:x"}, "Invalid gateway service (unknown target type"),
            ({"guest-addr": "10.0.2.100", "guest-port": 80}, "Parameter 'target' is missing"),
            ({"rule": "tcp:10.0.2.100:1-cmd:cat", "target": "cmd:cat"}, "mutually exclusive"),
        ]:
            _cls, desc = await error_of(client, "guestfwd-add", arguments)
            assert message in desc, (arguments, desc)
        removed = await execute(client, "guestfwd-remove", {"guest-addr": "10.0.2.100", "guest-port": 1234})
        assert removed["rule"] == added["rule"]
        _cls, desc = await error_of(client, "guestfwd-remove", {"guest-addr": "10.0.2.100", "guest-port": 1234})
        assert desc == "no tcp gateway service at 10.0.2.100:1234"
        assert table.route_from_guest(F.PROTO_TCP, ip("10.0.2.100"), 1234).rule == "virtual"

    run(tmp_path, test)


def test_guestfwd_cannot_take_a_leased_address(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        dhcp = env.shell.stack.dhcp
        dhcp._assign(bytes.fromhex("525400000001"), ip("10.0.2.15"), env.shell.now() + 100)
        _cls, desc = await error_of(client, "guestfwd-add", {"rule": "tcp:10.0.2.15:80-cmd:cat"})
        assert desc == "10.0.2.15 is leased to guest 52:54:00:00:00:01"

    run(tmp_path, test)


def test_state_file_keeps_gateway_services_and_runtime_rules(tmp_path: Path) -> None:
    state = tmp_path / "state.json"

    async def test(env: Env) -> None:
        env.forwarder.state_file = str(state)
        env.forwarder.extra_state = env.server.policy.state
        env.server.policy.save_state = env.forwarder.save
        client = await env.client()
        await execute(client, "guestfwd-add", {"rule": "tcp:10.0.2.100:23-cmd:cat"})
        await execute(client, "policy-rule-add", {"rule": "refuse udp *:53 reply=drop id=nodns"})

    run(tmp_path, test)
    saved = json.loads(state.read_text())
    assert saved["guestfwd"] == ["tcp:10.0.2.100:23-cmd:cat"]
    assert saved["rules"] == ["refuse udp *:53 reply=drop id=nodns"]

    async def again(env: Env) -> None:
        env.server.policy.restore(saved, [])
        client = await env.client()
        rules = (await execute(client, "query-policy"))["rules"]
        assert [r["id"] for r in rules] == ["guestfwd-tcp-10.0.2.100:23", "metadata", "metadata6", "nodns"]

    run(tmp_path, again)
