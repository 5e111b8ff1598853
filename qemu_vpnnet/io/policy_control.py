"""The outbound policy at run time: rules from the command line, a watched policy file and QMP,
and the gateway services (guestfwd), with their state kept in the --state file.

The decision itself is the core's (core/fwd.py RouteTable); this module only changes its
tables. Every change applies to new flows: a flow keeps the route it started with.

The policy file is checked for changes (device, inode, size, modification time) at most once a
second. A file that no longer parses is logged with the line of the first bad rule and the
rules read before stay in force; a file that disappears leaves no file rules.
"""

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Final

from qemu_vpnnet.core.config import ip_bytes
from qemu_vpnnet.core.fwd import PROTO_NAMES, RouteTable, Rule
from qemu_vpnnet.io.shell import Shell, StartupError
from qemu_vpnnet.policy import GuestFwdSpec, PolicySyntaxError, guestfwd_rule, parse_guestfwd, parse_policy_file

log = logging.getLogger("qemu_vpnnet.policy")

CHECK_INTERVAL: Final = 1.0
MAX_POLICY_FILE: Final = 1 << 20


class PolicyError(Exception):
    """A change of the policy cannot be made; the message is for the user."""


def spec_info(spec: GuestFwdSpec, rule: Rule) -> dict[str, object]:
    return {
        "protocol": spec.protocol,
        "guest-addr": spec.addr,
        "guest-port": spec.port,
        "target": spec.target,
        "rule": spec.text(),
        "id": rule.id,
        "connections": rule.hits,
    }


