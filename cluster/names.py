"""What a user name may be: the one rule the admin API, pre-auth keys, the policy and
identity providers share, so a user created anywhere can be named everywhere else.

A user is either a plain name ("alice", raftmesh's own) or an e-mail address
("alice@example.com"), which is how Tailscale names users and how they arrive from an
identity provider. Names are compared exactly as written. The rule keeps them safe to
show, log and put in a URL path: printable ASCII without spaces, quotes or slashes, and
at most USER_NAME_MAX_LENGTH characters (an e-mail address's limit).
"""
from __future__ import annotations

import re

USER_NAME_MAX_LENGTH = 254
_PLAIN = r"[a-z0-9][a-z0-9._-]{0,62}"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = rf"[A-Za-z0-9._%+-]{{1,64}}@{_LABEL}(?:\.{_LABEL})*"
USER_NAME_PATTERN = rf"^(?:{_PLAIN}|{_EMAIL})$"
_USER_NAME_RE = re.compile(USER_NAME_PATTERN)
# The admin API's JSON schema for a user name (api/admin.py): the same rule, checked there.
USER_NAME_SCHEMA = {"type": "string", "pattern": USER_NAME_PATTERN,
                    "maxLength": USER_NAME_MAX_LENGTH}


def is_user_name(name: str) -> bool:
    """Is `name` a valid user name (plain or e-mail address)?"""
    return len(name) <= USER_NAME_MAX_LENGTH and _USER_NAME_RE.fullmatch(name) is not None
