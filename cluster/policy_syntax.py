"""Tailscale's policy syntax beyond what raftmesh enforces: the sections, fields, protocols
and autogroups a Tailscale or Headscale policy file may use, and what raftmesh does with
each. Users bring their existing files, so every documented construct loads; what raftmesh
does not enforce is kept in the text and named by a warning (cluster/policy.py), and where
ignoring it would widen access (postures, `via`, protocols agents cannot filter) the rule
grants nothing instead, so the result is never more permissive than the file.
"""
from __future__ import annotations

from raftmesh.proto.wire import PROTOCOLS

# Top-level sections kept but not enforced: key -> (JSON type, warning code, why).
UNENFORCED_SECTIONS: dict[str, tuple[type, str, str]] = {
    "ssh": (list, "ssh_not_enforced", "Tailscale SSH rules are kept but not enforced: "
                                      "raftmesh runs no SSH server"),
    "sshTests": (list, "ssh_tests_not_checked", "SSH tests are kept but not checked"),
    "nodeAttrs": (list, "node_attrs_not_enforced", "node attributes are kept but not applied"),
    "postures": (dict, "postures_not_enforced", "device postures are kept but not evaluated"),
    "defaultSrcPosture": (list, "postures_not_enforced",
                          "raftmesh cannot check device posture, so rules without their own "
                          "srcPosture grant nothing"),
    "ipsets": (dict, "ipsets_not_enforced", "IP sets are kept but not resolved; rules naming "
                                            "them do not match them"),
    "derpMap": (dict, "derp_map_not_used", "the DERP map is kept but not used"),
    "disableIPv4": (bool, "setting_not_enforced", "this tailnet setting is kept but not applied"),
    "randomizeClientPort": (bool, "setting_not_enforced",
                            "this tailnet setting is kept but not applied"),
}
# Field names each entry of a kept section may use (anything else is refused by path).
UNENFORCED_ENTRY_KEYS: dict[str, tuple[str, ...]] = {
    "ssh": ("action", "src", "dst", "users", "checkPeriod", "acceptEnv", "recorder",
            "enforceRecorder"),
    "sshTests": ("src", "dst", "accept", "check", "deny"),
    "nodeAttrs": ("target", "attr", "app", "ipPool"),
}
AUTO_APPROVER_KEYS = ("routes", "exitNode", "services")
ENFORCED_SECTIONS = ("groups", "tagOwners", "hosts", "acls", "grants", "tests", "autoApprovers")
TOP_KEYS = ENFORCED_SECTIONS + tuple(UNENFORCED_SECTIONS)
ACL_KEYS = ("action", "src", "dst", "proto", "srcPosture", "users", "ports")
GRANT_KEYS = ("src", "dst", "ip", "app", "via", "srcPosture")
TEST_KEYS = ("src", "srcPostureAttrs", "proto", "accept", "deny")

# IANA protocol names Tailscale accepts in `proto` and grants' `ip` (numbers 1-255 too).
PROTOCOL_NUMBERS = {"icmp": 1, "igmp": 2, "ipv4": 4, "ip-in-ip": 4, "tcp": 6, "egp": 8,
                    "igp": 9, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "ipv6-icmp": 58,
                    "sctp": 132, "fc": 133}
_NAMES = {n: name for name, n in PROTOCOL_NUMBERS.items() if name != "ip-in-ip"}
PORTED_PROTOCOLS = ("tcp", "udp", "sctp")  # the others take no ports: host:*
ENFORCED_PROTOCOLS = PROTOCOLS  # what agents' packet filters match (tcp, udp, icmp echo)


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() (and int()) also take other scripts' digits."""
    return text.isascii() and text.isdigit()


def protocol(text: str) -> str | None:
    """The canonical name of a protocol given by name or IANA number ("6" -> "tcp"; a number
    without a name stays a number), or None if it is neither."""
    low = text.lower()
    if low in PROTOCOL_NUMBERS:
        return "ipv4" if low == "ip-in-ip" else low
    if is_number(low) and low[0] != "0" and len(low) <= 3 and 1 <= int(low) <= 255:
        return _NAMES.get(int(low), low)
    return None


# Autogroups: those enforced map to a selector kind; the rest are accepted and match nothing.
ENFORCED_AUTOGROUPS = {"autogroup:member": "member", "autogroup:tagged": "tagged",
                       "autogroup:self": "self", "autogroup:danger-all": "any"}
ROLE_AUTOGROUPS = ("autogroup:owner", "autogroup:admin", "autogroup:it-admin",
                   "autogroup:network-admin", "autogroup:billing-admin", "autogroup:auditor",
                   "autogroup:shared")
INTERNET = "autogroup:internet"
