// Duplex dashboard: keeps each page's live part current without a reload.
//
// The server renders everything. Every refresh, this asks for the same URL with the header
// X-Duplex-Live: 1 and gets back only the live part, which replaces the old one when it
// changed. While an operator is typing in a form of that part, the swap waits, so a
// refresh never eats what they typed. Polling pauses while the tab is hidden.
"use strict";

(function () {
  const region = document.querySelector("[data-live]");
  const status = document.getElementById("live-status");
  if (!region) return;
  const every = Number(document.body.dataset.refreshMs) || 1000;
  let busy = false;

  function editing() {
    const active = document.activeElement;
    if (active && region.contains(active) && active.closest("form")) return true;
    for (const input of region.querySelectorAll("input[type=text], textarea")) {
      if (input.value !== input.defaultValue) return true;
    }
    return false;
  }

  function say(text, bad) {
    if (!status) return;
    status.textContent = text;
    status.classList.toggle("bad", Boolean(bad));
  }

  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const answer = await fetch(window.location.href, {
        headers: { "X-Duplex-Live": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      const text = await answer.text();
      if (!answer.ok) {
        const line = new DOMParser().parseFromString(text, "text/html").body.textContent;
        say(line.trim() || "refresh failed (" + answer.status + ")", true);
        return;
      }
      if (!editing() && text !== region.dataset.rendered) {
        region.innerHTML = text;
        region.dataset.rendered = text;
      }
      say("live · " + new Date().toLocaleTimeString(), false);
    } catch (error) {
      say("dashboard unreachable; retrying", true);
    } finally {
      busy = false;
    }
  }

  setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
})();
