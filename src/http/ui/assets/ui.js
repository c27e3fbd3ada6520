// agentq dashboard: live numbers over server-sent events, and a
// confirmation before destructive actions. Pages work without it.
(function () {
  "use strict";
  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });
  var src = document.body && document.body.getAttribute("data-live-src");
  if (!src || !window.EventSource) return;
  var status = document.getElementById("live-status");
  var say = function (t) { if (status) status.textContent = t; };
  var es = new EventSource(src);
  es.onopen = function () { say("live"); };
  es.onerror = function () { say("reconnecting…"); };
  es.addEventListener("counts", function (e) {
    var d;
    try { d = JSON.parse(e.data); } catch (x) { return; }
    say("live");
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var k = el.getAttribute("data-live");
      if (!Object.prototype.hasOwnProperty.call(d, k)) return;
      var v = String(d[k]);
      if (el.textContent === v) return;
      el.textContent = v;
      el.classList.remove("changed");
      void el.offsetWidth;
      el.classList.add("changed");
    });
  });
})();
