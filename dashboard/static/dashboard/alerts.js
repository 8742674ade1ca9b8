/* Alerts (R19) and incident pages (R18), kept live by the event relay (live.js).
 *
 * Overview: the alerts panel lists the open rows of the alert table. It is refetched
 * from alerts.json (at most about once a second) when the relay brings an event
 * (AlertOpened / AlertResolved, and the incident events that update an alert's title),
 * so a resolved alert disappears by itself. Acknowledge one in place; "Acknowledge
 * all" asks first, naming how many (window.confirm: no inline code, CSP), and only
 * acknowledges the alerts the operator saw (ids up to the newest shown). Without this
 * script the forms still work: per-alert POSTs, and a confirmation page for "all".
 *
 * Incident page: its regions are refetched when events arrive, and its alert is
 * acknowledged in place.
 */
(function () {
  "use strict";
  var L = window.hadashLive;
  if (!L) return;
  var body = document.body;
  var $ = function (id) { return document.getElementById(id); };
  var int = L.int;
  var setText = L.setText;
  var isAdmin = body.dataset.admin === "1";

  function say(text, bad) { L.toast(text, bad); }

  /* The same markup as templates/dashboard/_alert_row.html. */
  function alertRow(a) {
    var li = L.el("li", "alert-row sev-" + a.severity + (a.acknowledged_at ? " acked" : ""));
    li.dataset.alertId = a.id;
    li.dataset.kind = a.kind;
    li.dataset.severity = a.severity;
    li.dataset.acknowledged = a.acknowledged_at ? "1" : "0";
    if (a.incident) li.dataset.incident = a.incident;
    var line = L.el("div", "alert-line");
    line.appendChild(L.el("span", "badge sev sev-" + a.severity, a.severity));
    var title = L.el(a.url ? "a" : "span", "alert-title", a.title);
    if (a.url) title.href = a.url;
    line.appendChild(title);
    li.appendChild(line);
    if (a.message) li.appendChild(L.el("div", "alert-msg", a.message));
    var meta = L.el("div", "alert-meta");
    var t = L.el("time", null, "since " + L.clock(a.opened_at, true));
    t.setAttribute("datetime", a.opened_at);
    t.title = "open since " + a.opened_at;
    meta.appendChild(t);
    if (a.count > 1) {
      var c = L.el("span", "alert-count", "updated \u00d7" + a.count);
      c.title = "updated " + a.count + " times";
      meta.appendChild(c);
    }
    if (a.acknowledged_at) {
      meta.appendChild(L.el("span", "alert-ack", "acknowledged by " + (a.acknowledged_by || "?")));
    } else if (isAdmin) {
      var f = L.el("form", "inline ack-form");
      f.method = "post"; f.action = "/alerts/" + a.id + "/ack";
      var b = L.el("button", "btn btn-small ack-btn", "Acknowledge");
      b.type = "submit"; b.dataset.ack = a.id;
      f.appendChild(b);
      meta.appendChild(f);
    }
    li.appendChild(meta);
    return li;
  }

  /* Refetch a URL at most every minInterval ms, however many requests come. */
  function throttled(url, minInterval, apply) {
    var inFlight = false, dirty = false, last = 0, timer = null;
    function go() {
      timer = null; inFlight = true; dirty = false; last = Date.now();
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { if (!r.ok || r.redirected) throw new Error(r.status); return r.json(); })
        .then(function (data) { L.frame("alerts-" + url, function () { apply(data); }); })
        .catch(function () { /* the next event tries again */ })
        .then(function () { inFlight = false; if (dirty) request(); });
    }
    function request() {
      if (inFlight) { dirty = true; return; }
      if (timer) return;
      timer = setTimeout(go, Math.max(0, minInterval - (Date.now() - last)));
    }
    return request;
  }

  function ackIn(list, done) {
    list.addEventListener("submit", function (ev) {
      var form = ev.target.closest(".ack-form");
      if (!form) return;
      ev.preventDefault();
      var btn = form.querySelector("button");
      if (btn) btn.disabled = true;
      L.post(form.action, {}).then(function (r) {
        if (!r.ok) {
          if (btn) btn.disabled = false;
          say((r.data && r.data.error) || "Acknowledging failed (HTTP " + r.status + ")", true);
          return;
        }
        done(form);
      });
    });
  }

  // --- overview: the alerts panel -------------------------------------------------------
  function panel() {
    var section = $("alerts-panel");
    var list = $("alert-list");
    if (!section || !list) return;
    var ackAll = $("ack-all-form");

    var shownKey = null;  // the rows on the panel, as alerts.json gave them
    function apply(data) {
      // Refetched about once a second while events arrive: the rows are rebuilt only
      // when they changed (a rebuild costs a layout and paint of the page, issue 12).
      var key = JSON.stringify(data.alerts || []);
      if (key !== shownKey) {
        shownKey = key;
        var frag = document.createDocumentFragment();
        (data.alerts || []).forEach(function (a) { frag.appendChild(alertRow(a)); });
        if (!frag.childNodes.length) {
          var none = L.el("li", "muted empty", "No open alerts.");
          none.id = "no-alerts";
          frag.appendChild(none);
        }
        list.textContent = "";
        list.appendChild(frag);
      }
      setText($("alerts-open-count"), data.open);
      var n = $("alerts-open-count");
      if (n) n.dataset.n = data.open;
      var u = $("alerts-unacked-count");
      if (u) { setText(u, data.unacknowledged); u.dataset.n = data.unacknowledged; }
      var card = $("alerts-card");
      if (card) card.classList.toggle("card-alert", data.open > 0);
      if (ackAll) {
        ackAll.hidden = !data.unacknowledged;
        var upto = $("ack-all-upto");
        if (upto) upto.value = data.top;
      }
      document.dispatchEvent(new CustomEvent("hadash:alerts", { detail: data }));
    }

    var refresh = throttled(section.dataset.alertsUrl, 1000, apply);
    ackIn(list, function () { refresh(); });
    if (ackAll) {
      ackAll.addEventListener("submit", function (ev) {
        ev.preventDefault();
        // The alerts the operator sees: unacknowledged rows up to the newest shown.
        var rows = list.querySelectorAll('.alert-row[data-acknowledged="0"]');
        var upto = int(($("ack-all-upto") || {}).value);
        var shown = [].map.call(list.querySelectorAll(".alert-row"),
                                function (r) { return int(r.dataset.alertId); });
        if (shown.length) upto = Math.max.apply(null, shown);
        var n = int(($("alerts-unacked-count") || {}).textContent) || rows.length;
        if (!n) { say("No open alert is waiting for an acknowledgement."); return; }
        var extra = n > rows.length ? " (" + rows.length + " shown here)" : "";
        if (!window.confirm("Acknowledge " + n + " open alert" + (n === 1 ? "" : "s") +
                            extra + "?")) return;
        L.post("/alerts/ack-all", { upto: upto }).then(function (r) {
          if (!r.ok) { say((r.data && r.data.error) || "HTTP " + r.status, true); return; }
          say(r.data.acknowledged + " alert(s) acknowledged.");
          refresh();
        });
      });
    }
    L.on(function (evs) {
      for (var i = 0; i < evs.length; i++) {
        // Alert rows change with AlertOpened/AlertResolved and with the incident events
        // that update them (host and VM changes, HA items); configuration never.
        if (evs[i].subject !== "config") { refresh(); return; }
      }
    });
    // Acknowledgements by others make no event: look now and then.
    setInterval(refresh, 15000);
  }

  // --- incident page ------------------------------------------------------------------------
  function incident() {
    var regions = L.refresher(["incident-head", "incident-body"], 2000);
    function open() {
      var st = $("incident-state");
      return !st || st.dataset.state === "Open" || st.dataset.state === "Recovering";
    }
    L.on(function (evs) {
      for (var i = 0; i < evs.length; i++) {
        var e = evs[i];
        // While it runs, its story grows with host, VM and HA item events; once it has
        // ended only its alert can still change (resolved, or a late title).
        if (e.subject !== "config" && (open() || e.event.indexOf("Alert") === 0)) {
          regions.request();
          return;
        }
      }
    });
    var box = $("incident-body");
    if (box) ackIn(box, function () { regions.request(); });
  }

  if (body.dataset.page === "overview") panel();
  if (body.dataset.page === "incident") incident();
})();
