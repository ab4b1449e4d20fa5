"""OpenAPI links between the operations on one resource, derived from the route table.

A link tells a client (and schemathesis' stateful phase) where an operation's inputs come
from: the user that POST /users created is the {name} of GET, DELETE and lock on
/users/{name}. Nothing here names a path: a path parameter is fed by the routes on its
collection (what they answer holds a field of the same name) and by the other operations
on the same item; any other input by the routes on the same path that answer the field a
route's `linked_inputs` names.
"""
from __future__ import annotations

import re
from typing import Any, Callable

PATH_PARAMETER = re.compile(r"{(\w+)}")


def links(producer, routes: list, operation_id: Callable[[Any], str]) -> dict[str, dict]:
    """The OpenAPI links of `producer`'s success answer, keyed by the target's operationId."""
    out: dict[str, dict] = {}
    for target in routes:
        link = _link(producer, target)
        if link is not None:
            out[operation_id(target)] = {"operationId": operation_id(target), **link}
    return out


def _link(producer, target) -> dict | None:
    parameters: dict[str, str] = {}
    for name in PATH_PARAMETER.findall(target.path):
        value = _path_parameter(producer, target, name)
        if value is None:
            return None  # a link must give every path parameter
        parameters[name] = value
    body = None
    if producer.path == target.path:
        for name, pointer in target.linked_inputs.items():
            if schema_at(producer.response, pointer) is not None:
                if name == "body":
                    body = "$response.body#" + pointer
                else:
                    parameters[name] = "$response.body#" + pointer
    if not parameters and body is None:
        return None  # nothing to carry over
    return {**({"parameters": parameters} if parameters else {}),
            **({"requestBody": body} if body is not None else {})}


def _path_parameter(producer, target, name: str) -> str | None:
    """Where `producer`'s answer (or request) holds `target`'s path parameter `name`, if the
    producer deals with the same resource.

    - the collection (POST creates, GET lists): the field `name` of the record it answers;
      a listing's first record, except for a deletion (a fuzzer following "delete the first
      API key" would revoke its own);
    - another operation on the same item: the reading of the item leads to every operation
      on it, and every change except a deletion leads back to the reading."""
    if producer is target:
        return None
    item = target.path[:target.path.index("{" + name + "}") + len(name) + 2]
    collection = item[:item.rindex("/")]
    if producer.path == collection:
        pointer = _field_pointer(producer.response, name)
        if pointer is None or ("/0/" in pointer and target.method == "DELETE"):
            return None
        return "$response.body#" + pointer
    if producer.path != item and not producer.path.startswith(item + "/"):
        return None
    if (producer.method == "GET" and producer.path == item) or (
            target.method == "GET" and target.path == item and producer.method != "DELETE"):
        return f"$request.path.{name}"
    return None


def _field_pointer(schema: Any, name: str, depth: int = 3) -> str | None:
    """JSON pointer to the nearest property `name` in an answer's schema (first record of a list)."""
    if not isinstance(schema, dict) or depth == 0:
        return None
    if schema.get("type") == "array":
        inner = _field_pointer(schema.get("items"), name, depth - 1)
        return None if inner is None else "/0" + inner
    properties = schema.get("properties", {})
    if name in properties:
        return "/" + name
    for key, sub in properties.items():
        inner = _field_pointer(sub, name, depth - 1)
        if inner is not None:
            return f"/{key}{inner}"
    return None


def schema_at(schema: Any, pointer: str) -> Any:
    """The schema of the value at JSON `pointer` in an answer, or None if it declares none."""
    for part in pointer.strip("/").split("/"):
        if not isinstance(schema, dict):
            return None
        schema = schema.get("items") if part.isdigit() else schema.get("properties", {}).get(part)
    return schema
