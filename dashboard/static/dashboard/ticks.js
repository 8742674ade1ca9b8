/* Relative times that tick (issue 10 item 7). The server renders
 *   <time data-ago="ISO">25 s ago</time>     ("last ping 25 s ago")
 *   <time data-until="ISO">in 42 s</time>    ("next try in 42 s", then "due")
 * (dashboard/templatetags/ticks.py); this rewrites their text every second from the ISO
 * timestamp, in the same words as the server (dash.duration). Rows swapped in by a live
 * refresh are picked up on the next tick. window.hadashTicks.tick() runs one at once
 * (for tests). */
(function () {
  "use strict";

  function duration(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + " s";
    if (s < 3600) {
      var m = Math.floor(s / 60), r = s % 60;
      return r ? m + " min " + r + " s" : m + " min";
    }
    if (s < 86400) {
      var h = Math.floor(s / 3600), hm = Math.floor((s % 3600) / 60);
      return hm ? h + " h " + hm + " min" : h + " h";
    }
    var d = Math.floor(s / 86400), dh = Math.floor((s % 86400) / 3600);
    return dh ? d + " d " + dh + " h" : d + " d";
  }

  function set(node, text) { if (node.textContent !== text) node.textContent = text; }

  function tick() {
    var now = Date.now();
    var agos = document.querySelectorAll("[data-ago]");
    for (var i = 0; i < agos.length; i++) {
      var t = Date.parse(agos[i].dataset.ago);
      if (isNaN(t)) continue;
      var secs = (now - t) / 1000;
      set(agos[i], secs >= -1 ? duration(secs) + " ago" : "in " + duration(-secs));
    }
    var untils = document.querySelectorAll("[data-until]");
    for (var j = 0; j < untils.length; j++) {
      var u = Date.parse(untils[j].dataset.until);
      if (isNaN(u)) continue;
      var left = (u - now) / 1000;
      set(untils[j], left >= 1 ? "in " + duration(left) : "due");
      untils[j].classList.toggle("due", left < 1);
    }
  }

  window.hadashTicks = { tick: tick, duration: duration };
  tick();
  setInterval(tick, 1000);
})();
