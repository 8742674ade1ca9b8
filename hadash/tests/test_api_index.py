"""The API index (GET /api/v1/) names every resource an operator can use."""

from rest_framework.test import APIClient


def test_r25_r26_index_names_vm_groups_and_ha_mode():
    """R25, R26: /api/v1/vm-groups and /api/v1/ha-mode exist but the index did not list
    them, so an operator reading it could not find how to group VMs or pause HA."""
    res = APIClient().get("/api/v1/").json()["resources"]
    assert res["vm-groups"]["url"] == "http://testserver/api/v1/vm-groups"
    assert res["ha-mode"]["url"] == "http://testserver/api/v1/ha-mode"
