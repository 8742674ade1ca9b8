"""The failover plan (SPEC R22): per cluster, where each HA VM of each host would restart
if that host failed (the very placement code HA uses, R13/R24, on a copy of the state),
which would not fit, and the failover capacity; kept current by the engine's sweep;
"what if hosts X, Y fail now?" in the API and on the cluster page; the line on each
host page; the maintenance preview (R15)."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from clusters import plans
from clusters.models import FailoverPlan
from fleet.testing import world
from hosts.choices import HostStatus
from hosts.models import Host
from vms import failover
from vms.choices import VmState
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


def plan_of(cluster="c1", **cfg):
    state = failover.load([cluster], cfg={"ha.tag": "", "vm.ha.enabled": True,
                                          "force.ha": False, **cfg})[cluster]
    return failover.compute(state)


def fail_host(w, name, at_t=5, until=60):
    w.advance_to(at_t)
    w.apply(f"host {name} power off")
    w.advance_to(until)
    assert Host.objects.get(name=name).status == HostStatus.DOWN


# Four 18-cpu hosts, each with four 2-cpu HA VMs and a 1-cpu non-HA VM (9 cpus free).
FOUR = {
    "hosts": {f"h{i}": {"cpus": 18} for i in range(1, 5)},
    "vms": {
        **{f"v{i}{j}": {"host": f"h{i}", "ha": True, "cpus": 2, "memory_mb": 4096}
           for i in range(1, 5) for j in range(4)},
        **{f"plain{i}": {"host": f"h{i}", "cpus": 1, "memory_mb": 1024} for i in range(1, 5)},
    },
}


def test_r22_plan_predicts_where_the_engine_restarts_each_ha_vm():
    """R22: the plan is computed with the placement code HA uses — when the host then
    really fails, every HA VM restarts exactly where the plan said, and the non-HA VM
    is not in the plan."""
    w = world(FOUR)
    plan = plan_of()
    predicted = plan.per_host["h1"]
    assert set(predicted) == {"v10", "v11", "v12", "v13"}
    assert all(predicted.values())
    assert sorted(predicted.values()) == ["h2", "h2", "h3", "h4"]  # spread (R24)
    fail_host(w, "h1")
    actual = {v.name: v.host.name for v in VMInstance.objects.filter(
        name__in=predicted).select_related("host")}
    assert actual == predicted
    assert VMInstance.objects.get(name="plain1").state == VmState.STOPPED


def test_r22_capacity_is_the_largest_k_whose_failures_all_fit():
    """R22: any 2 of the four hosts may fail (their 8 HA VMs fill the two others
    exactly); 3 may not — capacity 2. Non-HA VMs need no room. With more load on the
    hosts, capacity drops to 1, and to 0 when one host's HA VMs no longer fit."""
    world(FOUR)
    plan = plan_of()
    assert (plan.capacity, plan.unfit_ids, plan.exhaustive) == (2, [], True)
    assert plan.summaries["h1"].startswith("4 HA VMs → ") and \
        plan.summaries["h1"].endswith("; all fit")
    VMInstance.objects.filter(name__startswith="plain").update(cpus=3)
    assert plan_of().capacity == 1
    VMInstance.objects.filter(name__startswith="plain").update(cpus=8)
    plan = plan_of()
    assert plan.capacity == 0
    assert plan.unfit_ids  # 4 × 2 cpus do not fit in 3 × 2 free cpus
    assert "would not fit" in plan.summaries["h1"]


def test_r22_no_ha_vms_means_full_capacity_and_an_empty_plan():
    """R22: a cluster without HA VMs survives any failures (capacity 3, the maximum);
    hosts' entries are empty."""
    world({"hosts": {"h1": {}, "h2": {}}, "vms": {"a": {"host": "h1"}}})
    plan = plan_of()
    assert plan.capacity == 3
    assert plan.per_host == {"h1": {}, "h2": {}}
    assert plan.summaries["h1"] == "no HA VMs to restart"