class Policy:
    """Owns the changes of the core's RouteTable."""

    def __init__(self, shell: Shell, policy_file: str | None = None) -> None:
        self.shell = shell
        self.table: RouteTable = shell.stack.fwd
        self.policy_file = policy_file
        self.file_key: tuple[int, int, int, int] | None = None
        self.guestfwds: dict[tuple[str, str, int], tuple[GuestFwdSpec, Rule]] = {}
        self.next_id = 1
        self.watch_task: asyncio.Task[None] | None = None
        self.save_state: Callable[[], None] = lambda: None  # writes the --state file (cli.py sets it)

    # ---- rules -------------------------------------------------------------------------
    def new_rule_id(self, prefix: str) -> str:
        while True:
            rule_id = f"{prefix}{self.next_id}"
            self.next_id += 1
            if self.table.rule_by_id(rule_id) is None:
                return rule_id

    def check_unique(self, rule: Rule, replacing: list[Rule] | None = None) -> None:
        existing = self.table.rule_by_id(rule.id)
        if existing is not None and (replacing is None or existing not in replacing):
            raise PolicyError(f"a rule with id '{rule.id}' exists already")

    def set_cli_rules(self, rules: list[Rule]) -> None:
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                raise StartupError(f"rule id '{rule.id}' is used twice")
            seen.add(rule.id)
        self.table.set_rules("cli", rules)
        for rule in rules:
            log.info("policy rule %s", rule.text)

    def add_rule(self, rule: Rule, position: int | None = None, persist: bool = True) -> dict[str, object]:
        """A run-time rule (QMP); position is its index among the run-time rules (default: last)."""
        self.check_unique(rule)
        runtime = list(self.table.runtime)
        if position is None or position > len(runtime):
            position = len(runtime)
        if position < 0:
            raise PolicyError(f"position {position} is out of range 0..{len(runtime)}")
        runtime.insert(position, rule)
        try:
            self.table.set_rules("qmp", runtime)
        except ValueError as exc:
            raise PolicyError(str(exc)) from exc
        log.info("policy rule added: %s", rule.text)
        info = rule.describe()
        self.shell.emit("POLICY_RULE_ADDED", info)
        if persist:
            self.save_state()
        return info

    def remove_rule(self, rule_id: str) -> dict[str, object]:
        rule = self.table.rule_by_id(rule_id)
        if rule is None:
            raise PolicyError(f"no rule with id '{rule_id}'")
        if rule.origin == "qmp":
            self.table.set_rules("qmp", [r for r in self.table.runtime if r is not rule])
        elif rule.origin == "cli":
            self.table.set_rules("cli", [r for r in self.table.cli if r is not rule])
        elif rule.origin == "file":
            raise PolicyError(f"rule '{rule_id}' comes from the policy file {self.policy_file}: change the file")
        elif rule.origin == "guestfwd":
            raise PolicyError(f"rule '{rule_id}' is a gateway service: use guestfwd-remove")
        else:
            raise PolicyError(f"rule '{rule_id}' is built in (see policy-set allow-metadata)")
        log.info("policy rule removed: %s", rule.text)
        info = rule.describe()
        self.shell.emit("POLICY_RULE_REMOVED", info)
        self.save_state()
        return info

    def describe(self) -> dict[str, object]:
        table = self.table
        return {
            "restrict": table.restrict,
            "allow-metadata": not table.builtin,
            "policy-file": self.policy_file or "",
            "rules": table.describe(),
            "counters": table.counters(),
        }

    def set_options(self, restrict: bool | None, allow_metadata: bool | None) -> None:
        if restrict is not None:
            self.table.restrict = restrict
        if allow_metadata is not None:
            self.table.set_allow_metadata(allow_metadata)
        log.info("policy: restrict=%s allow-metadata=%s", self.table.restrict, not self.table.builtin)

    # ---- the policy file ---------------------------------------------------------------
    def load_file(self, initial: bool) -> None:
        """Read the policy file if it changed; at start-up a bad file is a StartupError."""
        path = self.policy_file
        if not path:
            return
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as exc:
            if initial:
                raise StartupError(f"--policy {path}: {exc.strerror}") from exc
            if self.file_key != (0, 0, 0, 0):
                log.warning("policy file %s: %s; its rules are dropped", path, exc.strerror)
                self.table.set_rules("file", [])
            self.file_key = (0, 0, 0, 0)
            return
        if key == self.file_key:
            return
        self.file_key = key
        try:
            if st.st_size > MAX_POLICY_FILE:
                raise PolicySyntaxError(f"larger than {MAX_POLICY_FILE} bytes")
            with open(path, encoding="utf-8", errors="replace") as stream:
                rules = parse_policy_file(stream.read(MAX_POLICY_FILE))
            for rule in rules:
                self.check_unique(rule, replacing=self.table.file)
            self.table.set_rules("file", rules)
        except (OSError, PolicySyntaxError, PolicyError, ValueError) as exc:
            if initial:
                raise StartupError(f"--policy {path}: {exc}") from exc
            log.error("policy file %s: %s; keeping the %d rules read before", path, exc, len(self.table.file))
            return
        log.info("policy file %s: %d rules", path, len(rules))

    def start_watching(self) -> None:
        if self.policy_file and self.watch_task is None:
            self.watch_task = self.shell.loop.create_task(self.watch())

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            try:
                self.load_file(initial=False)
            except Exception:
                log.exception("policy file %s: reload failed", self.policy_file)

    # ---- gateway services --------------------------------------------------------------
    def add_guestfwd(self, spec: GuestFwdSpec, persist: bool = True) -> dict[str, object]:
        stack = self.shell.stack
        addr = ip_bytes(spec.addr)
        cfg = stack.config
        if addr in cfg.static_leases.values():
            raise PolicyError(f"{spec.addr} is a static DHCP lease, not a free address")
        lease = stack.dhcp.by_addr.get(addr)
        if lease is not None and lease.expires > self.shell.now() and addr != cfg.host_ip:
            raise PolicyError(f"{spec.addr} is leased to guest {lease.mac.hex(':')}")
        try:
            rule = guestfwd_rule(spec)
            self.table.add_guestfwd(rule, addr, spec.port)
        except (PolicySyntaxError, ValueError) as exc:
            raise PolicyError(str(exc)) from exc
        self.guestfwds[(spec.protocol, spec.addr, spec.port)] = (spec, rule)
        info = spec_info(spec, rule)
        log.info("gateway service added: %s", spec.text())
        self.shell.emit("GUESTFWD_ADDED", info)
        if persist:
            self.save_state()
        return info

    def remove_guestfwd(self, protocol: str, addr: str, port: int) -> dict[str, object]:
        entry = self.guestfwds.pop((protocol, addr, port), None)
        if entry is None:
            raise PolicyError(f"no {protocol} gateway service at {addr}:{port}")
        spec, rule = entry
        proto = next(number for number, name in PROTO_NAMES.items() if name == protocol)
        self.table.remove_guestfwd(proto, ip_bytes(addr), port)
        info = spec_info(spec, rule)
        log.info("gateway service removed: %s", spec.text())
        self.shell.emit("GUESTFWD_REMOVED", info)
        self.save_state()
        return info

    def list_guestfwds(self) -> list[dict[str, object]]:
        return [spec_info(spec, rule) for spec, rule in self.guestfwds.values()]

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        """What --state keeps: the gateway services and the run-time rules."""
        return {
            "guestfwd": [spec.text() for spec, _rule in self.guestfwds.values()],
            "rules": [rule.text for rule in self.table.runtime],
        }

    def restore(self, data: dict[str, object], cli_guestfwds: list[GuestFwdSpec]) -> None:
        """The gateway services of the command line and the state file, and the saved rules.

        StartupError names what cannot be restored.
        """
        from qemu_vpnnet.policy import parse_rule

        specs = list(cli_guestfwds)
        given = {(s.protocol, s.addr, s.port) for s in specs}
        saved = data.get("guestfwd", [])
        saved_rules = data.get("rules", [])
        if not isinstance(saved, list) or not isinstance(saved_rules, list):
            raise StartupError("state file: 'guestfwd' and 'rules' must be lists")
        try:
            for text in saved:
                spec = parse_guestfwd(str(text))
                if (spec.protocol, spec.addr, spec.port) not in given:  # the command line wins
                    specs.append(spec)
            for spec in specs:
                self.add_guestfwd(spec, persist=False)
            for i, text in enumerate(saved_rules, 1):
                self.add_rule(parse_rule(str(text), f"qmp{i}"), persist=False)
        except (PolicySyntaxError, PolicyError) as exc:
            raise StartupError(f"--guestfwd: {exc}") from exc

    def close(self) -> None:
        if self.watch_task is not None:
            self.watch_task.cancel()
            self.watch_task = None
