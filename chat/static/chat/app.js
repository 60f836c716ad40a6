/* Helpers shared by the llmhub pages: JSON fetch with the CSRF header, copying to the clipboard. */
(function () {
  "use strict";

  const csrfMeta = document.querySelector('meta[name="csrf-token"]');

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /* fetch() a JSON endpoint of ours. Unsafe methods carry Django's CSRF token (session auth needs it);
     errors come back in the OpenAI shape {"error": {"message", "code"}} and are thrown as ApiError. */
  async function api(url, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (!["GET", "HEAD", "OPTIONS"].includes(method) && csrfMeta) headers["X-CSRFToken"] = csrfMeta.content;
    const response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      if (response.status === 401) {
        // The session ended (signed out in another tab, or expired): sign in again and come back.
        window.location.assign("/accounts/login/?next=" + encodeURIComponent(window.location.pathname));
      }
      throw new ApiError(error.message || `Request failed (${response.status}).`, response.status, error.code);
    }
    return data;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain-HTTP deployments have no async clipboard: fall back to a selection and execCommand.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  /* A copy button shows "Copied" for a moment, for sighted users and (via its label) screen readers. */
  async function copyWithFeedback(button, text) {
    const label = button.querySelector(".copy-label") || button;
    const before = label.textContent;
    try {
      await copyText(text);
      label.textContent = "Copied";
    } catch (_) {
      label.textContent = "Copy failed";
    }
    setTimeout(() => {
      label.textContent = before;
    }, 1500);
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-copy-target]");
    if (!button) return;
    const target = document.getElementById(button.dataset.copyTarget);
    if (target) copyWithFeedback(button, target.textContent);
  });

  /* The top bar's menu, shown on narrow phones only (the links and "Sign out" are in the bar elsewhere). */
  const menuToggle = document.getElementById("menu-toggle");
  const menu = document.getElementById("topbar-menu");
  function setMenu(open) {
    menu.classList.toggle("open", open);
    menuToggle.setAttribute("aria-expanded", String(open));
  }
  if (menuToggle && menu) {
    menuToggle.addEventListener("click", () => setMenu(!menu.classList.contains("open")));
    document.addEventListener("click", (event) => {
      if (menu.classList.contains("open") && !menu.contains(event.target) && !menuToggle.contains(event.target)) {
        setMenu(false);
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && menu.classList.contains("open")) {
        setMenu(false);
        menuToggle.focus();
      }
    });
  }

  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  function formatDate(value) {
    return value ? dateFormat.format(new Date(value)) : "";
  }

  window.llmhub = { api, ApiError, copyText, copyWithFeedback, formatDate };
})();
