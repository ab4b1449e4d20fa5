"""The cluster's DNS settings (MagicDNS): what they may be, and applying them.

One replicated record, `meta/dns`, that every netmap carries whole (cluster/netmap.py), so
an agent answers `<hostname>.<domain>` and routes other names from its cached netmap alone
(agent/magic_dns.py). Validation is here, pure, shared by the admin API (which turns a
`DnsSettingsError` into a 400) and the state machine (which refuses what it does not pass:
a proposer can be older or wrong).
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from .commands import DnsSet
from .state_machine import Context, Rejected, handles

DEFAULT_DOMAIN = "mesh.internal"
MAX_NAMESERVERS = 8
MAX_SPLIT_DOMAINS = 64
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class DnsSettingsError(ValueError):
    """Settings that cannot be used; the message names the field and the problem."""


def default_settings() -> dict[str, Any]:
    """What a cluster that never set DNS uses: MagicDNS on, the host's own resolvers."""
    return {"magic_dns": True, "domain": DEFAULT_DOMAIN, "nameservers": [], "split": {}}


def domain_name(text: Any, field: str) -> str:
    """`text` as a lower-case DNS name without the trailing dot, or DnsSettingsError."""
    if not isinstance(text, str):
        raise DnsSettingsError(f"{field} must be a string")
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise DnsSettingsError(f"{field} {text!r} is not a DNS name (labels of a-z, 0-9 and "
                               "inner '-', at most 63 characters each, 253 in all)")
    return name


def _resolvers(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_NAMESERVERS:
        raise DnsSettingsError(f"{field} must be a list of at most {MAX_NAMESERVERS} IP addresses")
    out = []
    for v in value:
        try:
            out.append(str(ipaddress.ip_address(v)))
        except (TypeError, ValueError):
            raise DnsSettingsError(f"{field}: {v!r} is not an IP address") from None
    if len(set(out)) != len(out):
        raise DnsSettingsError(f"{field} lists an address twice")
    return out


def validated(settings: Any) -> dict[str, Any]:
    """The settings in their one stored form: every field present, names normalised."""
    if not isinstance(settings, dict):
        raise DnsSettingsError("DNS settings must be an object")
    unknown = sorted(set(settings) - set(default_settings()))
    if unknown:
        raise DnsSettingsError(f"unknown DNS settings {unknown}")
    merged = {**default_settings(), **settings}
    if not isinstance(merged["magic_dns"], bool):
        raise DnsSettingsError("magic_dns must be true or false")
    split = merged["split"]
    if not isinstance(split, dict) or len(split) > MAX_SPLIT_DOMAINS:
        raise DnsSettingsError(f"split must map at most {MAX_SPLIT_DOMAINS} domains to resolvers")
    routes: dict[str, list[str]] = {}
    for name, resolvers in split.items():
        domain = domain_name(name, "split domain")
        if domain in routes:
            raise DnsSettingsError(f"split domain {domain!r} is given twice")
        routes[domain] = _resolvers(resolvers, f"split[{name!r}]")
        if not routes[domain]:
            raise DnsSettingsError(f"split[{name!r}] needs at least one resolver")
    return {"magic_dns": merged["magic_dns"], "domain": domain_name(merged["domain"], "domain"),
            "nameservers": _resolvers(merged["nameservers"], "nameservers"),
            "split": dict(sorted(routes.items()))}


def stored_settings(txn) -> dict[str, Any]:
    return txn.get("meta", "dns") or default_settings()


@handles(DnsSet)
def _dns_set(ctx: Context, cmd: DnsSet) -> dict:
    try:
        record = validated(cmd.settings)
    except DnsSettingsError as e:
        raise Rejected("invalid_setting", str(e), 400) from None
    before = stored_settings(ctx.txn)
    if record != before:
        ctx.txn.put("meta", "dns", record)
        ctx.audit("dns", before, record)
    return record
