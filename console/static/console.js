// Atoll console: the only script. Polls the live panel of a run page, and asks before a decision.
// No inline script anywhere (the CSP forbids it); no third-party code.
"use strict";
(function () {
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
    });
  });
  var live = document.getElementById("live");
  if (!live) { return; }
  var src = live.getAttribute("data-src");
  var period = 2000;
  function finished() {
    var s = live.querySelector("[data-final]");
    return s && s.getAttribute("data-final") === "1";
  }
  function poll() {
    var url = src + "?v=" + encodeURIComponent(live.getAttribute("data-version") || "");
    fetch(url, {credentials: "same-origin", cache: "no-store"}).then(function (resp) {
      if (resp.status === 200) {
        live.setAttribute("data-version", resp.headers.get("x-version") || "");
        return resp.text().then(function (html) { live.innerHTML = html; });
      }
      if (resp.status === 401) {
        live.insertAdjacentHTML("afterbegin", '<p class="flash err">Session expired: reload with the console URL.</p>');
        throw new Error("logged out");
      }
    }).then(function () {
      window.setTimeout(poll, finished() ? 15000 : period);
    }).catch(function (err) {
      if (String(err).indexOf("logged out") < 0) { window.setTimeout(poll, 5000); }
    });
  }
  window.setTimeout(poll, period);
})();
