/* hadash live client: one websocket (/ws/events) for every dashboard page.
 *
 * - Connects to ws(s)://<host>/ws/events?after=<watermark>; the server answers with
 *   {"type":"events","events":[…],"watermark":N} batches (oldest first) and, when too
 *   much was missed, {"type":"reload"}.
 * - Keeps the highest watermark and the ids it has seen (sessionStorage, so a reload
 *   or the next page resumes), drops duplicate ids, reconnects with exponential
 *   back-off and resumes from the watermark: no event is missed.
 * - Pages register handlers with hadashLive.on(fn); fn(events) gets each batch of new
 *   events. Helpers batch DOM work into animation frames (frame, feed) and refetch
 *   page regions at a bounded rate (refresher).
 * - #conn-status shows live / reconnecting. window.hadashLive.count is the number of
 *   distinct events received by this page (for tests), .state the connection state.
 */
(function () {
  "use strict";

  var KEY_MARK = "hadash.live.watermark";
  var KEY_SEEN = "hadash.live.seen";
  var SEEN_MAX = 5000;
  var BACKOFF_MIN = 500;
  var BACKOFF_MAX = 15000;

  var body = document.body;
  var handlers = [];
  var seen = new Set();
  var seenList = [];
  var ws = null;
  var backoff = BACKOFF_MIN;
  var retryTimer = null;
  var saveTimer = null;
  var connectedOnce = false;

  var api = {
    count: 0,          // distinct events received on this page
    batches: 0,        // messages with events
    watermark: 0,      // every event with an id <= watermark has been delivered
    lastId: 0,         // highest event id received
    state: "connecting",
    reconnects: 0,
    on: function (fn) { handlers.push(fn); },
    has: function (id) { return seen.has(id); },
    reconnect: reconnectNow,
    frame: frame,
    feed: feed,
    refresher: refresher,
    renderEvent: renderEvent,
    subjectUrl: subjectUrl,
    clock: clock,
    csrf: csrf,
    post: post,
    el: el,
    int: int,
    setText: setText,
    toast: toast
  };
  window.hadashLive = api;

  // --- state ----------------------------------------------------------------------
  function int(v) { var n = parseInt(v, 10); return isNaN(n) ? 0 : n; }

  function remember(id) {
    if (seen.has(id)) return false;
    seen.add(id);
    seenList.push(id);
    if (seenList.length > SEEN_MAX) {
      var drop = seenList.splice(0, seenList.length - SEEN_MAX);
      for (var i = 0; i < drop.length; i++) seen.delete(drop[i]);
    }
    return true;
  }

  function load() {
    var pageAfter = int(body.dataset.liveAfter);
    var pageTop = int(body.dataset.liveTop);
    var stored = 0, ids = [];
    try {
      stored = int(sessionStorage.getItem(KEY_MARK));
      ids = JSON.parse(sessionStorage.getItem(KEY_SEEN) || "[]");
    } catch (e) { stored = 0; ids = []; }
    // A stored watermark beyond the newest event this page knows belongs to another
    // database (a fresh demo): start from the page.
    if (pageTop && stored > pageTop) { stored = 0; ids = []; }
    api.watermark = Math.max(stored, pageAfter);
    for (var i = 0; i < ids.length; i++) if (ids[i] > api.watermark - SEEN_MAX) remember(ids[i]);
    // What the page rendered counts as seen.
    var rendered = document.querySelectorAll("[data-event-id]");
    for (var j = 0; j < rendered.length; j++) remember(int(rendered[j].dataset.eventId));
  }

  function save() {
    saveTimer = null;
    try {
      sessionStorage.setItem(KEY_MARK, String(api.watermark));
      // Only ids above the watermark can arrive again; keep a margin for the next page.
      var keep = seenList.filter(function (id) { return id > api.watermark - 500; });
      sessionStorage.setItem(KEY_SEEN, JSON.stringify(keep.slice(-SEEN_MAX)));
    } catch (e) { /* storage full or disabled: resume from the page's own position */ }
  }

  function saveSoon() { if (!saveTimer) saveTimer = setTimeout(save, 1000); }

  // --- connection -------------------------------------------------------------------
  var status = document.getElementById("conn-status");

  function setState(state, text) {
    api.state = state;
    if (!status) return;
    status.dataset.state = state;
    var t = status.querySelector(".conn-text");
    if (t) t.textContent = text || state;
  }

  function url() {
    var proto = location.protocol === "https:" ? "wss://" : "ws://";
    return proto + location.host + "/ws/events?after=" + api.watermark;
  }

  function connect() {
    retryTimer = null;
    setState(connectedOnce ? "reconnecting" : "connecting",
             connectedOnce ? "reconnecting…" : "connecting…");
    var sock;
    try { sock = new WebSocket(url()); } catch (e) { schedule(); return; }
    ws = sock;
    sock.onmessage = function (m) {
      if (sock !== ws) return;
      var msg;
      try { msg = JSON.parse(m.data); } catch (e) { return; }
      if (api.state !== "live") {
        connectedOnce = true;
        backoff = BACKOFF_MIN;
        setState("live", "live");
      }
      if (msg.type === "reload") {
        // Too much was missed to replay: the page renders the present afresh.
        api.watermark = Math.max(api.watermark, int(msg.watermark));
        seen.clear(); seenList = [];
        save();
        location.reload();
        return;
      }
      if (msg.type !== "events") return;
      var fresh = [];
      var evs = msg.events || [];
      for (var i = 0; i < evs.length; i++) {
        var ev = evs[i];
        if (remember(ev.id)) {
          fresh.push(ev);
          if (ev.id > api.lastId) api.lastId = ev.id;
        }
      }
      if (typeof msg.watermark === "number" && msg.watermark > api.watermark) {
        api.watermark = msg.watermark;
      }
      saveSoon();
      if (!fresh.length) return;
      fresh.sort(function (a, b) { return a.id - b.id; });
      api.count += fresh.length;
      api.batches += 1;
      for (var h = 0; h < handlers.length; h++) {
        try { handlers[h](fresh); } catch (e) { if (window.console) console.error(e); }
      }
    };
    sock.onclose = function () {
      if (sock !== ws) return;
      ws = null;
      schedule();
    };
    sock.onerror = function () { /* onclose follows */ };
  }

  function schedule() {
    if (retryTimer) return;
    var wait = Math.min(BACKOFF_MAX, backoff) * (0.8 + Math.random() * 0.4);
    backoff = Math.min(BACKOFF_MAX, backoff * 2);
    api.reconnects += 1;
    setState("reconnecting", "reconnecting in " + Math.max(1, Math.round(wait / 1000)) + " s");
    retryTimer = setTimeout(connect, wait);
  }

  function reconnectNow() {
    // Drop the socket (tests, or the indicator's click): the client resumes from its
    // watermark and loses nothing.
    if (ws) { var s = ws; ws = null; s.close(); }
    if (retryTimer) { clearTimeout(retryTimer); retryTimer = null; }
    backoff = BACKOFF_MIN;
    connect();
  }

  if (status) {
    status.addEventListener("click", function () { if (api.state !== "live") reconnectNow(); });
  }
  window.addEventListener("pagehide", save);

  // --- helpers for pages --------------------------------------------------------------
  var frames = {};
  var frameOrder = [];
  var frameQueued = false;

  /* Run fn once in the next animation frame (per key): many events, one DOM update. */
  function frame(key, fn) {
    if (!frames[key]) frameOrder.push(key);
    frames[key] = fn;
    if (frameQueued) return;
    frameQueued = true;
    var run = function () {
      frameQueued = false;
      var keys = frameOrder; frameOrder = [];
      var fns = frames; frames = {};
      for (var i = 0; i < keys.length; i++) {
        try { fns[keys[i]](); } catch (e) { if (window.console) console.error(e); }
      }
    };
    if (document.hidden) setTimeout(run, 250); else requestAnimationFrame(run);
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  // Set a node's text only when it changes (no needless DOM writes).
  function setText(node, text) {
    if (node && node.textContent !== String(text)) node.textContent = text;
  }

  // Show a short message for 6 s: in the element with id `into` if the page has one,
  // else in a #toast banner (made on first use).
  function toast(text, bad, into) {
    var box = (into && document.getElementById(into)) || document.getElementById("toast");
    if (!box) {
      box = el("div", "banner banner-info toast");
      box.id = "toast";
      box.setAttribute("role", "status");
      body.appendChild(box);
    }
    box.textContent = text;
    box.hidden = false;
    box.classList.toggle("banner-critical", !!bad);
    box.classList.toggle("banner-info", !bad);
    clearTimeout(box._t);
    box._t = setTimeout(function () { box.hidden = true; }, 6000);
  }

  function clock(iso, withDate) {
    if (!iso) return "";
    var d = new Date(iso);
    if (isNaN(d)) return "";
    var s = d.toISOString();
    if (!withDate) return s.substr(11, 8);
    var months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                  "Nov", "Dec"];
    return months[d.getUTCMonth()] + " " + d.getUTCDate() + " " + s.substr(11, 8);
  }

  function subjectUrl(e) {
    var n = e.subject_name;
    if (!n) return "";
    if (e.subject === "host") return "/hosts/" + encodeURIComponent(n);
    if (e.subject === "vm" || e.subject === "work") return "/vms/" + encodeURIComponent(n);
    if (e.subject === "config") return "/config#cfg-" + encodeURIComponent(n);
    return "";
  }

  /* The same markup as templates/dashboard/_event_row.html. */
  function renderEvent(e) {
    var li = el("li", "ev sev-" + (e.severity || "info") + (e.alert ? " is-alert" : ""));
    li.dataset.eventId = e.id;
    li.dataset.event = e.event;
    li.dataset.subject = e.subject;
    var t = el("time", null, clock(e.time));
    t.setAttribute("datetime", e.time || "");
    t.title = e.time || "";
    li.appendChild(t);
    li.appendChild(el("span", "ev-kind", e.event));
    var href = subjectUrl(e);
    var s = el(href ? "a" : "span", "ev-subj", e.subject_name);
    if (href) s.href = href;
    li.appendChild(s);
    li.appendChild(el("span", "ev-msg", e.message));
    return li;
  }

  /* A live list of events, newest first, capped at max rows; updates once a frame, or
   * at most once every opts.every ms (the events of the wait are added together: each
   * update lays out and paints the page, which at 10,000 tiles and 100 events/s cost
   * more than a frame's time when it ran every frame, issue 12). */
  function feed(list, opts) {
    opts = opts || {};
    var max = opts.max || 200;
    var every = opts.every || 0;
    var lastFlush = 0, waitTimer = null;
    var render = opts.render || renderEvent;
    var filter = opts.filter || null;
    var pending = [];
    var fresh = [];
    var unmarkTimer = null;
    function unmark() {
      unmarkTimer = null;
      var rows = fresh; fresh = [];
      frame("unmark-" + (list.id || "feed"), function () {
        for (var i = 0; i < rows.length; i++) rows[i].classList.remove("new");
      });
    }
    function topId() {
      var first = list.querySelector("[data-event-id]");
      return first ? int(first.dataset.eventId) : 0;
    }
    function flush() {
      if (!pending.length) return;
      lastFlush = Date.now();
      var batch = pending; pending = [];
      var top = topId();
      var frag = document.createDocumentFragment();
      var late = [];
      for (var i = batch.length - 1; i >= 0; i--) {
        if (batch[i].id > top) {
          var row = render(batch[i]);
          row.classList.add("new");
          fresh.push(row);
          frag.appendChild(row);
        } else {
          late.push(batch[i]);
        }
      }
      var empty = list.querySelector(".empty");
      if (empty) empty.remove();
      list.insertBefore(frag, list.firstChild);
      // An older event that committed late: put it in its place.
      for (var j = 0; j < late.length; j++) {
        var ev = late[j];
        var rows = list.querySelectorAll("[data-event-id]");
        var before = null;
        for (var k = 0; k < rows.length; k++) {
          if (int(rows[k].dataset.eventId) < ev.id) { before = rows[k]; break; }
        }
        if (!before && rows.length >= max) continue;
        list.insertBefore(render(ev), before);
      }
      while (list.children.length > max) list.removeChild(list.lastChild);
      if (!unmarkTimer) unmarkTimer = setTimeout(unmark, 1500);
      if (opts.after) opts.after(batch);
    }
    return {
      add: function (events) {
        for (var i = 0; i < events.length; i++) {
          if (!filter || filter(events[i])) pending.push(events[i]);
        }
        if (pending.length > max) pending.splice(0, pending.length - max);
        if (!pending.length || waitTimer) return;
        var key = list.id ? "feed-" + list.id : "feed";
        var wait = every - (Date.now() - lastFlush);
        if (wait <= 0) { frame(key, flush); return; }
        waitTimer = setTimeout(function () { waitTimer = null; frame(key, flush); }, wait);
      }
    };
  }

  /* Refetch this page and swap the given regions (by id) at most every minInterval ms;
   * <details> keep the open/closed state the operator chose. */
  function refresher(ids, minInterval, url) {
    minInterval = minInterval || 1000;
    var inFlight = false, dirty = false, last = 0, timer = null;
    function go() {
      timer = null;
      inFlight = true; dirty = false; last = Date.now();
      fetch(url || location.href, { credentials: "same-origin",
                                    headers: { "X-Requested-With": "hadash-live" } })
        .then(function (r) {
          if (!r.ok || r.redirected) throw new Error("HTTP " + r.status);
          return r.text();
        })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          frame("regions-" + ids.join(","), function () {
            for (var i = 0; i < ids.length; i++) {
              var cur = document.getElementById(ids[i]);
              var next = doc.getElementById(ids[i]);
              if (!cur || !next) continue;
              var open = {};
              cur.querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
              cur.innerHTML = next.innerHTML;
              cur.querySelectorAll("details[id]").forEach(function (d) {
                if (d.id in open) d.open = open[d.id];
              });
            }
            document.dispatchEvent(new CustomEvent("hadash:regions", { detail: ids }));
          });
        })
        .catch(function () { /* next event tries again */ })
        .then(function () {
          inFlight = false;
          if (dirty) request();
        });
    }
    function request() {
      if (inFlight) { dirty = true; return; }
      if (timer) return;
      timer = setTimeout(go, Math.max(0, minInterval - (Date.now() - last)));
    }
    return { request: request, now: go };
  }

  function csrf() {
    var m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (m) return decodeURIComponent(m[1]);
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  /* POST a form body; resolves with {ok, status, data}. */
  function post(url, fields) {
    var bodyParams = new URLSearchParams();
    Object.keys(fields || {}).forEach(function (k) { bodyParams.append(k, fields[k]); });
    return fetch(url, {
      method: "POST", credentials: "same-origin", body: bodyParams,
      headers: { "X-CSRFToken": csrf(), "Accept": "application/json" }
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) {
        return { ok: r.ok, status: r.status, data: data };
      });
    });
  }

  load();
  connect();
})();