def test_r22_plan_honours_ha_tag_and_the_r13_filters():
    """R22 with R13: restarts in the plan go only to Up, Enabled hosts of the cluster
    carrying ha.tag; with no such host the VM would not fit."""
    world({"config": {"ha.tag": "ha"},
           "hosts": {"h1": {}, "h2": {}, "h3": {"tags": ["ha"]}, "h4": {"tags": ["ha"]},
                     "o1": {"cluster": "c2"}},
           "vms": {"vm1": {"host": "h1", "ha": True}}})
    assert plan_of(**{"ha.tag": "ha"}).per_host["h1"] == {"vm1": "h3"}
    Host.objects.filter(name="h3").update(status=HostStatus.DISCONNECTED)
    assert plan_of(**{"ha.tag": "ha"}).per_host["h1"] == {"vm1": "h4"}
    Host.objects.filter(name="h4").update(resource_state="Disabled")
    plan = plan_of(**{"ha.tag": "ha"})
    assert plan.per_host["h1"] == {"vm1": None}
    assert plan.capacity == 0
    assert plan.unfit_ids == [VMInstance.objects.get(name="vm1").pk]


def test_r22_the_plan_runs_without_touching_the_database(django_assert_num_queries):
    """Issue 11 item 8: once the state is loaded, computing the plan and a what-if
    makes no database query at all."""
    world(FOUR)
    state = failover.load(["c1"], cfg={"ha.tag": "", "vm.ha.enabled": True,
                                       "force.ha": False})["c1"]
    with django_assert_num_queries(0):
        plan = failover.compute(state)
        out = failover.what_if(state, ["h1", "h2"])
    assert plan.capacity == 2
    assert out.fits and len(out.placements) == 8


def test_r22_the_sweep_keeps_the_plan_current_within_seconds():
    """R22: the engine's sweep stores each cluster's plan, and recomputes it within
    seconds of a change of capacity (here a host disabled, then a VM grown); unchanged
    state is not recomputed."""
    w = world(FOUR)
    w.advance_to(3)
    p = FailoverPlan.objects.get(cluster="c1")
    assert p.capacity == 2
    first = p.computed_at
    w.advance_to(10)
    assert FailoverPlan.objects.get(cluster="c1").computed_at == first  # nothing changed
    w.apply("host h4 disable")
    w.advance_to(13)
    p = FailoverPlan.objects.get(cluster="c1")
    assert p.computed_at > first
    assert p.capacity == 1  # three hosts left as targets
    assert "h4" in p.plan and all(t != "h4" for t in p.plan["h1"].values())
    VMInstance.objects.filter(name__in=["plain2", "plain3"]).update(cpus=9)
    w.advance_to(16)
    p = FailoverPlan.objects.get(cluster="c1")
    assert p.capacity == 0
    assert FailoverPlan.objects.unfit_vm_ids() == set(p.unfit)
    assert FailoverPlan.objects.unfit_vm_ids(clusters=["other"]) == set()


def test_r22_worst_level_hosts_together():
    """R22: the plan shows the worst ha.failover.level hosts failing together."""
    world(FOUR)
    state = failover.load(["c1"], cfg={"ha.tag": "", "vm.ha.enabled": True,
                                       "force.ha": False, "ha.failover.level": 3})["c1"]
    plan = failover.compute(state)
    assert plan.level == 3 and len(plan.worst["failed"]) == 3
    assert not plan.worst["fits"] and plan.worst["unfit"] > 0


def test_r22_big_clusters_bound_the_combinations_and_say_so():
    """R22 (documented approximation): with more host combinations than
    failover.COMBINATIONS, k ≥ 2 is checked on the most HA-loaded hosts only, and the
    plan says it is not exhaustive; the single-host plan still covers every host."""
    hosts = {f"h{i:02d}": {} for i in range(40)}
    vms = {f"v{i:02d}": {"host": f"h{i:02d}", "ha": True} for i in range(40)}
    world({"hosts": hosts, "vms": vms})
    plan = plan_of()
    assert len(plan.per_host) == 40
    assert plan.capacity == 3 and not plan.exhaustive


# --- API ---------------------------------------------------------------------------------

