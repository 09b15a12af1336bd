"""Plan validation: registry settings checked by their RegistryOptions type, targets without digests."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import pytest

from batchpush.errors import PlanError
from batchpush.plan import _field_rules, load_plan, validate_plan
from batchpush.registry.client import RegistryOptions

PATH = "/plans/fleet.yaml"
HOST = "h:1"

#: per annotation type: values a plan may give (with the value stored), and values it may not
VALID: dict[object, list[tuple[Any, Any]]] = {
    bool: [(True, True), (False, False)],
    int: [(7, 7), (1, 1)],
    float: [(30, 30.0), (2.5, 2.5)],
    str | None: [("x", "x"), (None, None)],
}
WRONG: dict[object, list[Any]] = {
    bool: ["yes", 1, 0, None],
    int: [True, "7", 7.5, 0, -1, None],
    float: [True, "30", 0, -1.5, math.inf, math.nan, 10**400, None],
    str | None: [1, True, 2.5, ["x"], {"a": 1}],
}


def document(settings: dict[str, Any], *, where: str = "registries") -> dict[str, Any]:
    plan: dict[str, Any] = {"version": 1, "images": [{"source": "oci:x", "targets": [f"{HOST}/a"]}]}
    if where == "registries":
        plan["registries"] = {HOST: settings}
    else:
        plan["defaults"] = settings
    return plan


def registry_fields() -> list[tuple[str, object]]:
    """Every field of RegistryOptions with its evaluated type: the tests below grow with the class."""
    hints = typing.get_type_hints(RegistryOptions)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(RegistryOptions)]


def test_every_registry_field_type_has_test_values():
    # a new field of a new type must bring its own valid and wrong values here
    for name, kind in registry_fields():
        assert kind in VALID and kind in WRONG, f"RegistryOptions.{name}: no test values for {kind!r}"


@pytest.mark.parametrize("where", ["registries", "defaults"])
def test_every_registry_field_accepts_its_type(where):
    for name, kind in registry_fields():
        for given, stored in VALID[kind]:
            plan = validate_plan(PATH, document({name: given}, where=where))
            options = plan.registries[HOST] if where == "registries" else plan.defaults
            value = getattr(options, name)
            assert value == stored and type(value) is type(stored), (name, given, value)


def test_every_registry_field_refuses_other_types():
    for name, kind in registry_fields():
        for given in WRONG[kind]:
            with pytest.raises(PlanError) as caught:
                validate_plan(PATH, document({name: given}))
            message = str(caught.value)
            assert message.startswith(f"{PATH}: registries['{HOST}'].{name}: must be "), (name, given, message)


def test_defaults_errors_name_the_field():
    with pytest.raises(PlanError, match=r"^/plans/fleet\.yaml: defaults\.retry_after_cap_s: must be a positive number$"):
        validate_plan(PATH, document({"retry_after_cap_s": "30"}, where="defaults"))


def test_retry_after_cap_from_yaml_is_a_float(tmp_path):
    # the regression: an integer number of seconds was refused and a string accepted
    path = tmp_path / "plan.yaml"
    path.write_text(f'version: 1\nregistries:\n  "{HOST}":\n    retry_after_cap_s: 30\nimages:\n  - source: oci:x\n    targets: ["{HOST}/a"]\n')
    cap = load_plan(str(path)).registries[HOST].retry_after_cap_s
    assert cap == 30.0 and isinstance(cap, float)
    path.write_text(path.read_text().replace("retry_after_cap_s: 30", 'retry_after_cap_s: "30"'))
    with pytest.raises(PlanError, match=r"registries\['h:1'\]\.retry_after_cap_s: must be a positive number"):
        load_plan(str(path))


def test_a_field_of_a_type_without_a_rule_fails_loudly():
    @dataclasses.dataclass(frozen=True)
    class Options:
        insecure: bool = False
        mirrors: tuple[str, ...] = ()

    with pytest.raises(TypeError, match=r"Options\.mirrors"):
        _field_rules(Options)


@pytest.mark.parametrize("target", [f"{HOST}/a@sha256:{'a' * 64}", f"{HOST}/a:1@sha256:{'a' * 64}"])
def test_a_target_naming_a_digest_is_refused(target):
    plan = document({})
    plan["images"][0]["targets"] = [f"{HOST}/ok", target]
    with pytest.raises(PlanError) as caught:
        validate_plan(PATH, plan)
    message = str(caught.value)
    assert message.startswith(f"{PATH}: images[0].targets[1]: ")
    assert "cannot name a digest" in message


def test_targets_with_a_tag_or_none_are_accepted():
    plan = document({})
    plan["images"][0]["targets"] = [f"{HOST}/a", f"{HOST}/b:1.2"]
    assert validate_plan(PATH, plan).entries[0]["targets"] == [f"{HOST}/a", f"{HOST}/b:1.2"]
