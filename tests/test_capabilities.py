"""``transport.supports``: the driver's check for a transport's optional capabilities decides as
``isinstance`` with the runtime protocol does, for every shape a member can take."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from dara_ws_core import transport
from dara_ws_core.transport import SupportsSendNowait, supports

CAPABILITIES = [transport.SupportsCork, transport.SupportsDisconnected, transport.SupportsPush,
                SupportsSendNowait, transport.SupportsWriter, transport.Transport]


def _method(self: object, *args: Any) -> bool:
    return True


def _prop(self: object) -> bool:
    return True


#: The shapes one member can take on a transport: absent, a method, a property, a plain value,
#: or ``None`` on the instance.
SHAPES = ("absent", "method", "property", "value", "none")


def _transport(shapes: dict[str, str]) -> object:
    namespace: dict[str, Any] = {}
    for name, shape in shapes.items():
        if shape in ("method", "method-shadowed-by-none"):
            namespace[name] = _method
        elif shape == "property":
            namespace[name] = property(_prop)
    obj = type("Candidate", (), namespace)()
    for name, shape in shapes.items():
        if shape == "value":
            setattr(obj, name, 1)
        elif shape in ("none", "method-shadowed-by-none"):
            setattr(obj, name, None)
    return obj


def _members(capability: type) -> list[str]:
    names = [name for name in vars(capability) if not name.startswith("_")]
    return names + [name for name in vars(capability).get("__annotations__", {}) if name not in names]


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: c.__name__)
def test_supports_decides_as_isinstance_for_every_shape_of_every_member(capability: type) -> None:
    names = _members(capability)
    assert names, capability  # each capability asks for something
    checked = 0
    for shapes in itertools.product(SHAPES, repeat=len(names)):
        candidate = _transport(dict(zip(names, shapes, strict=True)))
        assert supports(candidate, capability) == isinstance(candidate, capability), (capability, shapes)
        checked += 1
    assert checked == len(SHAPES) ** len(names)


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: c.__name__)
def test_an_object_with_every_member_of_another_capability_only_is_not_taken(capability: type) -> None:
    for other in CAPABILITIES:
        candidate = _transport(dict.fromkeys(_members(other), "method"))
        assert supports(candidate, capability) == isinstance(candidate, capability), (capability, other)


def test_a_method_set_to_none_on_the_instance_counts_as_absent() -> None:
    # isinstance on Python 3.11 takes a method-only protocol from the class first, and so
    # answers True here; the driver would then call None. supports() looks at the instance.
    candidate = _transport({"send_nowait": "method-shadowed-by-none"})
    assert candidate.send_nowait is None  # type: ignore[attr-defined]
    assert not supports(candidate, SupportsSendNowait)