def test_r22_api_lists_clusters_and_serves_the_plan(ro_api):
    """R22 in the API: GET /clusters (capacity per cluster) and
    GET /clusters/{name}/failover-plan (computed on demand if the engine has not yet)."""
    world(FOUR)
    r = ro_api.get("/api/v1/clusters/c1/failover-plan")
    assert r.status_code == 200
    body = r.json()
    assert body["capacity"] == 2 and body["level"] == 1 and body["below_level"] is False
    assert set(body["plan"]["h1"]) == {"v10", "v11", "v12", "v13"}
    assert body["summaries"]["h2"].endswith("all fit")
    r = ro_api.get("/api/v1/clusters")
    assert r.status_code == 200
    [c1] = r.json()["results"]
    assert (c1["name"], c1["hosts"], c1["failover_capacity"]) == ("c1", 4, 2)
    assert ro_api.get("/api/v1/clusters/nope/failover-plan").status_code == 404
    assert APIClient().get("/api/v1/clusters").status_code in (401, 403)
    assert ro_api.get("/api/v1/").json()["resources"]["clusters"]["url"].endswith(
        "/api/v1/clusters")


def test_r22_api_what_if_changes_nothing(ro_api, api):
    """R22 on demand: POST /clusters/{name}/what-if {"hosts": [...]} (admins, like every
    POST of the API) and GET …/what-if?hosts=a,b (every user) answer where each HA VM of
    those hosts would go and what would not fit, and change nothing."""
    world(FOUR)
    before = list(VMInstance.objects.order_by("name").values_list("name", "state", "host"))
    r = api.post("/api/v1/clusters/c1/what-if", {"hosts": ["h1", "h2"]},
                       format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["failed"] == ["h1", "h2"] and body["fits"] is True
    assert len(body["placements"]) == 8
    assert set(body["placements"].values()) == {"h3", "h4"}
    assert ro_api.get("/api/v1/clusters/c1/what-if?hosts=h1,h2").json() == body
    r = ro_api.get("/api/v1/clusters/c1/what-if?hosts=h1,h2,h3")
    assert r.json()["fits"] is False and "would not fit" in r.json()["summary"]
    assert ro_api.post("/api/v1/clusters/c1/what-if", {"hosts": ["h1"]},
                    format="json").status_code == 403
    assert list(VMInstance.objects.order_by("name").values_list(
        "name", "state", "host")) == before


@pytest.mark.parametrize("body,code,words", [
    ({"hosts": []}, 400, "non-empty list"),
    ({"hosts": "h1"}, 400, "non-empty list"),
    ({"hosts": [1]}, 400, "non-empty list"),
    ({"hosts": ["h1", "h1"]}, 400, "twice"),
    ({"hosts": ["h1"], "extra": 1}, 400, "body must be"),
    ({"hosts": ["zz"]}, 400, "not hosts of cluster c1: zz"),
    ([], 400, "body must be"),
])
def test_r22_api_what_if_refuses_bad_input_clearly(api, body, code, words):
    """Bad input → a clear JSON error."""
    world(FOUR)
    r = api.post("/api/v1/clusters/c1/what-if", body, format="json")
    assert r.status_code == code
    assert words in r.json()["error"]
    assert api.get("/api/v1/clusters/c1/what-if?hosts=").status_code == 400
    assert api.get("/api/v1/clusters/zz/what-if?hosts=h1").status_code == 404


# --- dashboard -------------------------------------------------------------------------

@pytest.fixture
def browser(client):
    client.force_login(get_user_model().objects.create_user("viewer"))
    return client


def test_r22_cluster_page_shows_capacity_plan_and_what_if(browser):
    """R22 on the dashboard: the cluster page shows the capacity against the level,
    each host's "if it fails" line, and answers a what-if form."""
    world(FOUR)
    html = browser.get("/clusters/c1").content.decode()
    assert 'id="plan-capacity">2<' in html
    assert 'data-host="h1" data-fits="true"' in html
    assert "4 HA VMs →" in html
    html = browser.get("/clusters/c1?fail=h1&fail=h2&fail=h3").content.decode()
    assert 'id="what-if-result" data-fits="false"' in html
    assert "If h1, h2, h3 fail:" in html
    html = browser.get("/clusters/c1?fail=ghost").content.decode()
    assert "not hosts of cluster c1: ghost" in html
    assert browser.get("/clusters/nope").status_code == 404
    listing = browser.get("/clusters").content.decode()
    assert 'href="/clusters/c1"' in listing
    assert 'aria-current="page" id="nav-clusters"' in listing  # in the main navigation


def test_r22_host_page_says_what_happens_if_it_fails(browser):
    """R22 on each host page: "If this host fails: 4 HA VMs → …; all fit", and "would
    not fit" when that is so."""
    world(FOUR)
    html = browser.get("/hosts/h1").content.decode()
    assert 'id="host-plan-line" data-fits="true"' in html
    assert "If this host fails:</strong> 4 HA VMs → " in html
    VMInstance.objects.filter(name__startswith="plain").update(cpus=8)
    plans.recompute(["c1"], now=Host.objects.get(name="h1").created)
    html = browser.get("/hosts/h1").content.decode()
    assert 'id="host-plan-line" data-fits="false"' in html
    assert "would not fit" in html


# --- maintenance preview (R15 with R24) ---------------------------------------------------

def test_r24_preview_evacuation_spreads_and_names_what_would_not_fit():
    """Before maintenance is confirmed: where each running VM of the host would migrate
    (ordinary placement, spread, each seeing the ones before it) and which would not."""
    vms = {f"v{i:02d}": {"host": "h0", "cpus": 1, "memory_mb": 2048} for i in range(11)}
    vms["zz-huge"] = {"host": "h0", "cpus": 15, "memory_mb": 1024}
    vms["load"] = {"host": "h1", "cpus": 1}
    world({"hosts": {"h0": {"cpus": 64}, "h1": {}, "h2": {}, "h3": {}}, "vms": vms})
    preview = failover.preview_evacuation(Host.objects.get(name="h0"))
    assert len(preview) == 12
    by_vm = {p["vm"]: p["target"] for p in preview}
    assert by_vm["zz-huge"] is None  # after the others, no host has 15 free cpus
    counts = {}
    for target in by_vm.values():
        if target:
            counts[target] = counts.get(target, 0) + 1
    assert sorted(counts.values()) == [3, 4, 4]
    assert all("most free after placement" in p["reason"] for p in preview if p["target"])
    # The first VM goes to an empty 16-cpu host: 15 of 16 cpus free after it.
    assert preview[0]["free_after"] == "94 % cpu / 97 % memory free after"
    assert VMInstance.objects.filter(host__name="h0").count() == 12  # nothing moved


def test_r24_maintenance_preview_include_names_targets_and_what_would_not_fit():
    """The preview an operator sees before confirming maintenance
    (templates/dashboard/_evacuation_preview.html): one line and a row per VM."""
    from django.template.loader import render_to_string

    world({"hosts": {"h0": {"cpus": 64}, "h1": {}, "h2": {}},
           "vms": {"a": {"host": "h0"}, "b": {"host": "h0"}, "c": {"host": "h0"},
                   "zz": {"host": "h0", "cpus": 20}}})
    html = render_to_string("dashboard/_evacuation_preview.html",
                            {"host": Host.objects.get(name="h0")})
    assert 'data-fits="false"' in html
    assert "4 VMs → h1 ×2, h2 ×1; 1 would not fit" in html
    assert html.count("<tr data-vm=") == 4 and "no host has room" in html


def test_r24_maintenance_confirmation_page_shows_the_preview(client):
    """Before an admin confirms maintenance, the confirmation page says where each
    running VM would migrate; nothing moves until confirmed."""
    world({"hosts": {"h0": {}, "h1": {}, "h2": {}},
           "vms": {"a": {"host": "h0"}, "b": {"host": "h0"}, "c": {"host": "h0"}}})
    client.force_login(get_user_model().objects.create_user("ops", is_staff=True))
    html = client.get("/hosts/h0/maintenance").content.decode()
    assert 'id="evacuation-summary">3 VMs → h1 ×2, h2 ×1; all fit' in html
    assert VMInstance.objects.filter(host__name="h0").count() == 3


def test_issue11_domain_code_never_imports_the_engine():
    """Issue 11 item 8 (developer guide): domain code in hosts/ and vms/ (and clusters/)
    never imports hadash.ha — the engine acts, the domain decides; only admin modules
    may call the engine's actions."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for app in ("hosts", "vms", "clusters"):
        for path in (root / app).rglob("*.py"):
            if {"tests", "migrations"} & set(path.parts) or path.name == "admin.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                if any(n == "hadash.ha" or n.startswith("hadash.ha.") for n in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
